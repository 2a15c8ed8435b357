//! Grid aggregation: a node merges its children's grids and its own capacity into the grid it sends up the tree.
//!
//! VineIO's algorithm projects inputs to the plane, brings them to a common cell size (upscaling coarse grids),
//! inserts grids and single capacities into one large matrix, and downscales that to `n x n`, weighting by node
//! counts. Here all grids live on one power-of-two lattice (see [`crate::lattice`]), which makes the same
//! computation exact and cheap:
//!
//! 1. project every input to lattice cells (grids already are; a single capacity goes to its finest-level cell);
//! 2. pick the finest level, no finer than the coarsest input grid, at which an `n x n` window covers every
//!    occupied input cell — that window is the downscaled result of the common-cell-size matrix;
//! 3. since output cells are at least as coarse as every input cell and both are lattice-aligned, every input cell
//!    lies inside exactly one output cell: add node counts and capacity sums, take maxima, and average positions
//!    weighted by node count.
//!
//! Skipping the explicit common-cell-size matrix matters: a city-level grid (cells of tens of metres) merged with a
//! continent-level one would need billions of intermediate cells, while the result is identical.

use crate::grid::{CapacityGrid, DEFAULT_GRID_SIZE, MAX_GRID_SIZE, RESOURCES, larger};
use crate::lattice::{CellIndex, MAX_LEVEL, cell_of};
use crate::position::{Capacity, Position};

/// One thing to merge.
#[derive(Debug, Clone, Copy)]
pub enum GridInput<'a> {
    /// A child's subtree grid.
    Grid(&'a CapacityGrid),
    /// A single node's free capacity at its position (this node's own, or a leaf child without a grid).
    /// Non-finite positions are skipped; negative or non-finite capacities count as zero.
    Node { position: Position, free: Capacity },
}

/// Occupied extent of one input, or of several: inclusive south-west and north-east cells at `level`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Footprint {
    low: CellIndex,
    high: CellIndex,
    level: u8,
}

impl Footprint {
    fn of(input: &GridInput<'_>) -> Option<Footprint> {
        match input {
            GridInput::Grid(grid) => {
                let (low, high) = grid.occupied_extent()?;
                let at = |(col, row): (u16, u16)| {
                    CellIndex::new(grid.origin.col + i32::from(col), grid.origin.row + i32::from(row))
                };
                Some(Footprint { low: at(low), high: at(high), level: grid.level })
            }
            GridInput::Node { position, .. } => {
                cell_of(*position, MAX_LEVEL).map(|cell| Footprint { low: cell, high: cell, level: MAX_LEVEL })
            }
        }
    }

    /// The union of the footprints of `inputs` (`None`: nothing occupied).
    fn union_of(inputs: &[GridInput<'_>]) -> Option<Footprint> {
        inputs.iter().filter_map(Footprint::of).reduce(Footprint::union)
    }

    /// Both extents at the finer level both can be given at. Coarsening floors, which keeps minima and maxima, so
    /// the union coarsened to any level is the union of the coarsened extents.
    fn union(self, other: Footprint) -> Footprint {
        let level = self.level.min(other.level);
        let ((a, b), (c, d)) = (self.at(level), other.at(level));
        Footprint {
            low: CellIndex::new(a.col.min(c.col), a.row.min(c.row)),
            high: CellIndex::new(b.col.max(d.col), b.row.max(d.row)),
            level,
        }
    }

    fn at(&self, level: u8) -> (CellIndex, CellIndex) {
        let shift = self.level - level;
        (self.low.coarsen(shift), self.high.coarsen(shift))
    }

    /// The output window: the finest level, no finer than this extent, whose `size x size` cells cover it (level 0
    /// always does: one cell spans the world), with the extent centred in it.
    fn window(&self, size: u16) -> Window {
        let fits = |level: u8| {
            let (low, high) = self.at(level);
            let fits = i64::from(high.col) - i64::from(low.col) < i64::from(size)
                && i64::from(high.row) - i64::from(low.row) < i64::from(size);
            fits.then_some((level, low, high))
        };
        let (level, low, high) =
            (0..=self.level).rev().find_map(fits).unwrap_or((0, Default::default(), Default::default()));
        // Centre the occupied extent in the window so renderings show margin on both sides.
        let centre = |low: i32, high: i32| low - (i32::from(size) - (high - low + 1)) / 2;
        Window { size, level, origin: CellIndex::new(centre(low.col, high.col), centre(low.row, high.row)) }
    }
}

/// Where a merge writes: `size x size` cells at `level` from `origin`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Window {
    size: u16,
    level: u8,
    origin: CellIndex,
}

