//! `agent`: the Canopy node agent. One per machine; see `agent --help`.

mod api;
mod cli;
mod logging;

fn main() -> std::process::ExitCode {
    cli::main()
}
