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
pub enum Command {
    /// Start the first node of a new overlay (it becomes the root); runs in the foreground.
    Start(crate::daemon::DaemonArgs),
    /// Join an overlay through any of its members; runs in the foreground.
    Join(crate::daemon::JoinArgs),
    /// Show this node's role, term, parent, children, ancestors, addresses, subnet and counters.
    Status(crate::control::StatusArgs),
    /// Draw the part of the tree this node knows.
    Tree(crate::control::OutputArgs),
    /// List the peers this node is connected to or has admitted.
    Peers(crate::control::OutputArgs),
    /// Print the address the local agent's resolver gives a service or instance name (ServiceIP / InstanceIP).
    Resolve(crate::dns::command::ResolveArgs),
    /// List the services this machine knows (used or hosted): ServiceIPs per policy and instances.
    Services(crate::control::OutputArgs),
    /// Find machines near a position with enough free capacity (placement search over the capacity grids).
    Placement(crate::grid_view::PlacementArgs),
    /// Show this node's capacity grid as a heatmap (text, PNG or JSON).
    Grid(crate::grid_view::GridArgs),
    /// Leave the overlay gracefully (a coordinator hands its role over first) and stop the agent.
    Leave,
    /// Run the data plane alone with a static route table (no control plane); serves the local API.
    Dataplane(crate::dataplane::commands::DataplaneArgs),
    /// Run a command in a new network namespace attached as an instance of a service.
    Run(crate::dataplane::commands::RunArgs),
    /// Attach an existing network namespace (--pid or --netns) as an instance of a service.
    Attach(crate::dataplane::commands::AttachArgs),
    /// Detach an instance of a service.
    Detach(crate::dataplane::commands::DetachArgs),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Kademlia warns on every listen address of a lone root ("no known peers"): that is expected, not news.
    logging::init(cli.global.log_format, "info,libp2p_kad=error");
    let global = &cli.global;
    let result: anyhow::Result<()> = match &cli.command {
        Command::Start(args) => crate::daemon::start(global, args),
        Command::Join(args) => crate::daemon::join(global, args),
        Command::Status(args) => crate::control::status(global, args),
        Command::Tree(args) => crate::control::tree(global, args),
        Command::Peers(args) => crate::control::peers(global, args),
        Command::Resolve(args) => crate::dns::command::resolve(global, args),
        Command::Services(args) => crate::tree_routes::command::services(global, args),
        Command::Placement(args) => crate::grid_view::placement(global, args),
        Command::Grid(args) => crate::grid_view::grid(global, args),
        Command::Leave => crate::control::leave(global),
        Command::Dataplane(args) => crate::dataplane::commands::dataplane(global, args),
        Command::Run(args) => crate::dataplane::commands::run(global, args),
        Command::Attach(args) => crate::dataplane::commands::attach(global, args),
        Command::Detach(args) => crate::dataplane::commands::detach(global, args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
