//! Succession: every child of a failed coordinator computes the same successor from the member list it holds.

use crate::id::NodeId;
use crate::message::Member;
use crate::rank::Rank;

/// The highest-ranked member of the group, leaving out the failed coordinator and members already found dead.
/// `own` is the caller's current rank (its entry in `members` may be older).
pub fn choose_successor(members: &[Member], own: Rank, failed: NodeId, skip: &[NodeId]) -> NodeId {
    members
        .iter()
        .map(|m| if m.info.id == own.id { own } else { m.rank })
        .chain(std::iter::once(own))
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
}
