//! Pruning route answers: a parent answering a child's route query sends only the instances that matter to that
//! child, the `k` most relevant per policy.
//!
//! - `closest`, `closest-hc`, `latency`: the k nearest to the child that have room (then nearest full ones if fewer
//!   than k have room). `latency` uses geography because the parent does not hold the child's network coordinate.
//! - `hc`: the k with the most free capacity.
//! - `rr`: k consecutive instances (by instance number, wrapping) starting at an offset derived from the child's
//!   position, so different children rotate over different subsets and the service's load spreads over all of them.

use super::{Candidate, PolicyKind};
use crate::mix::mix64;
use crate::position::{Capacity, Position};

/// Indices (ascending, unique) of the candidates worth sending to a child at `viewer`, for all policies.
pub fn prune(candidates: &[Candidate], k: usize, viewer: Position) -> Vec<usize> {
    let mut keep: Vec<usize> =
        PolicyKind::ALL.iter().flat_map(|&kind| prune_for(kind, candidates, k, viewer)).collect();
    keep.sort_unstable();
    keep.dedup();
    keep
}

/// Indices (ascending, unique) of the `k` candidates most relevant to a child at `viewer` under `kind`.
pub fn prune_for(kind: PolicyKind, candidates: &[Candidate], k: usize, viewer: Position) -> Vec<usize> {
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    if candidates.len() <= k {
        return order;
    }
    match kind {
        PolicyKind::Closest | PolicyKind::ClosestHc | PolicyKind::Latency => {
            let full = |c: &Candidate| !c.free.fits(&Capacity::MIN_USEFUL);
            order.sort_by(|&a, &b| {
                let (ca, cb) = (&candidates[a], &candidates[b]);
                full(ca)
                    .cmp(&full(cb))
                    .then(viewer.distance_km(&ca.position).total_cmp(&viewer.distance_km(&cb.position)))
                    .then(ca.instance.cmp(&cb.instance))
            });
            order.truncate(k);
        }
        PolicyKind::Hc => {
            order.sort_by(|&a, &b| {
                let (ca, cb) = (&candidates[a], &candidates[b]);
                cb.free.cmp_for_hc(&ca.free).then(ca.instance.cmp(&cb.instance))
            });
            order.truncate(k);
        }
        PolicyKind::Rr => {
            order.sort_by_key(|&i| candidates[i].instance);
            let offset =
                (mix64(viewer.lat.to_bits() ^ viewer.lon.to_bits().rotate_left(32)) % order.len() as u64) as usize;
            order.rotate_left(offset);
            order.truncate(k);
        }
    }
    order.sort_unstable();
    order
}
