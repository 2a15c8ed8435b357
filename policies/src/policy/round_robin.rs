//! `rr`: real round-robin per service on this node.
//!
//! The cursor is the instance number picked last, not a position in the candidate list, so the rotation stays
//! fair when instances come and go: the next pick is the lowest instance number above the cursor (wrapping to
//! the lowest overall). A new instance joins the rotation in its place; a vanished one is simply skipped.

use super::{Candidate, PickContext, Policy, PolicyKind};
use std::collections::HashMap;

#[derive(Debug, Clone, Default)]
pub struct RoundRobin {
    last_picked: HashMap<String, u32>,
}

impl RoundRobin {
    pub fn new() -> Self {
        Self::default()
    }

    /// Drops the cursor of a service this node no longer calls (keeps the map bounded by live services).
    pub fn forget(&mut self, service: &str) {
        self.last_picked.remove(service);
    }

    /// Number of services with a cursor.
    pub fn tracked_services(&self) -> usize {
        self.last_picked.len()
    }
}

impl Policy for RoundRobin {
    fn kind(&self) -> PolicyKind {
        PolicyKind::Rr
    }

    fn pick(&mut self, ctx: &PickContext<'_>, candidates: &[Candidate]) -> Option<usize> {
        let last = self.last_picked.get(ctx.service).copied();
        let mut lowest: Option<(u32, usize)> = None;
        let mut next: Option<(u32, usize)> = None;
        for (index, c) in candidates.iter().enumerate() {
            if lowest.is_none_or(|(n, _)| c.instance < n) {
                lowest = Some((c.instance, index));
            }
            if last.is_some_and(|last| c.instance > last) && next.is_none_or(|(n, _)| c.instance < n) {
                next = Some((c.instance, index));
            }
        }
        let (instance, index) = next.or(lowest)?;
        match self.last_picked.get_mut(ctx.service) {
            Some(cursor) => *cursor = instance,
            None => {
                self.last_picked.insert(ctx.service.to_owned(), instance);
            }
        }
        Some(index)
    }
}
