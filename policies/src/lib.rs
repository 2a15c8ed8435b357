//! Routing policies, positions, the geographic capacity grid and network coordinates.
//!
//! Pure logic: no I/O, no clock reads, no tasks. Used by `canopy-overlay` (which carries grids up and down the
//! tree), by the agent's data plane (which asks a policy for the instance of a new connection) and by the simulator.

pub mod position;

pub use position::{Capacity, Position};
