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

use crate::grid::{CapacityGrid, DEFAULT_GRID_SIZE, MAX_GRID_SIZE, RESOURCES};
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

/// Occupied extent of one input: inclusive south-west and north-east cells at `level`.
struct Footprint {
    low: CellIndex,
    high: CellIndex,
    level: u8,
}

impl Footprint {
    fn at(&self, level: u8) -> (CellIndex, CellIndex) {
        let shift = self.level - level;
        (self.low.coarsen(shift), self.high.coarsen(shift))
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
        let mut footprints = Vec::with_capacity(inputs.len());
        let mut finest = MAX_LEVEL;
        for input in inputs {
            match input {
                GridInput::Grid(grid) => {
                    let Some((low, high)) = grid.occupied_extent() else { continue };
                    let at = |(col, row): (u16, u16)| {
                        CellIndex::new(grid.origin.col + i32::from(col), grid.origin.row + i32::from(row))
                    };
                    finest = finest.min(grid.level);
                    footprints.push(Footprint { low: at(low), high: at(high), level: grid.level });
                }
                GridInput::Node { position, .. } => {
                    if let Some(cell) = cell_of(*position, MAX_LEVEL) {
                        footprints.push(Footprint { low: cell, high: cell, level: MAX_LEVEL });
                    }
                }
            }
        }
        if footprints.is_empty() {
            return CapacityGrid::empty(size);
        }

        // Finest level whose n x n window covers everything; level 0 always does (one cell spans the world).
        let span_fits = |level: u8| -> Option<(CellIndex, CellIndex)> {
            let mut low = CellIndex::new(i32::MAX, i32::MAX);
            let mut high = CellIndex::new(i32::MIN, i32::MIN);
            for f in &footprints {
                let (l, h) = f.at(level);
                low = CellIndex::new(low.col.min(l.col), low.row.min(l.row));
                high = CellIndex::new(high.col.max(h.col), high.row.max(h.row));
            }
            let fits = i64::from(high.col) - i64::from(low.col) < i64::from(size)
                && i64::from(high.row) - i64::from(low.row) < i64::from(size);
            fits.then_some((low, high))
        };
        let (level, (low, high)) = (0..=finest)
            .rev()
            .find_map(|level| span_fits(level).map(|b| (level, b)))
            .unwrap_or((0, Default::default()));
        // Centre the occupied extent in the window so renderings show margin on both sides.
        let centre = |low: i32, high: i32| low - (i32::from(size) - (high - low + 1)) / 2;
        let origin = CellIndex::new(centre(low.col, high.col), centre(low.row, high.row));

        let mut acc = Accumulator::new(size);
        let place = |cell: CellIndex, from_level: u8| -> usize {
            let c = cell.coarsen(from_level - level);
            let (col, row) = ((c.col - origin.col) as usize, (c.row - origin.row) as usize);
            row * usize::from(size) + col
        };
        for input in inputs {
            match input {
                GridInput::Grid(grid) => acc.add_grid(grid, |col, row| {
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
                    acc.add(place(cell, MAX_LEVEL), 1, free, free, Some(at));
                }
            }
        }
        acc.finish(size, level, origin)
    }
}

/// Output cells in `f64` while adding, so rounding to `f32` happens once.
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
                    maxima[r] = maxima[r].max(f64::from(largest[r]));
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
            *slot = slot.max(l);
        }
        if let Some(p) = centroid {
            self.position[cell * 2] += p.lat * f64::from(nodes);
            self.position[cell * 2 + 1] += p.lon * f64::from(nodes);
        }
    }

    fn finish(self, size: u16, level: u8, origin: CellIndex) -> CapacityGrid {
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

    #[test]
    fn antipodal_inputs_fall_back_to_coarse_levels() {
        let grid = CapacityGrid::merge_sized(2, &[node(89.9, -179.9, 1.0), node(-89.9, 179.9, 1.0)]);
        assert_eq!(grid.total().nodes, 2);
        assert!(grid.level() <= 1);
    }
}
