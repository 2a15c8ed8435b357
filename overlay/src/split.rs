//! Geographic split of an over-full group.

use crate::id::NodeId;
use crate::rank::Rank;
use canopy_policies::Position;

/// The result of splitting a group: who goes to the new group, and its coordinator (the highest rank in it).
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    pub coordinator: NodeId,
    /// The new group's other members; they re-attach to `coordinator`.
    pub members: Vec<NodeId>,
}

/// Split `children` (id, position, rank) of a coordinator at `own` in two halves along the axis (latitude or
/// longitude) where they spread most; the half away from the coordinator forms the new group.
pub fn split_group(own: Position, children: &[(NodeId, Position, Rank)]) -> Option<Split> {
    if children.len() < 2 {
        return None;
    }
    let spread = |f: fn(&Position) -> f64| {
        let (lo, hi) =
            children.iter().map(|c| f(&c.1)).fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| (l.min(v), h.max(v)));
        hi - lo
    };
    let key: fn(&Position) -> f64 = if spread(|p| p.lon) > spread(|p| p.lat) { |p| p.lon } else { |p| p.lat };
    let mut sorted: Vec<_> = children.to_vec();
    sorted.sort_by(|a, b| key(&a.1).total_cmp(&key(&b.1)).then(a.0.cmp(&b.0)));
    let half = sorted.len() / 2;
    let median = key(&sorted[half].1);
    // The coordinator keeps the half on its own side.
    let moved: Vec<_> = if key(&own) < median {
        sorted.split_off(half)
    } else {
        sorted.truncate(half);
        sorted
    };
    let coordinator = moved.iter().max_by_key(|c| c.2)?.0;
    Some(Split { coordinator, members: moved.iter().map(|c| c.0).filter(|id| *id != coordinator).collect() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use canopy_policies::Capacity;
    use std::time::Duration;

    fn child(n: u64, lat: f64, lon: f64, cpu: f64) -> (NodeId, Position, Rank) {
        let id = NodeId::from_u64(n);
        let cap = Capacity { cpu, mem_mb: 0.0, bandwidth_mbps: 0.0 };
        (id, Position::new(lat, lon), Rank::new(id, true, &cap, Duration::ZERO))
    }

    #[test]
    fn splits_along_widest_axis_away_from_coordinator() {
        // Spread in longitude (0..90) is wider than in latitude (0..3).
        let kids: Vec<_> = (0..10).map(|i| child(i, (i % 4) as f64, i as f64 * 10.0, (i % 3) as f64)).collect();
        let s = split_group(Position::new(0.0, 0.0), &kids).unwrap();
        let mut moved = s.members.clone();
        moved.push(s.coordinator);
        moved.sort();
        let expected: Vec<_> = (5..10).map(NodeId::from_u64).collect();
        assert_eq!(moved, expected, "the eastern half moves");
        // Highest rank among 5..9: cpu = i % 3 -> 5 and 8 have cpu 2; tie broken by id -> 8.
        assert_eq!(s.coordinator, NodeId::from_u64(8));
        let west = split_group(Position::new(0.0, 95.0), &kids).unwrap();
        assert!(!west.members.contains(&NodeId::from_u64(9)) && west.coordinator != NodeId::from_u64(9));
    }

    #[test]
    fn too_small_or_garbage_positions_do_not_panic() {
        assert!(split_group(Position::new(0.0, 0.0), &[child(1, 0.0, 0.0, 1.0)]).is_none());
        let kids = vec![child(1, f64::NAN, 0.0, 1.0), child(2, 0.0, f64::NAN, 1.0), child(3, 1.0, 1.0, 1.0)];
        assert!(split_group(Position::new(f64::NAN, 0.0), &kids).is_some());
    }
}
