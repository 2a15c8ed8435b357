//! Client commands for a running agent: `agent status`, `agent tree`, `agent peers`, `agent leave`. Each is one
//! call to the agent's local API.

use crate::api::client::Client;
use crate::cli::GlobalArgs;
use crate::runtime::report::{PeerReport, StatusReport, TreeReport, render_peers};
use anyhow::Context;

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Print the status as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct OutputArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn block_on<T>(future: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(future)
}

pub fn status(global: &GlobalArgs, args: &StatusArgs) -> anyhow::Result<()> {
    let report: StatusReport = block_on(Client::new(&global.data_dir).get("/status"))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    Ok(())
}

pub fn tree(global: &GlobalArgs, args: &OutputArgs) -> anyhow::Result<()> {
    let report: TreeReport = block_on(Client::new(&global.data_dir).get("/tree"))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    Ok(())
}

pub fn peers(global: &GlobalArgs, args: &OutputArgs) -> anyhow::Result<()> {
    let report: Vec<PeerReport> = block_on(Client::new(&global.data_dir).get("/peers"))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render_peers(&report));
    }
    Ok(())
}

pub fn leave(global: &GlobalArgs) -> anyhow::Result<()> {
    let message: String = block_on(Client::new(&global.data_dir).post("/leave", &()))?;
    println!("{message}");
    Ok(())
}
