//! `latency`: the instance with the lowest round-trip time estimated from Vivaldi coordinates.
//!
//! Candidates whose node has no coordinate yet (or when this node has none) rank after all candidates with an
//! estimate, ordered among themselves by geographic distance, so a fresh node still routes sensibly.

use super::{Candidate, PickContext, Policy, PolicyKind, with_fallback};

#[derive(Debug, Clone, Copy, Default)]
pub struct LowestLatency;

/// (has no estimate, estimate in ms or distance in km): lower is better.
fn rank(ctx: &PickContext<'_>, c: &Candidate) -> (bool, f64) {
    match (ctx.coord, c.coord.as_ref()) {
        (Some(mine), Some(theirs)) if theirs.is_valid() => (false, mine.estimate_rtt(theirs)),
        _ => (true, ctx.position.distance_km(&c.position)),
    }
}

impl Policy for LowestLatency {
    fn kind(&self) -> PolicyKind {
        PolicyKind::Latency
    }

    fn pick(&mut self, ctx: &PickContext<'_>, candidates: &[Candidate]) -> Option<usize> {
        with_fallback(ctx, candidates, |eligible| {
            eligible
                .min_by(|a, b| {
                    let (ra, rb) = (rank(ctx, a.1), rank(ctx, b.1));
                    ra.0.cmp(&rb.0).then(ra.1.total_cmp(&rb.1)).then(a.1.instance.cmp(&b.1.instance))
                })
                .map(|(i, _)| i)
        })
    }
}
