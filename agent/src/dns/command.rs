//! `agent resolve NAME`: asks the local agent what its resolver answers for a Canopy name.

use super::api::Resolved;
use crate::api::client::Client;
use crate::cli::GlobalArgs;
use anyhow::Context;

#[derive(Debug, clap::Args)]
pub struct ResolveArgs {
    /// APP.APPNS.SVC.SVCNS.{N|any}.{POLICY|none}, optionally followed by the domain (.canopy).
    #[arg(value_name = "NAME")]
    pub name: String,
}

pub fn resolve(global: &GlobalArgs, args: &ResolveArgs) -> anyhow::Result<()> {
    // Path-safe names only: anything else cannot be a Canopy name and would change the request path.
    if args.name.is_empty() || !args.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-') {
        anyhow::bail!("{:?} is not a Canopy name: expected APP.APPNS.SVC.SVCNS.{{N|any}}.{{POLICY|none}}", args.name);
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the runtime")?;
    let resolved: Resolved =
        runtime.block_on(Client::new(&global.data_dir).get(&format!("/v1/dns/resolve/{}", args.name)))?;
    println!("{}", resolved.address);
    Ok(())
}
