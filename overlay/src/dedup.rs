//! Duplicate suppression: a sliding window of recently seen message ids per sender (as in IPsec anti-replay).

use crate::id::NodeId;
use std::collections::HashMap;

/// Ids this far behind the newest one are taken as a restarted sender (new random id base), not a replay.
const RESTART_GAP: u64 = 1 << 20;
const WINDOW: u64 = 64;

#[derive(Debug, Clone, Copy)]
struct Window {
    newest: u64,
    /// Bit `i` set: id `newest - i` was seen.
    seen: u64,
}

/// Whether a message id is new. Bounded: remembers at most `max_senders` senders, forgetting arbitrary ones beyond.
#[derive(Debug)]
pub struct Dedup {
    windows: HashMap<NodeId, Window>,
    max_senders: usize,
}

impl Dedup {
    pub fn new(max_senders: usize) -> Self {
        Dedup { windows: HashMap::new(), max_senders: max_senders.max(1) }
    }

    /// `true` when `id` from `from` was not seen before (and records it).
    pub fn check(&mut self, from: NodeId, id: u64) -> bool {
        if !self.windows.contains_key(&from) && self.windows.len() >= self.max_senders {
            // Forget one sender; its next duplicate (rare, and harmless: handlers are idempotent) may slip through.
            if let Some(victim) = self.windows.keys().next().copied() {
                self.windows.remove(&victim);
            }
        }
        let w = self.windows.entry(from).or_insert(Window { newest: id, seen: 0 });
        if w.seen == 0 {
            w.newest = id;
            w.seen = 1;
            return true;
        }
        if id > w.newest {
            let shift = id - w.newest;
            w.seen = if shift >= WINDOW { 0 } else { w.seen << shift };
            w.seen |= 1;
            w.newest = id;
            return true;
        }
        let behind = w.newest - id;
        if behind >= RESTART_GAP {
            *w = Window { newest: id, seen: 1 };
            return true;
        }
        if behind >= WINDOW {
            return false;
        }
        let bit = 1u64 << behind;
        if w.seen & bit != 0 {
            return false;
        }
        w.seen |= bit;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_duplicates_and_accepts_reordering() {
        let a = NodeId::from_u64(1);
        let mut d = Dedup::new(8);
        assert!(d.check(a, 10));
        assert!(!d.check(a, 10));
        assert!(d.check(a, 12));
        assert!(d.check(a, 11), "late but unseen");
        assert!(!d.check(a, 11));
        assert!(d.check(NodeId::from_u64(2), 10), "windows are per sender");
    }

    #[test]
    fn too_old_is_dropped_restart_is_accepted() {
        let a = NodeId::from_u64(1);
        let mut d = Dedup::new(8);
        assert!(d.check(a, 1000));
        assert!(!d.check(a, 1000 - WINDOW));
        assert!(d.check(a, 5_000_000));
        assert!(d.check(a, 3), "a restarted sender's small ids are accepted");
        assert!(!d.check(a, 3));
    }

    #[test]
    fn stays_bounded() {
        let mut d = Dedup::new(4);
        for n in 0..100 {
            assert!(d.check(NodeId::from_u64(n), 1));
        }
        assert!(d.windows.len() <= 4);
    }
}
