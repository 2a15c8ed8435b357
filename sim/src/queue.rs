//! The engine's event queue: 1 ms buckets up to the end of the current ~67 ms, ~67 ms buckets for the next few
//! seconds, the bucket being run kept sorted, and a heap for anything later.
//!
//! Pops come out in exactly the order of one binary heap over all events (every event of an earlier bucket is
//! earlier), so runs stay identical; but each push and pop works on one bucket's events (tens at 10,000 nodes)
//! instead of all pending ones (tens of thousands), which kept the heap's cache misses near the top of the profile.
//! A bucket is sorted once when it becomes current (cheaper than a heap's sift per pop); the few events pushed
//! into it while it runs are inserted in place. Events past the current coarse bucket (every node's next tick, a
//! second ahead, among them) are appended to one of 64 coarse buckets and spread over the fine ones when the run
//! reaches them: against appending each to one of 4,096 fine buckets, bench_10k took 2.5% less time (fewer bucket
//! ends out of the cache, presumably), with the same pops.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Something scheduled at a virtual time (ns). Ordering must agree with `at` first.
pub trait Timed: Ord + Copy {
    fn at(&self) -> u64;
}

/// log2 of the fine bucket width in ns (about 1 ms).
const BUCKET_SHIFT: u32 = 20;
/// log2 of the fine buckets per coarse bucket (a coarse bucket spans about 67 ms).
const FINE_BITS: u32 = 6;
const FINE: u64 = 1 << FINE_BITS;
/// Coarse buckets in the ring (about 4.3 s ahead); later events wait in `far`.
const COARSE_RING: u64 = 64;

pub struct EventQueue<T: Timed> {
    /// Index of the fine bucket in `current`.
    cursor: u64,
    /// The current bucket, latest first: the next event is the last.
    current: Vec<T>,
    /// The rest of the cursor's coarse bucket, by fine bucket (`bucket % FINE`).
    fine: Vec<Vec<T>>,
    in_fine: usize,
    /// The next `COARSE_RING - 1` coarse buckets (`coarse bucket % COARSE_RING`).
    coarse: Vec<Vec<T>>,
    in_coarse: usize,
    far: BinaryHeap<Reverse<T>>,
}

