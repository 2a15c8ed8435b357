//! `agent`: the Canopy node agent. One per machine; see `agent --help`.

mod api;
mod capacity;
mod cli;
mod control;
mod daemon;
mod dataplane;
mod dns;
mod grid_view;
mod logging;
mod netns;
mod persist;
mod runtime;
mod tree_routes;

fn main() -> std::process::ExitCode {
    cli::main()
}
