//! The Canopy control plane as a sans-IO state machine.
//!
//! A [`Node`] is driven by its caller (the agent over libp2p, or the simulator on a virtual clock):
//!
//! ```text
//! loop {
//!     node.handle(now, input);            // a message, a peer event or a local command
//!     if now >= node.poll_timeout() { node.handle_timeout(now); }
//!     while let Some(out) = node.poll_output() { /* send messages, act on events */ }
//! }
//! ```
//!
//! Nothing here does I/O, reads a clock or spawns a task; time comes in as `now` and randomness from a seeded RNG,
//! so the same code runs in the agent and, thousands of times over, in the simulator.

mod children;
pub mod dedup;
pub mod failure;
pub mod grids;
pub mod id;
pub mod join;
pub mod membership;
pub mod message;
pub mod node;
pub mod rank;
pub mod routes;
pub mod routing;
pub mod split;
pub mod summary;

pub use canopy_policies::{Capacity, Position};
pub use id::NodeId;
pub use message::{DecodeError, Envelope, Message, PROTOCOL_VERSION};
pub use node::{Command, Config, Counters, Event, Input, Node, NodeInfo, Output, Role, Status};
pub use rank::Rank;
pub use summary::Summary;

/// Time since the driver's epoch (the agent's start, or the simulation's zero). Only differences matter.
pub type Time = std::time::Duration;
