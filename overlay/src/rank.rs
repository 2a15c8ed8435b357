//! Succession rank: who takes over a group when its coordinator goes.

use crate::id::NodeId;
use canopy_policies::Capacity;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Total order used for succession and split elections: publicly reachable first, then capacity, then uptime,
/// then the peer id as a tie-break. Derived `Ord` compares the fields in declaration order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Rank {
    pub reachable: bool,
    /// Quantised capacity score (see [`capacity_score`]); coarse so that measurement noise does not reorder nodes.
    pub capacity: u32,
    /// `floor(log2(uptime minutes + 1))`: changes rarely (after 1, 3, 7, 15... minutes), so member lists stay
    /// stable; when it does change, the parent's view carries it late (`Config::rank_push_delay`), with other
    /// changes where it can, not in a view of its own to every child at once.
    pub uptime_class: u8,
    pub id: NodeId,
}

/// One number for a capacity vector: CPU cores weigh most, then memory (GiB) and bandwidth (100 Mbit/s steps).
/// Quantised to steps of 1/4 core so jitter in measurements does not change a node's rank.
pub fn capacity_score(c: &Capacity) -> u32 {
    let finite = |v: f64| if v.is_finite() { v.max(0.0) } else { 0.0 };
    let score = finite(c.cpu) * 4.0 + finite(c.mem_mb) / 1024.0 + finite(c.bandwidth_mbps) / 100.0;
    score.min(u32::MAX as f64) as u32
}

pub fn uptime_class(uptime: Duration) -> u8 {
    (u64::BITS - (uptime.as_secs() / 60 + 1).leading_zeros() - 1) as u8
}

impl Rank {
    pub fn new(id: NodeId, reachable: bool, capacity: &Capacity, uptime: Duration) -> Self {
        Rank { reachable, capacity: capacity_score(capacity), uptime_class: uptime_class(uptime), id }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(cpu: f64) -> Capacity {
        Capacity { cpu, mem_mb: 1024.0, bandwidth_mbps: 100.0 }
    }

    #[test]
    fn reachable_beats_capacity_beats_uptime_beats_id() {
        let a = NodeId::from_u64(1);
        let b = NodeId::from_u64(2);
        let nat_big = Rank::new(b, false, &cap(64.0), Duration::from_secs(10_000));
        let public_small = Rank::new(a, true, &cap(1.0), Duration::ZERO);
        assert!(public_small > nat_big);
        let big = Rank::new(a, true, &cap(8.0), Duration::ZERO);
        let old = Rank::new(b, true, &cap(4.0), Duration::from_secs(100_000));
        assert!(big > old);
        let young = Rank::new(b, true, &cap(4.0), Duration::from_secs(1));
        assert!(old > young);
        let same_a = Rank::new(a, true, &cap(4.0), Duration::from_secs(1));
        assert!(young > same_a, "equal rank fields fall back to the id");
    }

    #[test]
    fn capacity_score_ignores_garbage() {
        let bad = Capacity { cpu: f64::NAN, mem_mb: -5.0, bandwidth_mbps: f64::INFINITY };
        assert_eq!(capacity_score(&bad), 0);
        assert_eq!(capacity_score(&cap(2.0)), 8 + 1 + 1);
    }

    #[test]
    fn uptime_class_is_log2() {
        assert_eq!(uptime_class(Duration::ZERO), 0);
        assert_eq!(uptime_class(Duration::from_secs(59)), 0);
        assert_eq!(uptime_class(Duration::from_secs(60)), 1);
        assert_eq!(uptime_class(Duration::from_secs(3 * 60)), 2);
        assert_eq!(uptime_class(Duration::from_secs(1023 * 60)), 10);
    }
}
