//! Join descent: which child subtree a join request goes down to when a coordinator has no room.

use crate::id::NodeId;
use crate::summary::Summary;
use canopy_policies::Position;

/// Among `children` (id, summary), the nearest subtree to `joiner` among those not much bigger than the smallest
/// one. Pure nearest-region descent would grow chains (every joiner near the same place goes down the same path),
/// so subtrees larger than twice the smallest (plus one) are skipped: sibling sizes then stay within a factor of
/// about two and the depth stays logarithmic.
pub fn choose_descent(
    joiner: Position,
    exclude: NodeId,
    children: impl Iterator<Item = (NodeId, Summary)> + Clone,
) -> Option<NodeId> {
    let min_size = children.clone().filter(|(id, _)| *id != exclude).map(|(_, s)| s.size as u64).min()?;
    let limit = 2 * min_size + 1;
    children
        .filter(|(id, s)| *id != exclude && s.size as u64 <= limit)
        .map(|(id, s)| (joiner.distance_km(&s.centroid), id))
        .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)))
        .map(|(_, id)| id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(size: u32, lat: f64) -> Summary {
        Summary { size, height: 1, centroid: Position::new(lat, 0.0) }
    }

    #[test]
    fn picks_nearest_among_balanced() {
        let kids = [(NodeId::from_u64(1), s(3, 0.0)), (NodeId::from_u64(2), s(3, 40.0))];
        assert_eq!(
            choose_descent(Position::new(35.0, 0.0), NodeId::from_u64(9), kids.iter().copied()),
            Some(NodeId::from_u64(2))
        );
        assert_eq!(
            choose_descent(Position::new(1.0, 0.0), NodeId::from_u64(9), kids.iter().copied()),
            Some(NodeId::from_u64(1))
        );
    }

    #[test]
    fn skips_oversized_subtrees_and_the_joiner() {
        let kids =
            [(NodeId::from_u64(1), s(50, 0.0)), (NodeId::from_u64(2), s(3, 40.0)), (NodeId::from_u64(3), s(1, 1.0))];
        // Nearest is 1 but it is far bigger than the smallest: go to 3 (size 1, limit 3) rather than 1.
        assert_eq!(
            choose_descent(Position::new(0.0, 0.0), NodeId::from_u64(9), kids.iter().copied()),
            Some(NodeId::from_u64(3))
        );
        assert_eq!(
            choose_descent(Position::new(0.0, 0.0), NodeId::from_u64(3), kids.iter().copied()),
            Some(NodeId::from_u64(2))
        );
        assert_eq!(choose_descent(Position::new(0.0, 0.0), NodeId::from_u64(9), std::iter::empty()), None);
    }
}
