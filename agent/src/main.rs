//! `agent`: the Canopy node agent. One per machine; see `agent --help`.

mod api;
mod cli;
mod control;
mod daemon;
mod dataplane;
mod dns;
mod logging;
mod netns;
mod persist;
mod runtime;
mod tree_routes;

fn main() -> std::process::ExitCode {
    cli::main()
}
