//! Succession: every child of a failed coordinator computes the same successor from the member list it holds.

use crate::id::NodeId;
use crate::message::Member;
use crate::rank::Rank;

/// The highest-ranked member of the group, leaving out the failed coordinator and members already found dead.
/// Everyone is ranked as `members` (the parent's view) says, the caller included, so siblings holding the same view
/// agree even while a rank change has not reached the view yet (ranks alone are pushed late); `own` (the caller's
/// current rank) counts only when the view does not list the caller.
pub fn choose_successor(members: &[Member], own: Rank, failed: NodeId, skip: &[NodeId]) -> NodeId {
    let listed = members.iter().any(|m| m.info.id == own.id);
    members
        .iter()
        .map(|m| m.rank)
        .chain((!listed).then_some(own))
        .filter(|r| r.id != failed && (r.id == own.id || !skip.contains(&r.id)))
        .max()
        .map_or(own.id, |r| r.id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::NodeInfo;
    use canopy_policies::{Capacity, Position};
    use std::time::Duration;

    fn member(n: u64, cpu: f64) -> Member {
        let id = NodeId::from_u64(n);
        let capacity = Capacity { cpu, mem_mb: 0.0, bandwidth_mbps: 0.0 };
        Member {
            info: NodeInfo { id, addrs: vec![], position: Position::default(), capacity, reachable: true },
            rank: Rank::new(id, true, &capacity, Duration::ZERO),
        }
    }

    #[test]
    fn all_siblings_agree_and_skip_dead_ones() {
        let members: Vec<_> = [(1, 2.0), (2, 8.0), (3, 4.0), (4, 8.0)].iter().map(|&(n, c)| member(n, c)).collect();
        let failed = NodeId::from_u64(99);
        for m in &members {
            assert_eq!(choose_successor(&members, m.rank, failed, &[]), NodeId::from_u64(4));
        }
        let skip = [NodeId::from_u64(4)];
        assert_eq!(choose_successor(&members, members[0].rank, failed, &skip), NodeId::from_u64(2));
        // A node never skips itself, and with an empty list it succeeds alone.
        assert_eq!(choose_successor(&members, members[3].rank, failed, &skip), NodeId::from_u64(4));
        assert_eq!(choose_successor(&[], members[0].rank, failed, &[]), NodeId::from_u64(1));
    }

    #[test]
    fn a_rank_the_view_does_not_show_yet_does_not_split_the_vote() {
        // Member 1's uptime class ticked over after the view was sent: it now outranks 4 (same capacity, older),
        // but its siblings still see the old rank, so 1 must not claim the succession.
        let members: Vec<_> = [(1, 8.0), (2, 2.0), (4, 8.0)].iter().map(|&(n, c)| member(n, c)).collect();
        let failed = NodeId::from_u64(99);
        let capacity = Capacity { cpu: 8.0, mem_mb: 0.0, bandwidth_mbps: 0.0 };
        let older = Rank::new(NodeId::from_u64(1), true, &capacity, Duration::from_secs(600));
        assert!(older > members[2].rank);
        assert_eq!(choose_successor(&members, older, failed, &[]), NodeId::from_u64(4));
        assert_eq!(choose_successor(&members, members[2].rank, failed, &[]), NodeId::from_u64(4));
        // Not in the view at all (it joined after the view was sent): its own rank is all there is.
        assert_eq!(choose_successor(&members[1..], older, failed, &[]), NodeId::from_u64(1));
    }
}
