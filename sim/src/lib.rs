//! A deterministic discrete-event simulator running thousands of Canopy overlay nodes on a virtual clock.
//!
//! [`scenario`] reads a TOML scenario, [`engine`] runs it (network model in [`network`], global tree checks in
//! [`check`]), [`report`] holds the JSON report, [`plot`] draws PNGs and [`bench`] measures scaling and speed.
//! Same scenario and seed, same report (except `wall_seconds`).

pub mod bench;
pub mod check;
pub mod engine;
pub mod experiment;
pub mod kinds;
pub mod message_size;
pub mod network;
pub mod plot;
pub mod prefetch;
pub mod queue;
pub mod report;
pub mod route_load;
pub mod scenario;
pub mod trace;
pub mod wire_size;

pub use engine::{Outcome, Progress, run, run_traced, run_with_progress};
pub use report::Report;
pub use scenario::Scenario;
