//! Policies on position and capacity: `closest`, `hc` and `closest-hc`.

use super::{Candidate, PickContext, Policy, PolicyKind, with_fallback};
use std::cmp::Ordering;

/// The k of `closest-hc` unless configured.
pub const DEFAULT_CLOSEST_K: usize = 3;
/// Upper bound on k, so the k nearest fit in a buffer on the stack.
pub const MAX_CLOSEST_K: usize = 32;

/// Orders candidates by distance from `ctx`, breaking ties by instance number so picks are deterministic.
fn nearer(ctx: &PickContext<'_>, a: &Candidate, b: &Candidate) -> Ordering {
    ctx.position
        .distance_km(&a.position)
        .total_cmp(&ctx.position.distance_km(&b.position))
        .then(a.instance.cmp(&b.instance))
}

/// More free capacity first ([`crate::Capacity::cmp_for_hc`]), then the lower instance number.
fn roomier(a: &Candidate, b: &Candidate) -> Ordering {
    b.free.cmp_for_hc(&a.free).then(a.instance.cmp(&b.instance))
}

/// `closest`: the geographically nearest instance with room.
#[derive(Debug, Clone, Copy, Default)]
pub struct Closest;

impl Policy for Closest {
    fn kind(&self) -> PolicyKind {
        PolicyKind::Closest
    }

    fn pick(&mut self, ctx: &PickContext<'_>, candidates: &[Candidate]) -> Option<usize> {
        with_fallback(ctx, candidates, |eligible| eligible.min_by(|a, b| nearer(ctx, a.1, b.1)).map(|(i, _)| i))
    }
}

/// `hc`: the instance whose node has the most free capacity.
#[derive(Debug, Clone, Copy, Default)]
pub struct HighestCapacity;

impl Policy for HighestCapacity {
    fn kind(&self) -> PolicyKind {
        PolicyKind::Hc
    }

    fn pick(&mut self, ctx: &PickContext<'_>, candidates: &[Candidate]) -> Option<usize> {
        with_fallback(ctx, candidates, |eligible| eligible.min_by(|a, b| roomier(a.1, b.1)).map(|(i, _)| i))
    }
}

/// `closest-hc`: the most free capacity among the k nearest instances with room.
#[derive(Debug, Clone, Copy)]
pub struct ClosestHighestCapacity {
    k: usize,
}

impl Default for ClosestHighestCapacity {
    fn default() -> Self {
        Self::new(DEFAULT_CLOSEST_K)
    }
}

impl ClosestHighestCapacity {
    /// `k` is clamped to `1..=MAX_CLOSEST_K`.
    pub fn new(k: usize) -> Self {
        Self { k: k.clamp(1, MAX_CLOSEST_K) }
    }

    pub fn k(&self) -> usize {
        self.k
    }
}

impl Policy for ClosestHighestCapacity {
    fn kind(&self) -> PolicyKind {
        PolicyKind::ClosestHc
    }

    fn pick(&mut self, ctx: &PickContext<'_>, candidates: &[Candidate]) -> Option<usize> {
        let k = self.k;
        with_fallback(ctx, candidates, |eligible| {
            // The k nearest so far, kept sorted by insertion into a fixed buffer (no allocation per pick).
            let mut nearest: [Option<(usize, &Candidate)>; MAX_CLOSEST_K] = [None; MAX_CLOSEST_K];
            let mut len = 0;
            for (index, c) in eligible {
                let slot = nearest[..len]
                    .iter()
                    .position(|n| n.is_some_and(|(_, other)| nearer(ctx, c, other) == Ordering::Less))
                    .unwrap_or(len);
                if slot >= k {
                    continue;
                }
                let end = len.min(k - 1);
                nearest.copy_within(slot..end, slot + 1);
                nearest[slot] = Some((index, c));
                len = (len + 1).min(k);
            }
            nearest[..len].iter().flatten().min_by(|a, b| roomier(a.1, b.1)).map(|(i, _)| *i)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::position::{Capacity, Position};

    fn candidate(instance: u32, lon: f64, cpu: f64) -> Candidate {
        Candidate { instance, position: Position::new(0.0, lon), free: Capacity::new(cpu, 1024.0, 0.0), coord: None }
    }

    #[test]
    fn k_nearest_buffer_matches_sorting() {
        // Brute force over many shuffled layouts: the buffer must hold exactly the k nearest.
        let lons = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 4.0, 6.0, 0.5];
        for k in 1..=lons.len() + 1 {
            for rotation in 0..lons.len() {
                let candidates: Vec<Candidate> = (0..lons.len())
                    .map(|i| {
                        let lon = lons[(i + rotation) % lons.len()];
                        // Capacity grows with distance: the farthest of the k nearest must win.
                        candidate(i as u32, lon, lon)
                    })
                    .collect();
                let ctx = PickContext::new("svc", Position::new(0.0, 0.0));
                let picked = ClosestHighestCapacity::new(k).pick(&ctx, &candidates).unwrap();
                let mut sorted = lons.to_vec();
                sorted.sort_by(f64::total_cmp);
                let expected_lon = sorted[k.min(lons.len()) - 1];
                assert_eq!(candidates[picked].position.lon, expected_lon, "k={k} rotation={rotation}");
            }
        }
    }
}
