//! Properties of capacity-grid aggregation: what goes in comes out, wherever and in whatever order it goes in.

use canopy_policies::{Capacity, CapacityGrid, GridInput, Position};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Node {
    position: Position,
    free: Capacity,
}

fn node_in(center: (f64, f64), spread: f64) -> impl Strategy<Value = Node> {
    (-1.0..1.0f64, -1.0..1.0f64, 0.0..64.0f64, 0.0..65536.0f64, 0.0..10_000.0f64).prop_map(
        move |(dlat, dlon, cpu, mem, bw)| Node {
            position: Position::new(center.0 + dlat * spread, center.1 + dlon * spread),
            free: Capacity::new(cpu, mem, bw),
        },
    )
}

/// A subtree: nodes clustered around a centre, from a few metres to a continent across.
fn subtree() -> impl Strategy<Value = (u16, Vec<Node>)> {
    (-80.0..80.0f64, -170.0..170.0f64, prop_oneof![Just(0.0001), Just(0.05), Just(2.0), Just(8.0)], 1u16..12)
        .prop_flat_map(|(lat, lon, spread, size)| {
            (Just(size), prop::collection::vec(node_in((lat, lon), spread), 1..12))
        })
}

fn grid_of(size: u16, nodes: &[Node]) -> CapacityGrid {
    let inputs: Vec<GridInput> = nodes.iter().map(|n| GridInput::Node { position: n.position, free: n.free }).collect();
    CapacityGrid::merge_sized(size, &inputs)
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-5 * a.abs().max(b.abs()) + 1e-3
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn merge_conserves_covers_and_ignores_order(
        subtrees in prop::collection::vec(subtree(), 0..6),
        singles in prop::collection::vec(node_in((48.0, 11.0), 20.0), 0..4),
        size in 1u16..16,
        rotation in 0usize..10,
    ) {
        let grids: Vec<CapacityGrid> = subtrees.iter().map(|(s, nodes)| grid_of(*s, nodes)).collect();
        let mut inputs: Vec<GridInput> = grids.iter().map(GridInput::Grid).collect();
        inputs.extend(singles.iter().map(|n| GridInput::Node { position: n.position, free: n.free }));
        let merged = CapacityGrid::merge_sized(size, &inputs);
        let all_nodes: Vec<&Node> = subtrees.iter().flat_map(|(_, n)| n).chain(&singles).collect();

        // Node counts are conserved exactly.
        prop_assert_eq!(merged.node_count(), all_nodes.len() as u64);

        // Free capacity is conserved per resource (f32 storage: relative tolerance).
        let total = merged.total();
        let expected = all_nodes.iter().fold(Capacity::ZERO, |acc, n| acc + n.free);
        prop_assert!(close(total.free.cpu, expected.cpu), "{} vs {}", total.free.cpu, expected.cpu);
        prop_assert!(close(total.free.mem_mb, expected.mem_mb));
        prop_assert!(close(total.free.bandwidth_mbps, expected.bandwidth_mbps));
        let best = all_nodes.iter().fold(Capacity::ZERO, |acc, n| acc.max(&n.free));
        prop_assert!(close(total.largest.cpu, best.cpu));

        // The rectangle covers every occupied input cell and every node, and each node is counted in its cell.
        let bounds = merged.bounds();
        for grid in &grids {
            for cell in grid.occupied_cells() {
                prop_assert!(bounds.encloses(&cell.bounds, 1e-9), "{:?} does not enclose {:?}", bounds, cell.bounds);
            }
        }
        for n in &all_nodes {
            prop_assert!(bounds.contains(n.position));
            prop_assert!(merged.cell_at(n.position).is_some_and(|c| c.nodes > 0));
        }

        // Order does not matter: same geometry, same counts, same capacities up to rounding.
        let mut shuffled = inputs.clone();
        shuffled.reverse();
        let len = shuffled.len().max(1);
        shuffled.rotate_left(rotation % len);
        let again = CapacityGrid::merge_sized(size, &shuffled);
        prop_assert_eq!(again.bounds(), merged.bounds());
        prop_assert_eq!(again.level(), merged.level());
        for (a, b) in merged.cells().zip(again.cells()) {
            prop_assert_eq!(a.region.nodes, b.region.nodes);
            prop_assert!(close(a.region.free.cpu, b.region.free.cpu));
            prop_assert!(close(a.region.free.mem_mb, b.region.free.mem_mb));
            prop_assert_eq!(a.region.largest, b.region.largest);
        }
        prop_assert!(!merged.differs_significantly(&again, 0.01));

        // It survives the wire.
        let mut bytes = Vec::new();
        ciborium::into_writer(&merged, &mut bytes).unwrap();
        let decoded: CapacityGrid = ciborium::from_reader(bytes.as_slice()).unwrap();
        prop_assert_eq!(decoded, merged);
    }

    #[test]
    fn merging_level_by_level_equals_merging_at_once(
        subtrees in prop::collection::vec(subtree(), 1..5),
    ) {
        // A parent merging its children's grids sees the same totals as one node merging all leaves directly.
        let grids: Vec<CapacityGrid> = subtrees.iter().map(|(s, nodes)| grid_of(*s, nodes)).collect();
        let inputs: Vec<GridInput> = grids.iter().map(GridInput::Grid).collect();
        let tree = CapacityGrid::merge(&inputs);
        let flat: Vec<Node> = subtrees.iter().flat_map(|(_, n)| n.clone()).collect();
        let direct = grid_of(8, &flat);
        prop_assert_eq!(tree.node_count(), direct.node_count());
        prop_assert!(close(tree.total().free.cpu, direct.total().free.cpu));
        // The tree's grid can be no finer than its children's; the direct one may be finer.
        prop_assert!(tree.level() <= direct.level());
    }
}

#[test]
fn an_eight_by_eight_grid_is_small_on_the_wire() {
    // 40 nodes spread over Europe: a realistic coordinator grid.
    let inputs: Vec<GridInput> = (0..40)
        .map(|i| {
            let f = f64::from(i);
            GridInput::Node {
                position: Position::new(40.0 + (f * 7.3) % 15.0, -5.0 + (f * 11.7) % 30.0),
                free: Capacity::new(f % 8.0, 512.0 * f, 100.0 + f),
            }
        })
        .collect();
    let grid = CapacityGrid::merge(&inputs);
    let mut bytes = Vec::new();
    ciborium::into_writer(&grid, &mut bytes).unwrap();
    println!("8x8 grid with {} occupied cells: {} bytes of CBOR", grid.occupied_cells().count(), bytes.len());
    println!("{}", grid.to_ascii(canopy_policies::Resource::Cpu));
    assert!(bytes.len() < 4096, "{} bytes", bytes.len());
}
