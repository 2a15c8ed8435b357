//! Placement search (VineIO's migration and replication target search), pure: which regions, and which subtrees,
//! near a position can take a given demand. The overlay walks the tree with the answers: it sends a request to the
//! best child subtree, or up to its parent when a sibling (or nothing it knows) ranks best.

use crate::grid::{CapacityGrid, GridCell};
use crate::position::{Capacity, Position};

impl CapacityGrid {
    /// Cells with a node that may host `demand`, nearest first. Distance runs from `near` to the cell's mean node
    /// position, where its capacity actually is.
    pub fn regions_for(&self, near: Position, demand: &Capacity) -> Vec<(GridCell, f64)> {
        let mut found: Vec<(GridCell, f64)> = self
            .occupied_cells()
            .filter(|c| c.region.can_host(demand))
            .filter_map(|c| c.region.centroid.map(|at| (c, near.distance_km(&at))))
            .collect();
        found.sort_by(|a, b| a.1.total_cmp(&b.1));
        found
    }

    /// The nearest cell that may host `demand`, without allocating.
    pub fn nearest_region_for(&self, near: Position, demand: &Capacity) -> Option<(GridCell, f64)> {
        self.occupied_cells()
            .filter(|c| c.region.can_host(demand))
            .filter_map(|c| c.region.centroid.map(|at| (c, near.distance_km(&at))))
            .min_by(|a, b| a.1.total_cmp(&b.1))
    }
}

/// Ranks subtrees (children, siblings, or the own subtree, identified by `S`) by the distance from `near` to their
/// nearest region able to host `demand`. Subtrees with no such region are left out; ties keep the input order.
pub fn rank_subtrees_for_placement<S: Copy>(
    near: Position,
    demand: &Capacity,
    subtrees: &[(S, &CapacityGrid)],
) -> Vec<(S, f64)> {
    let mut ranked: Vec<(S, f64)> = subtrees
        .iter()
        .filter_map(|(id, grid)| grid.nearest_region_for(near, demand).map(|(_, distance)| (*id, distance)))
        .collect();
    ranked.sort_by(|a, b| a.1.total_cmp(&b.1));
    ranked
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::GridInput;

    fn grid(nodes: &[(f64, f64, f64)]) -> CapacityGrid {
        let inputs: Vec<GridInput> = nodes
            .iter()
            .map(|&(lat, lon, cpu)| GridInput::Node {
                position: Position::new(lat, lon),
                free: Capacity::new(cpu, 4096.0, 0.0),
            })
            .collect();
        CapacityGrid::merge(&inputs)
    }

    #[test]
    fn nearest_subtree_with_room_wins() {
        let munich = Position::new(48.137, 11.575);
        let full_nearby = grid(&[(48.2, 11.6, 0.0), (48.0, 11.4, 0.5)]);
        let vienna = grid(&[(48.2, 16.37, 4.0)]);
        let berlin = grid(&[(52.52, 13.4, 8.0)]);
        let demand = Capacity::new(2.0, 512.0, 0.0);
        let ranked = rank_subtrees_for_placement(
            munich,
            &demand,
            &[("nearby", &full_nearby), ("berlin", &berlin), ("vienna", &vienna)],
        );
        let order: Vec<&str> = ranked.iter().map(|(id, _)| *id).collect();
        assert_eq!(order, ["vienna", "berlin"]);
        assert!((ranked[0].1 - munich.distance_km(&Position::new(48.2, 16.37))).abs() < 1.0);

        let small = Capacity::new(0.25, 1.0, 0.0);
        let ranked = rank_subtrees_for_placement(munich, &small, &[("nearby", &full_nearby), ("vienna", &vienna)]);
        assert_eq!(ranked[0].0, "nearby");
    }

    #[test]
    fn regions_are_sorted_by_distance() {
        let g = grid(&[(10.0, 10.0, 1.0), (20.0, 20.0, 1.0), (12.0, 12.0, 1.0), (15.0, 15.0, 0.0)]);
        let regions = g.regions_for(Position::new(10.0, 10.0), &Capacity::new(0.5, 0.0, 0.0));
        let distances: Vec<f64> = regions.iter().map(|r| r.1).collect();
        assert!(distances.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(regions.iter().map(|r| r.0.region.nodes).sum::<u32>(), 3, "the saturated node is not offered");
    }
}
