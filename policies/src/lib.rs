//! Routing policies, positions, the geographic capacity grid and network coordinates.
//!
//! Pure logic: no I/O, no clock reads, no tasks. Used by `canopy-overlay` (which carries grids up and down the
//! tree), by the agent's data plane (which asks a policy for the instance of a new connection) and by the simulator.
//!
//! - [`position`]: [`Position`], [`Capacity`], [`Resource`];
//! - [`lattice`]: the planar projection and quadtree-aligned cells all grids share;
//! - [`grid`], [`merge`], [`placement`], [`render`]: the capacity grid, its aggregation, the placement search and
//!   a text heatmap;
//! - [`vivaldi`]: network coordinates from measured round-trip times;
//! - [`policy`]: the routing policies and the pruning of route answers.

pub mod grid;
pub mod lattice;
pub mod merge;
mod mix;
pub mod placement;
pub mod policy;
pub mod position;
pub mod render;
pub mod vivaldi;

pub use grid::{CapacityGrid, DEFAULT_GRID_SIZE, GridCell, GridError, MAX_GRID_SIZE, RegionCapacity};
pub use lattice::CellBounds;
pub use merge::{GridInput, MergeCache};
pub use placement::rank_subtrees_for_placement;
pub use policy::{Candidate, PickContext, Policies, Policy, PolicyKind, prune, prune_for};
pub use position::{Capacity, Position, Resource};
pub use vivaldi::VivaldiCoord;