/// What merges that share all inputs but the last can reuse: the shared inputs' extent and their sums in the last
/// window used. A coordinator rebuilds the grid of everything outside its children's subtrees (itself, its siblings
/// and the rest of the tree) whenever the rest of the tree changed, which is every change anywhere; after the join
/// phase of a 10,000-node run most merges are such rebuilds, and 45% of them found the node's own and its siblings'
/// sums as they were (bench_10k ran in 0.97 of the time, holding about 9% more memory).
#[derive(Default)]
pub struct MergeCache {
    /// `None`: not computed since the shared inputs changed; `Some(None)`: none of them is occupied.
    shared_extent: Option<Option<Footprint>>,
    shared_sums: Option<(Window, Accumulator)>,
}

impl MergeCache {
    /// The shared inputs changed: nothing cached applies any more.
    pub fn clear(&mut self) {
        *self = MergeCache::default();
    }
}

impl CapacityGrid {
    /// Merges into a grid of [`DEFAULT_GRID_SIZE`] cells per side.
    pub fn merge(inputs: &[GridInput<'_>]) -> CapacityGrid {
        Self::merge_sized(DEFAULT_GRID_SIZE, inputs)
    }

    /// Merges into a grid of `size x size` cells (clamped to `1..=MAX_GRID_SIZE`). The result covers every
    /// occupied input cell and every input node, conserves node counts and summed capacity, and does not depend on
    /// input order (up to float rounding of the sums).
    pub fn merge_sized(size: u16, inputs: &[GridInput<'_>]) -> CapacityGrid {
        let size = size.clamp(1, MAX_GRID_SIZE);
        let Some(extent) = Footprint::union_of(inputs) else { return CapacityGrid::empty(size) };
        let window = extent.window(size);
        let mut acc = Accumulator::new(size);
        acc.add_inputs(window, inputs);
        acc.finish(window)
    }

    /// The same grid as `merge_sized(size, shared ++ [last])`, bit for bit, reusing what `cache` holds of `shared`
    /// from earlier calls. The caller clears `cache` whenever `shared` changes.
    pub fn merge_sized_cached(
        size: u16,
        shared: &[GridInput<'_>],
        last: Option<GridInput<'_>>,
        cache: &mut MergeCache,
    ) -> CapacityGrid {
        let size = size.clamp(1, MAX_GRID_SIZE);
        let shared_extent = *cache.shared_extent.get_or_insert_with(|| Footprint::union_of(shared));
        let last_extent = last.as_ref().and_then(Footprint::of);
        let extent = match (shared_extent, last_extent) {
            (Some(a), Some(b)) => a.union(b),
            (Some(one), None) | (None, Some(one)) => one,
            (None, None) => return CapacityGrid::empty(size),
        };
        let window = extent.window(size);
        let mut acc = match &cache.shared_sums {
            Some((at, sums)) if *at == window => sums.clone(),
            _ => {
                let mut sums = Accumulator::new(size);
                sums.add_inputs(window, shared);
                cache.shared_sums = Some((window, sums.clone()));
                sums
            }
        };
        acc.add_inputs(window, last.as_slice());
        acc.finish(window)
    }
}

/// Output cells in `f64` while adding, so rounding to `f32` happens once.
#[derive(Clone)]
struct Accumulator {
    nodes: Vec<u64>,
    free: Vec<f64>,
    largest: Vec<f64>,
    /// Node-weighted sums of latitude and longitude.
    position: Vec<f64>,
}

impl Accumulator {
    fn new(size: u16) -> Self {
        let cells = usize::from(size) * usize::from(size);
        Accumulator {
            nodes: vec![0; cells],
            free: vec![0.0; cells * RESOURCES],
            largest: vec![0.0; cells * RESOURCES],
            position: vec![0.0; cells * 2],
        }
    }

    /// Adds every occupied cell of `grid` to the output cell `place(col, row)` gives: the same sums as [`Self::add`]
    /// on each cell's region, read straight from the grid's arrays (merging is a large part of a big simulation).
    fn add_grid(&mut self, grid: &CapacityGrid, place: impl Fn(u16, u16) -> usize) {
        let size = usize::from(grid.size);
        let rows = grid.nodes.chunks_exact(size).zip(grid.free.chunks_exact(size * RESOURCES));
        let rows = rows.zip(grid.largest.chunks_exact(size * RESOURCES)).zip(grid.centroid.chunks_exact(size * 2));
        for (row, (((counts, free), largest), centroid)) in rows.enumerate() {
            for (col, &nodes) in counts.iter().enumerate() {
                if nodes == 0 {
                    continue;
                }
                let out = place(col as u16, row as u16);
                self.nodes[out] += u64::from(nodes);
                let (free, largest) = (&free[col * RESOURCES..][..RESOURCES], &largest[col * RESOURCES..][..RESOURCES]);
                let (sums, maxima) =
                    (&mut self.free[out * RESOURCES..][..RESOURCES], &mut self.largest[out * RESOURCES..][..RESOURCES]);
                for r in 0..RESOURCES {
                    sums[r] += f64::from(free[r]);
                    maxima[r] = larger(maxima[r], f64::from(largest[r]));
                }
                let (at, sum) = (&centroid[col * 2..][..2], &mut self.position[out * 2..][..2]);
                sum[0] += f64::from(at[0]) * f64::from(nodes);
                sum[1] += f64::from(at[1]) * f64::from(nodes);
            }
        }
    }

    fn add(&mut self, cell: usize, nodes: u32, free: Capacity, largest: Capacity, centroid: Option<Position>) {
        if nodes == 0 {
            return;
        }
        self.nodes[cell] += u64::from(nodes);
        for (r, (f, l)) in free.to_array().into_iter().zip(largest.to_array()).enumerate() {
            self.free[cell * RESOURCES + r] += f;
            let slot = &mut self.largest[cell * RESOURCES + r];
            *slot = larger(*slot, l);
        }
        if let Some(p) = centroid {
            self.position[cell * 2] += p.lat * f64::from(nodes);
            self.position[cell * 2 + 1] += p.lon * f64::from(nodes);
        }
    }

    /// Adds `inputs`, in order, into the cells of `window` (which covers all of them).
    fn add_inputs(&mut self, window: Window, inputs: &[GridInput<'_>]) {
        let size = usize::from(window.size);
        let place = |cell: CellIndex, from_level: u8| -> usize {
            let c = cell.coarsen(from_level - window.level);
            let (col, row) = ((c.col - window.origin.col) as usize, (c.row - window.origin.row) as usize);
            row * size + col
        };
        for input in inputs {
            match input {
                GridInput::Grid(grid) => self.add_grid(grid, |col, row| {
                    place(
                        CellIndex::new(grid.origin.col + i32::from(col), grid.origin.row + i32::from(row)),
                        grid.level,
                    )
                }),
                GridInput::Node { position, free } => {
                    let (Some(cell), Some(at)) = (cell_of(*position, MAX_LEVEL), position.normalized()) else {
                        continue;
                    };
                    let free = free.sanitized();
                    self.add(place(cell, MAX_LEVEL), 1, free, free, Some(at));
                }
            }
        }
    }

    fn finish(self, window: Window) -> CapacityGrid {
        let Window { size, level, origin } = window;
        let mut centroid = vec![0.0f32; self.position.len()];
        for (cell, &n) in self.nodes.iter().enumerate() {
            if n > 0 {
                centroid[cell * 2] = (self.position[cell * 2] / n as f64) as f32;
                centroid[cell * 2 + 1] = (self.position[cell * 2 + 1] / n as f64) as f32;
            }
        }
        CapacityGrid {
            size,
            level,
            origin,
            nodes: self.nodes.iter().map(|&n| u32::try_from(n).unwrap_or(u32::MAX)).collect(),
            free: self.free.iter().map(|&v| to_finite_f32(v)).collect(),
            largest: self.largest.iter().map(|&v| to_finite_f32(v)).collect(),
            centroid,
        }
    }
}

/// Sums of huge peer-reported values may exceed `f32`; saturate so the grid stays valid on the wire.
fn to_finite_f32(v: f64) -> f32 {
    v.min(f64::from(f32::MAX)) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(lat: f64, lon: f64, cpu: f64) -> GridInput<'static> {
        GridInput::Node { position: Position::new(lat, lon), free: Capacity::new(cpu, 1024.0, 100.0) }
    }

    #[test]
    fn a_lone_node_gets_the_finest_level() {
        let grid = CapacityGrid::merge(&[node(48.1, 11.5, 2.0)]);
        assert_eq!(grid.level(), MAX_LEVEL);
        assert_eq!(grid.total().nodes, 1);
        assert!(grid.bounds().contains(Position::new(48.1, 11.5)));
    }

    #[test]
    fn merging_up_a_tree_conserves_nodes_and_capacity() {
        let munich = CapacityGrid::merge(&[node(48.10, 11.50, 1.0), node(48.20, 11.60, 2.0), node(48.15, 11.55, 3.0)]);
        let berlin = CapacityGrid::merge(&[node(52.50, 13.40, 4.0), node(52.55, 13.30, 5.0)]);
        let germany = CapacityGrid::merge(&[GridInput::Grid(&munich), GridInput::Grid(&berlin), node(50.1, 8.7, 6.0)]);
        let total = germany.total();
        assert_eq!(total.nodes, 6);
        assert!((total.free.cpu - 21.0).abs() < 1e-4);
        assert_eq!(total.largest.cpu, 6.0);
        assert!(germany.level() < munich.level(), "the merged grid is coarser");
        let b = germany.bounds();
        assert!(b.encloses(&munich.occupied_cells().next().unwrap().bounds, 1e-9));
        // Berlin's nodes are found again near Berlin (they may straddle a cell border).
        let berlin_pos = Position::new(52.52, 13.35);
        let near_berlin: u32 = germany
            .occupied_cells()
            .filter(|c| c.region.centroid.unwrap().distance_km(&berlin_pos) < 30.0)
            .map(|c| c.region.nodes)
            .sum();
        assert_eq!(near_berlin, 2);
        assert!(germany.cell_at(Position::new(52.50, 13.40)).unwrap().nodes >= 1);
    }

    #[test]
    fn bad_inputs_are_skipped_or_cleaned() {
        let grid = CapacityGrid::merge(&[
            GridInput::Node { position: Position::new(f64::NAN, 0.0), free: Capacity::new(1.0, 1.0, 1.0) },
            GridInput::Node { position: Position::new(10.0, 10.0), free: Capacity::new(-5.0, f64::NAN, 3.0) },
            GridInput::Grid(&CapacityGrid::empty(4)),
        ]);
        let total = grid.total();
        assert_eq!(total.nodes, 1);
        assert_eq!(total.free, Capacity::new(0.0, 0.0, 3.0));
        assert_eq!(CapacityGrid::merge(&[]).total().nodes, 0);
    }

    #[test]
    fn huge_values_saturate_instead_of_becoming_infinite() {
        let huge = Capacity::new(f64::from(f32::MAX), 1.0, 1.0);
        let grid = CapacityGrid::merge(&[
            GridInput::Node { position: Position::new(1.0, 1.0), free: huge },
            GridInput::Node { position: Position::new(1.0, 1.0), free: huge },
        ]);
        assert!(grid.total().free.cpu.is_finite());
        let mut bytes = Vec::new();
        ciborium::into_writer(&grid, &mut bytes).unwrap();
        assert!(ciborium::from_reader::<CapacityGrid, _>(bytes.as_slice()).is_ok());
    }

    /// Grids of a few nodes each around (lat, lon), `spread` degrees wide.
    fn clusters(seeds: &[(f64, f64, f64)], spread: f64) -> Vec<CapacityGrid> {
        seeds
            .iter()
            .map(|&(lat, lon, cpu)| {
                CapacityGrid::merge(&[
                    node(lat, lon, cpu),
                    node(lat + spread, lon - spread, cpu / 2.0),
                    node(lat - spread, lon + spread / 3.0, 1.0),
                ])
            })
            .collect()
    }

    proptest::proptest! {
        /// A cached merge is the plain merge bit for bit, whatever the last input, while the shared ones stay.
        #[test]
        fn cached_merge_is_the_plain_merge(
            own in (30.0..60.0f64, -10.0..30.0f64),
            siblings in proptest::collection::vec((30.0..60.0f64, -10.0..30.0f64, 0.0..64.0f64), 0..6),
            lasts in proptest::collection::vec((30.0..60.0f64, -10.0..30.0f64, 0.0..64.0f64, 0.001..5.0f64), 1..5),
            spread in 0.001..3.0f64,
        ) {
            let grids = clusters(&siblings, spread);
            let mut shared = vec![node(own.0, own.1, 4.0)];
            shared.extend(grids.iter().map(GridInput::Grid));
            let mut cache = MergeCache::default();
            for &(lat, lon, cpu, last_spread) in &lasts {
                let last_grid = clusters(&[(lat, lon, cpu)], last_spread).remove(0);
                for last in [Some(GridInput::Grid(&last_grid)), Some(node(lat, lon, cpu)), None] {
                    let mut all = shared.clone();
                    all.extend(last);
                    // The second time the shared sums come from the cache.
                    for _ in 0..2 {
                        let cached = CapacityGrid::merge_sized_cached(8, &shared, last, &mut cache);
                        proptest::prop_assert_eq!(cached, CapacityGrid::merge_sized(8, &all));
                    }
                }
            }
            // After the shared inputs change (and the cache is cleared), it follows them.
            shared.truncate(1);
            cache.clear();
            let last = clusters(&[(45.0, 5.0, 3.0)], 0.5).remove(0);
            let cached = CapacityGrid::merge_sized_cached(8, &shared, Some(GridInput::Grid(&last)), &mut cache);
            proptest::prop_assert_eq!(cached, CapacityGrid::merge_sized(8, &[shared[0], GridInput::Grid(&last)]));
        }
    }

    #[test]
    fn antipodal_inputs_fall_back_to_coarse_levels() {
        let grid = CapacityGrid::merge_sized(2, &[node(89.9, -179.9, 1.0), node(-89.9, 179.9, 1.0)]);
        assert_eq!(grid.total().nodes, 2);
        assert!(grid.level() <= 1);
    }
}
