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

/// A child of the over-full coordinator, as the split sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub id: NodeId,
    pub position: Position,
    pub rank: Rank,
    /// Nodes in its subtree, itself included (from its last report).
    pub subtree_size: u32,
}

/// Split `children` of a coordinator at `own` in two halves along the axis (latitude or longitude) where they
/// spread most; the half away from the coordinator forms the new group.
///
/// The new group's coordinator takes the group's other members in beside its own children, so it is elected among
/// those with room for them (the highest rank); a subtree of `n` nodes has at most `n - 1` children. Electing a
/// coordinator whose own group was full over-filled it at once: it split in turn and sent its new coordinator up,
/// over-filling the level above again, and with few children per group two coordinators could pass the same nodes
/// back and forth for good (seen in property schedules with `max_children = 4`). Without such a member, the one with
/// the smallest subtree is elected.
pub fn split_group(own: Position, children: &[Candidate], max_children: usize) -> Option<Split> {
    if children.len() < 2 {
        return None;
    }
    let spread = |f: fn(&Position) -> f64| {
        let (lo, hi) = children
            .iter()
            .map(|c| f(&c.position))
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| (l.min(v), h.max(v)));
        hi - lo
    };
    let key: fn(&Position) -> f64 = if spread(|p| p.lon) > spread(|p| p.lat) { |p| p.lon } else { |p| p.lat };
    let mut sorted: Vec<_> = children.to_vec();
    sorted.sort_by(|a, b| key(&a.position).total_cmp(&key(&b.position)).then(a.id.cmp(&b.id)));
    let half = sorted.len() / 2;
    let median = key(&sorted[half].position);
    // The coordinator keeps the half on its own side.
    let moved: Vec<_> = if key(&own) < median {
        sorted.split_off(half)
    } else {
        sorted.truncate(half);
        sorted
    };
    let others = moved.len() - 1;
    let has_room = |c: &&Candidate| c.subtree_size.saturating_sub(1) as usize + others <= max_children;
    let coordinator = moved
        .iter()
        .filter(has_room)
        .max_by_key(|c| c.rank)
        .or_else(|| moved.iter().min_by_key(|c| (c.subtree_size, std::cmp::Reverse(c.rank))))?
        .id;
    Some(Split { coordinator, members: moved.iter().map(|c| c.id).filter(|id| *id != coordinator).collect() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use canopy_policies::Capacity;
    use std::time::Duration;

    fn child(n: u64, lat: f64, lon: f64, cpu: f64) -> Candidate {
        sized(n, lat, lon, cpu, 1)
    }

    fn sized(n: u64, lat: f64, lon: f64, cpu: f64, subtree_size: u32) -> Candidate {
        let id = NodeId::from_u64(n);
        let cap = Capacity { cpu, mem_mb: 0.0, bandwidth_mbps: 0.0 };
        Candidate {
            id,
            position: Position::new(lat, lon),
            rank: Rank::new(id, true, &cap, Duration::ZERO),
            subtree_size,
        }
    }

    #[test]
    fn splits_along_widest_axis_away_from_coordinator() {
        // Spread in longitude (0..90) is wider than in latitude (0..3).
        let kids: Vec<_> = (0..10).map(|i| child(i, (i % 4) as f64, i as f64 * 10.0, (i % 3) as f64)).collect();
        let s = split_group(Position::new(0.0, 0.0), &kids, 16).unwrap();
        let mut moved = s.members.clone();
        moved.push(s.coordinator);
        moved.sort();
        let expected: Vec<_> = (5..10).map(NodeId::from_u64).collect();
        assert_eq!(moved, expected, "the eastern half moves");
        // Highest rank among 5..9: cpu = i % 3 -> 5 and 8 have cpu 2; tie broken by id -> 8.
        assert_eq!(s.coordinator, NodeId::from_u64(8));
        let west = split_group(Position::new(0.0, 95.0), &kids, 16).unwrap();
        assert!(!west.members.contains(&NodeId::from_u64(9)) && west.coordinator != NodeId::from_u64(9));
    }

    #[test]
    fn too_small_or_garbage_positions_do_not_panic() {
        assert!(split_group(Position::new(0.0, 0.0), &[child(1, 0.0, 0.0, 1.0)], 16).is_none());
        let kids = vec![child(1, f64::NAN, 0.0, 1.0), child(2, 0.0, f64::NAN, 1.0), child(3, 1.0, 1.0, 1.0)];
        assert!(split_group(Position::new(f64::NAN, 0.0), &kids, 16).is_some());
    }

    #[test]
    fn the_new_coordinator_has_room_for_the_members_it_takes_in() {
        // Five children of a full group of four, the eastern three move: 30 and 40 lead full groups of their own
        // and outrank 20, a leaf. Taking the other two in beside four children would over-fill them.
        let kids = vec![
            sized(0, 0.0, 0.0, 1.0, 1),
            sized(10, 0.0, 10.0, 1.0, 1),
            sized(20, 0.0, 20.0, 1.0, 1),
            sized(30, 0.0, 30.0, 5.0, 5),
            sized(40, 0.0, 40.0, 9.0, 20),
        ];
        let s = split_group(Position::new(0.0, 0.0), &kids, 4).unwrap();
        assert_eq!(s.coordinator, NodeId::from_u64(20), "the member with room is elected, not the higher ranks");
        assert_eq!(s.members, vec![NodeId::from_u64(30), NodeId::from_u64(40)]);
        // A group of three (two children) has room for two more: the higher rank among those with room wins.
        let kids: Vec<_> = kids
            .iter()
            .map(|c| if c.id == NodeId::from_u64(30) { Candidate { subtree_size: 3, ..*c } } else { *c })
            .collect();
        let s = split_group(Position::new(0.0, 0.0), &kids, 4).unwrap();
        assert_eq!(s.coordinator, NodeId::from_u64(30));
        // Nobody with room: the smallest subtree takes them.
        let kids: Vec<_> = kids.iter().map(|c| Candidate { subtree_size: c.subtree_size + 10, ..*c }).collect();
        let s = split_group(Position::new(0.0, 0.0), &kids, 4).unwrap();
        assert_eq!(s.coordinator, NodeId::from_u64(20));
    }
}
