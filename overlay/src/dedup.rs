//! Duplicate suppression: a sliding window of recently seen message ids per sender (as in IPsec anti-replay).
//!
//! Unlike IPsec, an id older than the window is let through, not dropped. A sender numbers all its messages in
//! one sequence, whoever they go to, so two messages to one receiver can be far apart in it: a root that renumbers
//! its tree after a failover sends thousands in one burst, and when link jitter swaps two of them on the way the
//! earlier one arrives more than the window behind. Dropping those lost 4,795 route messages in a
//! 10,000-node run with a root crash (`sim/scenarios/bench_10k.toml`), all of them originals. Connections between
//! peers are authenticated, so an old id is a late original or a rare duplicate, which handlers bear.

use crate::id::{NodeId, position_by_key};

/// Ids this far behind the newest one are taken as a restarted sender (new random id base), not a replay.
const RESTART_GAP: u64 = 1 << 20;
const WINDOW: u64 = 64;

/// The ids recently seen from one sender. A fresh window accepts any id.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Window {
    newest: u64,
    /// Bit `i` set: id `newest - i` was seen.
    seen: u64,
}

impl Window {
    /// `true` when `id` was not seen before (and records it).
    pub(crate) fn check(&mut self, id: u64) -> bool {
        if self.seen == 0 {
            self.newest = id;
            self.seen = 1;
            return true;
        }
        if id > self.newest {
            let shift = id - self.newest;
            self.seen = if shift >= WINDOW { 0 } else { self.seen << shift };
            self.seen |= 1;
            self.newest = id;
            return true;
        }
        let behind = self.newest - id;
        if behind >= RESTART_GAP {
            *self = Window { newest: id, seen: 1 };
            return true;
        }
        if behind >= WINDOW {
            return true; // too old to tell; see the module's doc
        }
        let bit = 1u64 << behind;
        if self.seen & bit != 0 {
            return false;
        }
        self.seen |= bit;
        true
    }
}

/// Whether a message id is new. Bounded: remembers at most `max_senders` senders, forgetting the least recently
/// heard beyond. A node hears from few peers (parent, children, a few siblings), so a short list scanned linearly
/// is faster than a hash map here; the scan reads the senders' keys (see [`NodeId::key`]), three cache lines for
/// twenty senders, and compares a whole id only where the key matches.
#[derive(Debug)]
pub struct Dedup {
    windows: Vec<(NodeId, Window, u64)>,
    /// `keys[i]` is `windows[i].0.key()`.
    keys: Vec<u64>,
    max_senders: usize,
    clock: u64,
}

impl Dedup {
    pub fn new(max_senders: usize) -> Self {
        Dedup { windows: Vec::new(), keys: Vec::new(), max_senders: max_senders.max(1), clock: 0 }
    }

    fn position(&self, from: &NodeId) -> Option<usize> {
        position_by_key(&self.keys, from, |i| self.windows[i].0 == *from)
    }

    /// `true` when `id` from `from` was not seen before (and records it).
    pub fn check(&mut self, from: NodeId, id: u64) -> bool {
        self.clock += 1;
        let slot = match self.position(&from) {
            Some(i) => i,
            None => {
                let fresh = (from, Window::default(), 0);
                if self.windows.len() < self.max_senders {
                    self.windows.push(fresh);
                    self.keys.push(from.key());
                    self.windows.len() - 1
                } else {
                    // Forget the least recently heard sender; its next duplicate (rare, and harmless: handlers are
                    // idempotent) may slip through.
                    let oldest = (0..self.windows.len()).min_by_key(|&i| self.windows[i].2).unwrap_or(0);
                    self.windows[oldest] = fresh;
                    self.keys[oldest] = from.key();
                    oldest
                }
            }
        };
        self.windows[slot].2 = self.clock;
        self.windows[slot].1.check(id)
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
    fn too_old_to_tell_and_restart_are_accepted() {
        let a = NodeId::from_u64(1);
        let mut d = Dedup::new(8);
        assert!(d.check(a, 1000));
        assert!(d.check(a, 1000 - WINDOW), "a late original beyond the window is let through");
        assert!(d.check(a, 1000 - WINDOW + 1));
        assert!(!d.check(a, 1000 - WINDOW + 1), "within the window, the bitmap tells");
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