impl<T: Timed> Default for EventQueue<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Timed> EventQueue<T> {
    pub fn new() -> Self {
        EventQueue {
            cursor: 0,
            current: Vec::new(),
            fine: (0..FINE).map(|_| Vec::new()).collect(),
            in_fine: 0,
            coarse: (0..COARSE_RING).map(|_| Vec::new()).collect(),
            in_coarse: 0,
            far: BinaryHeap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.current.len() + self.in_fine + self.in_coarse + self.far.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn push(&mut self, event: T) {
        if event.at() >> BUCKET_SHIFT <= self.cursor {
            let at = self.current.partition_point(|queued| *queued > event);
            self.current.insert(at, event);
        } else {
            self.place(event);
        }
    }

    /// Puts an event of a later bucket than the current one (or of the current one, while it is being entered) in
    /// its fine bucket, its coarse bucket or the heap. Inlined by force: left to the compiler, bench_10k took 1.5%
    /// longer.
    #[inline(always)]
    fn place(&mut self, event: T) {
        let bucket = event.at() >> BUCKET_SHIFT;
        let (coarse, cursor_coarse) = (bucket >> FINE_BITS, self.cursor >> FINE_BITS);
        if coarse == cursor_coarse {
            self.fine[(bucket % FINE) as usize].push(event);
            self.in_fine += 1;
        } else if coarse < cursor_coarse + COARSE_RING {
            self.coarse[(coarse % COARSE_RING) as usize].push(event);
            self.in_coarse += 1;
        } else {
            self.far.push(Reverse(event));
        }
    }

    /// The earliest event, without removing it.
    pub fn peek(&mut self) -> Option<&T> {
        self.peek_live(|_| true)
    }

    /// [`EventQueue::peek`], dropping the events of each bucket for which `live` is false when the bucket's turn
    /// comes, before it is sorted.
    pub fn peek_live(&mut self, live: impl FnMut(&T) -> bool) -> Option<&T> {
        self.fill_current(live);
        self.current.last()
    }

    /// The event `n` places after the next one, when it is in the bucket being run (this loads no bucket).
    pub fn ahead(&self, n: usize) -> Option<&T> {
        self.current.len().checked_sub(n + 1).map(|i| &self.current[i])
    }

    pub fn pop(&mut self) -> Option<T> {
        self.fill_current(|_| true);
        self.current.pop()
    }

    /// Moves the cursor to the next non-empty bucket while the current one is empty.
    fn fill_current(&mut self, mut live: impl FnMut(&T) -> bool) {
        while self.current.is_empty() {
            if self.in_fine == 0 {
                // Nothing more in this coarse bucket: go to its last fine bucket, so the step below enters the next
                // coarse bucket; with nothing in the coarse ring either, to just before the first far event's.
                let next_coarse = if self.in_coarse > 0 {
                    (self.cursor >> FINE_BITS) + 1
                } else {
                    let Some(Reverse(first)) = self.far.peek() else { return };
                    first.at() >> (BUCKET_SHIFT + FINE_BITS)
                };
                self.cursor = self.cursor.max((next_coarse << FINE_BITS) - 1);
            }
            self.cursor += 1;
            if self.cursor.is_multiple_of(FINE) {
                self.enter_coarse_bucket();
            }
            let slot = (self.cursor % FINE) as usize;
            let mut events = std::mem::take(&mut self.fine[slot]);
            self.in_fine -= events.len();
            events.retain(|e| live(e));
            events.sort_unstable_by(|a, b| b.cmp(a));
            // The emptied bucket's allocation goes back to the fine slot.
            self.fine[slot] = std::mem::replace(&mut self.current, events);
        }
    }

    /// The cursor reached a new coarse bucket: spread its events over the fine buckets, and bring far events that
    /// came within the coarse ring's reach into it.
    fn enter_coarse_bucket(&mut self) {
        let coarse = self.cursor >> FINE_BITS;
        let slot = (coarse % COARSE_RING) as usize;
        let mut events = std::mem::take(&mut self.coarse[slot]);
        self.in_coarse -= events.len();
        self.in_fine += events.len();
        for event in events.drain(..) {
            self.fine[((event.at() >> BUCKET_SHIFT) % FINE) as usize].push(event);
        }
        self.coarse[slot] = events;
        let horizon = coarse + COARSE_RING;
        while let Some(Reverse(e)) = self.far.peek().copied() {
            if e.at() >> (BUCKET_SHIFT + FINE_BITS) >= horizon {
                break;
            }
            self.far.pop();
            // Not `push`: one in the cursor's own bucket belongs with that bucket's events, taken next.
            self.place(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    struct Ev {
        at: u64,
        seq: u64,
    }

    impl Timed for Ev {
        fn at(&self) -> u64 {
            self.at
        }
    }

    /// `ahead` names the events that follow the next one in pop order, within the bucket being run only.
    #[test]
    fn ahead_names_the_events_after_the_next_in_the_current_bucket() {
        let mut queue: EventQueue<Ev> = EventQueue::new();
        let bucket = 1u64 << BUCKET_SHIFT;
        for (seq, at) in [(1, 30), (2, 10), (3, 20), (4, bucket + 5)] {
            queue.push(Ev { at, seq });
        }
        assert_eq!(queue.peek().copied(), Some(Ev { at: 10, seq: 2 }));
        assert_eq!(queue.ahead(0).copied(), Some(Ev { at: 10, seq: 2 }));
        assert_eq!(queue.ahead(1).copied(), Some(Ev { at: 20, seq: 3 }));
        assert_eq!(queue.ahead(2).copied(), Some(Ev { at: 30, seq: 1 }));
        assert_eq!(queue.ahead(3), None, "the next bucket's event is not looked at");
        queue.pop();
        assert_eq!(queue.ahead(1).copied(), Some(Ev { at: 30, seq: 1 }));
    }

    /// Events `live` rejects when their bucket's turn comes never come out; the rest come in order, and so do events
    /// pushed into the current bucket afterwards, which `live` does not see.
    #[test]
    fn events_found_dead_when_their_bucket_comes_are_dropped() {
        let mut queue: EventQueue<Ev> = EventQueue::new();
        let bucket = 1u64 << BUCKET_SHIFT;
        // Past the cursor's bucket: pushes into the current bucket go in sorted, unfiltered.
        for (seq, at) in [(1, 30), (2, 10), (3, 20), (4, bucket + 5), (5, bucket + 1)] {
            queue.push(Ev { at: bucket + at, seq });
        }
        let dead = |e: &Ev| e.seq.is_multiple_of(2);
        assert_eq!(queue.peek_live(|e| !dead(e)).copied(), Some(Ev { at: bucket + 20, seq: 3 }));
        queue.push(Ev { at: bucket + 25, seq: 6 });
        let mut order = Vec::new();
        while let Some(e) = queue.peek_live(|e| !dead(e)).copied() {
            queue.pop();
            order.push(e.seq);
        }
        assert_eq!(order, [3, 6, 1, 5], "seq 2 and 4 were dead when their buckets came; 6 came later");
        assert!(queue.is_empty());
    }

    proptest! {
        /// Interleaved pushes (never before the last popped time, as in the engine) and pops come out exactly as
        /// from one binary heap.
        #[test]
        fn pops_in_the_order_of_one_heap(steps in proptest::collection::vec((any::<bool>(), 0u64..20_000_000_000), 1..400)) {
            let mut queue: EventQueue<Ev> = EventQueue::new();
            let mut heap = BinaryHeap::new();
            let (mut now, mut seq) = (0u64, 0u64);
            for (pop, delay) in steps {
                if pop {
                    let (a, b) = (queue.pop(), heap.pop().map(|Reverse(e)| e));
                    prop_assert_eq!(a, b);
                    if let Some(e) = a {
                        now = e.at;
                    }
                } else {
                    seq += 1;
                    // Mostly near events, some far ones, some at the current instant.
                    let at = now + if delay % 7 == 0 { 0 } else if delay % 5 == 0 { delay } else { delay % 50_000_000 };
                    queue.push(Ev { at, seq });
                    heap.push(Reverse(Ev { at, seq }));
                }
                prop_assert_eq!(queue.len(), heap.len());
                prop_assert_eq!(queue.peek().copied(), heap.peek().map(|Reverse(e)| *e));
            }
            while let Some(Reverse(e)) = heap.pop() {
                prop_assert_eq!(queue.pop(), Some(e));
            }
            prop_assert!(queue.is_empty());
        }
    }
}
