//! Routing policies: which instance a *new* connection to a ServiceIP goes to. A connection stays on the instance
//! picked for it; only new connections ask again.
//!
//! The data plane calls [`Policy::pick`] once per new connection, so picking is a single pass over the candidates
//! that does not allocate (round-robin allocates once per service, for its cursor).
//!
//! All policies except `rr` prefer candidates with room: the hosting node's own free capacity meets
//! [`PickContext::min_free`], and the finest grid the node holds that has nodes in the candidate's cell does not
//! show that region as full. Capacity information is approximate and may be stale, so when no candidate has room
//! they fall back to choosing among all candidates rather than refusing the connection.

mod geographic;
mod kind;
mod latency;
mod prune;
mod round_robin;

pub use geographic::{Closest, ClosestHighestCapacity, DEFAULT_CLOSEST_K, HighestCapacity, MAX_CLOSEST_K};
pub use kind::{PolicyKind, UnknownPolicy};
pub use latency::LowestLatency;
pub use prune::{prune, prune_for};
pub use round_robin::RoundRobin;

use crate::grid::{CapacityGrid, RegionCapacity};
use crate::position::{Capacity, Position};
use crate::vivaldi::VivaldiCoord;

/// What a policy knows about one instance (a view of the overlay's instance record).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// Instance number within its service; round-robin cycles in this order.
    pub instance: u32,
    /// Position of the hosting node.
    pub position: Position,
    /// Free capacity of the hosting node.
    pub free: Capacity,
    /// Network coordinate of the hosting node, when known.
    pub coord: Option<VivaldiCoord>,
}

/// What the picking node knows about itself.
#[derive(Debug, Clone, Copy)]
pub struct PickContext<'a> {
    /// The service being called; round-robin keeps one cursor per service.
    pub service: &'a str,
    /// This node's position.
    pub position: Position,
    /// This node's network coordinate, when it has one.
    pub coord: Option<&'a VivaldiCoord>,
    /// The grids this node holds (own subtree, children, siblings); any order.
    pub grids: &'a [CapacityGrid],
    /// Free capacity below which a node or region counts as full.
    pub min_free: Capacity,
}

impl<'a> PickContext<'a> {
    pub fn new(service: &'a str, position: Position) -> Self {
        PickContext { service, position, coord: None, grids: &[], min_free: Capacity::MIN_USEFUL }
    }

    pub fn with_grids(mut self, grids: &'a [CapacityGrid]) -> Self {
        self.grids = grids;
        self
    }

    pub fn with_coord(mut self, coord: &'a VivaldiCoord) -> Self {
        self.coord = Some(coord);
        self
    }

    pub fn with_min_free(mut self, min_free: Capacity) -> Self {
        self.min_free = min_free;
        self
    }

    /// The candidate's node has room, and so does its region as far as the finest grid with nodes there shows.
    pub fn has_room(&self, candidate: &Candidate) -> bool {
        candidate.free.fits(&self.min_free) && self.region_has_room(candidate.position)
    }

    /// False only when a grid shows nodes in that region and none of them can take `min_free`; unknown regions
    /// count as having room.
    pub fn region_has_room(&self, position: Position) -> bool {
        let mut finest: Option<(u8, RegionCapacity)> = None;
        for grid in self.grids {
            if let Some(region) = grid.cell_at(position)
                && region.nodes > 0
                && finest.is_none_or(|(level, _)| grid.level() > level)
            {
                finest = Some((grid.level(), region));
            }
        }
        finest.is_none_or(|(_, region)| region.can_host(&self.min_free))
    }
}

/// A routing policy.
pub trait Policy {
    fn kind(&self) -> PolicyKind;

    /// Index into `candidates` of the instance for a new connection; `None` only when `candidates` is empty.
    fn pick(&mut self, ctx: &PickContext<'_>, candidates: &[Candidate]) -> Option<usize>;
}

/// Runs `choose` over the candidates with room, or over all of them when none has room.
pub(crate) fn with_fallback(
    ctx: &PickContext<'_>,
    candidates: &[Candidate],
    choose: impl Fn(&mut dyn Iterator<Item = (usize, &Candidate)>) -> Option<usize>,
) -> Option<usize> {
    choose(&mut candidates.iter().enumerate().filter(|(_, c)| ctx.has_room(c)))
        .or_else(|| choose(&mut candidates.iter().enumerate()))
}

/// One instance of every policy, so the data plane can dispatch on the ServiceIP's [`PolicyKind`].
#[derive(Debug, Clone, Default)]
pub struct Policies {
    pub rr: RoundRobin,
    pub closest: Closest,
    pub hc: HighestCapacity,
    pub closest_hc: ClosestHighestCapacity,
    pub latency: LowestLatency,
}

impl Policies {
    /// `closest_k` is the k of `closest-hc` (clamped to `1..=MAX_CLOSEST_K`).
    pub fn new(closest_k: usize) -> Self {
        Policies { closest_hc: ClosestHighestCapacity::new(closest_k), ..Default::default() }
    }

    pub fn get_mut(&mut self, kind: PolicyKind) -> &mut dyn Policy {
        match kind {
            PolicyKind::Rr => &mut self.rr,
            PolicyKind::Closest => &mut self.closest,
            PolicyKind::Hc => &mut self.hc,
            PolicyKind::ClosestHc => &mut self.closest_hc,
            PolicyKind::Latency => &mut self.latency,
        }
    }

    pub fn pick(&mut self, kind: PolicyKind, ctx: &PickContext<'_>, candidates: &[Candidate]) -> Option<usize> {
        self.get_mut(kind).pick(ctx, candidates)
    }
}
