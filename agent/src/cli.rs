//! Command-line interface. Daemon commands (`start`, `join`) run in the foreground; every other command is a client
//! of a running agent's local API (a Unix socket in its data dir).

use crate::logging::{self, LogFormat};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(name = "agent", version, about = "Canopy: a self-organizing network agent for edge machines")]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Args, Clone)]
pub struct GlobalArgs {
    /// State directory (identity, keys, grants, services); also holds the API socket `agent.sock`, so several
    /// agents can share a machine with one data dir each.
    #[arg(long, global = true, env = "CANOPY_DATA_DIR", default_value = "/var/lib/canopy")]
    pub data_dir: PathBuf,
    /// Log output format.
    #[arg(long, global = true, env = "CANOPY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
pub enum Command {}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.global.log_format, "info");
    let result: anyhow::Result<()> = match cli.command {};
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
