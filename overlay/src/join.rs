//! Join descent: which child subtree a join request goes down to when a coordinator has no room.

use crate::id::NodeId;
use crate::summary::Summary;
use canopy_policies::Position;

/// A leaf child this many times nearer to a joining node than the nearest group with room may start a group of its
/// own for it (see [`choose_descent`]): groups fill up where the joiners are, and a region without one gets its own.
pub const NEW_GROUP_NEARER: f64 = 4.0;

/// Where a join goes down from a coordinator without room, among its `children` (id, summary); `joiner` is the
/// joining node's position and subtree, `exclude` its id.
///
/// The nearest subtree among those not much bigger than the smallest one. Pure nearest-region descent would grow
/// chains (every joiner near the same place goes down the same path), so subtrees larger than twice the smallest
/// (plus one) are skipped: sibling sizes then stay within a factor of about two and the depth stays logarithmic.
///
/// Where that is a leaf, and the joiner a single node, the nearest group with room among the children takes it
/// instead (a child whose children are all leaves and number fewer than `max_children`, as its summary tells:
/// height 2, size at most `max_children`), unless the leaf is [`NEW_GROUP_NEARER`] times nearer. Balancing alone
/// turned every leaf below a full group into the coordinator of one to three leaves: 2,731 coordinators in a tree of
/// 10,000 nodes (bench_10k) against 1,002 this way, and every coordinator builds grids and views and heartbeats its
/// group each round.
pub fn choose_descent(
    joiner: (Position, &Summary),
    exclude: NodeId,
    children: impl Iterator<Item = (NodeId, Summary)> + Clone,
    max_children: usize,
) -> Option<NodeId> {
    let (position, subtree) = joiner;
    let candidates = children.filter(move |(id, _)| *id != exclude);
    let limit = 2 * candidates.clone().map(|(_, s)| s.size as u64).min()? + 1;
    let single = subtree.height <= 1;
    let open = |s: &Summary| s.height == 2 && (s.size as usize) <= max_children;
    // One pass, one distance per child that may be picked (a descent runs at every level of every join).
    let (mut balanced, mut group): (Option<Pick>, Option<Pick>) = (None, None);
    for (id, s) in candidates {
        let (fits, opens) = (s.size as u64 <= limit, single && open(&s));
        if !fits && !opens {
            continue;
        }
        let here = Pick { km: position.distance_km(&s.centroid), id, height: s.height };
        if fits && here.nearer_than(&balanced) {
            balanced = Some(here);
        }
        if opens && here.nearer_than(&group) {
            group = Some(here);
        }
    }
    let balanced = balanced?;
    match group {
        Some(group) if single && balanced.height <= 1 && balanced.km * NEW_GROUP_NEARER >= group.km => Some(group.id),
        _ => Some(balanced.id),
    }
}

/// A child the descent may pick, with its distance to the joiner.
#[derive(Clone, Copy)]
struct Pick {
    km: f64,
    id: NodeId,
    height: u16,
}

impl Pick {
    /// Nearer than `best` so far (ties go to the lower id, so every coordinator picks alike).
    fn nearer_than(&self, best: &Option<Pick>) -> bool {
        best.is_none_or(|b| self.km.total_cmp(&b.km).then(self.id.cmp(&b.id)).is_lt())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(size: u32, height: u16, lat: f64) -> Summary {
        Summary { size, height, centroid: Position::new(lat, 0.0) }
    }

    fn id(n: u64) -> NodeId {
        NodeId::from_u64(n)
    }

    const ONE_NODE: Summary = Summary { size: 1, height: 1, centroid: Position { lat: 0.0, lon: 0.0 } };

    /// A joiner with a subtree of its own (here: 5 nodes, 2 levels) takes the balanced rule.
    #[test]
    fn a_subtree_picks_the_nearest_among_balanced() {
        let subtree = s(5, 2, 0.0);
        let kids = [(id(1), s(3, 2, 0.0)), (id(2), s(3, 2, 40.0))];
        assert_eq!(choose_descent((Position::new(35.0, 0.0), &subtree), id(9), kids.iter().copied(), 16), Some(id(2)));
        assert_eq!(choose_descent((Position::new(1.0, 0.0), &subtree), id(9), kids.iter().copied(), 16), Some(id(1)));
    }

    #[test]
    fn a_subtree_skips_oversized_subtrees_and_itself() {
        let subtree = s(5, 2, 0.0);
        let kids = [(id(1), s(50, 3, 0.0)), (id(2), s(3, 2, 40.0)), (id(3), s(1, 1, 1.0))];
        let at = Position::new(0.0, 0.0);
        // Nearest is 1 but it is far bigger than the smallest: go to 3 (size 1, limit 3) rather than 1.
        assert_eq!(choose_descent((at, &subtree), id(9), kids.iter().copied(), 16), Some(id(3)));
        assert_eq!(choose_descent((at, &subtree), id(3), kids.iter().copied(), 16), Some(id(2)));
        assert_eq!(choose_descent((at, &subtree), id(9), std::iter::empty(), 16), None);
    }

    /// A single node fills the nearest group with room before a leaf leads a new one, unless that leaf is
    /// `NEW_GROUP_NEARER` times nearer; full groups and groups of groups are not groups with room.
    #[test]
    fn a_single_node_fills_the_nearest_group_with_room() {
        let kids = [
            (id(1), s(17, 2, 0.0)), // a full group (16 leaves) right here
            (id(2), s(40, 3, 0.0)), // a group of groups, right here too
            (id(3), s(5, 2, 10.0)), // a group with room, 10 degrees away
            (id(4), s(9, 2, 20.0)), // another, further
            (id(5), s(1, 1, 4.0)),  // a leaf, 4 degrees away
        ];
        let at = |lat| (Position::new(lat, 0.0), &ONE_NODE);
        assert_eq!(choose_descent(at(0.0), id(9), kids.iter().copied(), 16), Some(id(3)), "the leaf is not 4x nearer");
        assert_eq!(choose_descent(at(22.0), id(9), kids.iter().copied(), 16), Some(id(4)));
        assert_eq!(choose_descent(at(3.5), id(9), kids.iter().copied(), 16), Some(id(5)), "0.5 against 6.5 degrees");
        // With room for 4 children only, neither group has room: the balanced rule (sizes up to 3) takes the leaf.
        assert_eq!(choose_descent(at(0.0), id(9), kids.iter().copied(), 4), Some(id(5)));
        // Without the leaf and without room, the smallest balanced subtrees: 3 (size 5) and 4 (size 9).
        assert_eq!(choose_descent(at(22.0), id(5), kids.iter().copied(), 4), Some(id(4)));
    }
}
