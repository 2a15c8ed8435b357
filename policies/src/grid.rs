//! The capacity grid (VineIO, section 3.1.2): free capacity and node counts of a subtree, aggregated over an
//! `n x n` window of the shared lattice (see [`crate::lattice`]).
//!
//! Each cell keeps, for the nodes that fall in it: how many there are, the sum of their free capacity per resource,
//! the largest free capacity any single one of them has per resource (so "can this region host a service needing X"
//! is answered without false hope from many small leftovers), and their mean position (so distances to a region are
//! measured to where its nodes are, not to the middle of a possibly huge cell). Sums, maxima and node-weighted means
//! all aggregate exactly, which is what [`CapacityGrid::merge`] relies on.
//!
//! Storage is flat vectors of `f32`/`u32` in row-major order from the south-west cell, so the CBOR that rides on
//! heartbeats stays compact. Deserialization validates everything; a malformed grid from a peer is an error, never
//! a panic later.

use crate::lattice::{CellBounds, CellIndex, MAX_LEVEL, cell_of, cell_size_deg};
use crate::position::{Capacity, Position};
use serde::{Deserialize, Serialize};

/// Cells per side unless configured otherwise.
pub const DEFAULT_GRID_SIZE: u16 = 8;
/// Largest accepted side (64 x 64 cells is about 100 KB of CBOR; more is not a grid but a database).
pub const MAX_GRID_SIZE: u16 = 64;

pub(crate) const RESOURCES: usize = 3;

/// A subtree's capacity over a geographic rectangle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "GridWire")]
pub struct CapacityGrid {
    pub(crate) size: u16,
    pub(crate) level: u8,
    /// South-west cell of the window, at `level`.
    pub(crate) origin: CellIndex,
    /// Node count per cell.
    pub(crate) nodes: Vec<u32>,
    /// Summed free capacity, `RESOURCES` values per cell (cpu, mem, bandwidth).
    pub(crate) free: Vec<f32>,
    /// Largest free capacity of a single node, `RESOURCES` values per cell.
    pub(crate) largest: Vec<f32>,
    /// Mean (lat, lon) of the cell's nodes, 2 values per cell; zero for empty cells.
    pub(crate) centroid: Vec<f32>,
}

/// What a region (a cell, or a whole grid) holds.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RegionCapacity {
    pub nodes: u32,
    /// Sum over the region's nodes.
    pub free: Capacity,
    /// Resource-wise maximum over the region's nodes.
    pub largest: Capacity,
    /// Mean position of the region's nodes; `None` when it has none.
    pub centroid: Option<Position>,
}

impl RegionCapacity {
    /// Whether some node here may host `demand`: each resource is checked against the best node for that
    /// resource, so the answer is optimistic when the best CPU and the best memory sit on different nodes.
    pub fn can_host(&self, demand: &Capacity) -> bool {
        self.nodes > 0 && self.largest.fits(demand)
    }

    /// Mean free capacity per node (the node-count-weighted view VineIO describes).
    pub fn average(&self) -> Capacity {
        if self.nodes == 0 {
            return Capacity::ZERO;
        }
        let n = f64::from(self.nodes);
        Capacity::new(self.free.cpu / n, self.free.mem_mb / n, self.free.bandwidth_mbps / n)
    }
}

/// One cell of a grid, for queries and renderers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GridCell {
    /// Row counted northwards from the grid's southern edge.
    pub row: u16,
    /// Column counted eastwards from the grid's western edge.
    pub col: u16,
    pub bounds: CellBounds,
    pub region: RegionCapacity,
}

impl CapacityGrid {
    /// A grid with no nodes (level 0, so it sits at the lattice origin and covers the whole world).
    pub fn empty(size: u16) -> Self {
        let size = size.clamp(1, MAX_GRID_SIZE);
        let cells = usize::from(size) * usize::from(size);
        CapacityGrid {
            size,
            level: 0,
            origin: CellIndex::default(),
            nodes: vec![0; cells],
            free: vec![0.0; cells * RESOURCES],
            largest: vec![0.0; cells * RESOURCES],
            centroid: vec![0.0; cells * 2],
        }
    }

    /// The number arrays in the order the wire form lists them (node counts; free, largest and centroid values):
    /// the simulator sizes them in bulk, as it counts the bytes of millions of messages.
    pub fn number_arrays(&self) -> (&[u32], [&[f32]; 3]) {
        (&self.nodes, [&self.free, &self.largest, &self.centroid])
    }

    /// Cells per side.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Lattice level of the cells (cell edge = 360 / 2^level degrees).
    pub fn level(&self) -> u8 {
        self.level
    }

    pub fn cell_size_deg(&self) -> f64 {
        cell_size_deg(self.level)
    }

    /// The rectangle this grid spans.
    pub fn bounds(&self) -> CellBounds {
        CellBounds::of_cells(self.origin, u32::from(self.size), u32::from(self.size), self.level)
    }

    /// Total number of nodes in the grid.
    pub fn node_count(&self) -> u64 {
        self.nodes.iter().map(|&n| u64::from(n)).sum()
    }

    /// Index of the cell holding `position`, if the grid covers it.
    fn cell_index(&self, position: Position) -> Option<usize> {
        let idx = cell_of(position, self.level)?;
        let col = i64::from(idx.col) - i64::from(self.origin.col);
        let row = i64::from(idx.row) - i64::from(self.origin.row);
        let size = i64::from(self.size);
        if (0..size).contains(&col) && (0..size).contains(&row) { Some((row * size + col) as usize) } else { None }
    }

    fn region(&self, cell: usize) -> RegionCapacity {
        let nodes = self.nodes[cell];
        let values = |v: &[f32]| {
            let s = &v[cell * RESOURCES..(cell + 1) * RESOURCES];
            Capacity::new(f64::from(s[0]), f64::from(s[1]), f64::from(s[2]))
        };
        let centroid = (nodes > 0)
            .then(|| Position::new(f64::from(self.centroid[cell * 2]), f64::from(self.centroid[cell * 2 + 1])));
        RegionCapacity { nodes, free: values(&self.free), largest: values(&self.largest), centroid }
    }

    /// The region around `position`; `None` when the grid does not cover it.
    pub fn cell_at(&self, position: Position) -> Option<RegionCapacity> {
        self.cell_index(position).map(|cell| self.region(cell))
    }

    /// Whether the cell around `position` has a node that may host `demand` (false outside the grid).
    pub fn has_free_capacity(&self, position: Position, demand: &Capacity) -> bool {
        self.cell_at(position).is_some_and(|region| region.can_host(demand))
    }

    /// The free capacity summed over occupied cells, as [`CapacityGrid::total`] sums it.
    fn free_total(&self) -> [f64; RESOURCES] {
        let mut free = [0.0f64; RESOURCES];
        let occupied = self.nodes.iter().zip(self.free.chunks_exact(RESOURCES)).filter(|(n, _)| **n > 0);
        for (_, cell) in occupied {
            for r in 0..RESOURCES {
                free[r] += f64::from(cell[r]);
            }
        }
        free
    }

    /// The whole grid as one region.
    pub fn total(&self) -> RegionCapacity {
        let mut free = [0.0f64; RESOURCES];
        let mut largest = [0.0f64; RESOURCES];
        let (mut lat, mut lon, mut nodes) = (0.0f64, 0.0f64, 0u64);
        for cell in 0..self.nodes.len() {
            let n = self.nodes[cell];
            if n == 0 {
                continue;
            }
            for r in 0..RESOURCES {
                free[r] += f64::from(self.free[cell * RESOURCES + r]);
                largest[r] = larger(largest[r], f64::from(self.largest[cell * RESOURCES + r]));
            }
            lat += f64::from(self.centroid[cell * 2]) * f64::from(n);
            lon += f64::from(self.centroid[cell * 2 + 1]) * f64::from(n);
            nodes += u64::from(n);
        }
        let centroid = (nodes > 0).then(|| Position::new(lat / nodes as f64, lon / nodes as f64));
        RegionCapacity {
            nodes: u32::try_from(nodes).unwrap_or(u32::MAX),
            free: Capacity::from_array(free),
            largest: Capacity::from_array(largest),
            centroid,
        }
    }

    /// Every cell, row by row from the south-west corner.
    pub fn cells(&self) -> impl Iterator<Item = GridCell> + '_ {
        (0..self.nodes.len()).map(|cell| self.cell(cell))
    }

    fn cell(&self, cell: usize) -> GridCell {
        let size = usize::from(self.size);
        let (row, col) = (cell / size, cell % size);
        let idx = CellIndex::new(self.origin.col + col as i32, self.origin.row + row as i32);
        GridCell {
            row: row as u16,
            col: col as u16,
            bounds: CellBounds::of_cells(idx, 1, 1, self.level),
            region: self.region(cell),
        }
    }

    /// Cells that hold at least one node.
    pub fn occupied_cells(&self) -> impl Iterator<Item = GridCell> + '_ {
        (0..self.nodes.len()).filter(|&cell| self.nodes[cell] > 0).map(|cell| self.cell(cell))
    }

    /// The smallest (col, row) and the largest (col, row) within the window of the cells that hold a node (the two
    /// corners of their bounding box); `None` when no cell does.
    pub(crate) fn occupied_extent(&self) -> Option<((u16, u16), (u16, u16))> {
        let size = usize::from(self.size);
        let mut extent: Option<((u16, u16), (u16, u16))> = None;
        for (row, counts) in self.nodes.chunks_exact(size).enumerate() {
            let Some(first) = counts.iter().position(|&n| n > 0) else { continue };
            let last = counts.iter().rposition(|&n| n > 0).unwrap_or(first);
            let (row, first, last) = (row as u16, first as u16, last as u16);
            extent = Some(match extent {
                None => ((first, row), (last, row)),
                Some(((low, bottom), (high, _))) => ((low.min(first), bottom), (high.max(last), row)),
            });
        }
        extent
    }

    /// Whether `other` is different enough that a node should resend its grid. `threshold` is a fraction
    /// (0.1 = 10%). Any change of geometry, and any cell gaining its first node or losing its last, is significant.
    /// A cell's node count, free or largest capacity is significant when it moved by more than `threshold` of the
    /// larger of its old value, its new value and the grid's mean per occupied cell (so noise in nearly empty cells
    /// does not trigger resends, nor one more machine among a hundred: while thousands join, every join anywhere
    /// changed a count in every grid above it, and every grid of the tree was resent each heartbeat). A cell's
    /// centroid is significant when it moved by more than `threshold` of a cell edge. Senders refresh what they sent
    /// periodically, so changes below the threshold arrive late, not never.
    pub fn differs_significantly(&self, other: &CapacityGrid, threshold: f64) -> bool {
        if self.size != other.size || self.level != other.level || self.origin != other.origin {
            return true;
        }
        let threshold = if threshold.is_finite() { threshold.max(0.0) } else { 0.0 };
        let occupied = self.nodes.iter().filter(|&&n| n > 0).count().max(1) as f64;
        let mean_nodes = f64::from(self.nodes.iter().sum::<u32>().max(other.nodes.iter().sum())) / occupied;
        let nodes_moved = self.nodes.iter().zip(&other.nodes).any(|(&a, &b)| {
            (a == 0) != (b == 0) || f64::from(a.abs_diff(b)) > threshold * larger(f64::from(a.max(b)), mean_nodes)
        });
        if nodes_moved {
            return true;
        }
        let (mine, theirs) = (self.free_total(), other.free_total());
        let mean_cell: [f64; RESOURCES] = std::array::from_fn(|r| mine[r].max(theirs[r]) / occupied);
        // Cell by cell, all resources at once, without bounds checks: with `larger`, about half the instructions of
        // a pass per resource and field, for the same answer (nodes decide at every report whether to resend).
        let moved = |ours: &[f32], others: &[f32]| {
            ours.chunks_exact(RESOURCES).zip(others.chunks_exact(RESOURCES)).any(|(a, b)| {
                (0..RESOURCES).any(|r| {
                    let (a, b) = (f64::from(a[r]), f64::from(b[r]));
                    (a - b).abs() > threshold * larger(larger(a, b), mean_cell[r])
                })
            })
        };
        if moved(&self.free, &other.free) || moved(&self.largest, &other.largest) {
            return true;
        }
        let max_shift = threshold * self.cell_size_deg();
        self.centroid.iter().zip(&other.centroid).any(|(a, b)| f64::from((a - b).abs()) > max_shift)
    }
}

/// The larger of two numbers that are not NaN (a grid's are checked when it arrives, and sums of them stay finite):
/// one instruction, where `f64::max` takes five to return the other number when one is NaN. Grid comparisons and
/// merges take two per value.
#[inline]
pub(crate) fn larger(a: f64, b: f64) -> f64 {
    if a > b { a } else { b }
}

/// Why a received grid was rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GridError {
    #[error("grid size {0} is outside 1..={MAX_GRID_SIZE}")]
    Size(u16),
    #[error("grid level {0} is above {MAX_LEVEL}")]
    Level(u8),
    #[error("grid origin {0:?} lies outside the lattice")]
    Origin(CellIndex),
    #[error("grid field {field} has {actual} values, expected {expected}")]
    Length { field: &'static str, expected: usize, actual: usize },
    #[error("grid field {0} holds a negative or non-finite value")]
    Value(&'static str),
}

/// The wire shape, checked before it becomes a [`CapacityGrid`].
#[derive(Deserialize)]
struct GridWire {
    size: u16,
    level: u8,
    origin: CellIndex,
    nodes: Vec<u32>,
    free: Vec<f32>,
    largest: Vec<f32>,
    centroid: Vec<f32>,
}

impl TryFrom<GridWire> for CapacityGrid {
    type Error = GridError;

    fn try_from(w: GridWire) -> Result<Self, GridError> {
        if w.size == 0 || w.size > MAX_GRID_SIZE {
            return Err(GridError::Size(w.size));
        }
        if w.level > MAX_LEVEL {
            return Err(GridError::Level(w.level));
        }
        // Windows may hang over the lattice edge by a grid's width, never further.
        let limit = (1i32 << w.level) + i32::from(MAX_GRID_SIZE);
        if w.origin.col.abs() > limit || w.origin.row.abs() > limit {
            return Err(GridError::Origin(w.origin));
        }
        let cells = usize::from(w.size) * usize::from(w.size);
        for (field, expected, actual) in [
            ("nodes", cells, w.nodes.len()),
            ("free", cells * RESOURCES, w.free.len()),
            ("largest", cells * RESOURCES, w.largest.len()),
            ("centroid", cells * 2, w.centroid.len()),
        ] {
            if expected != actual {
                return Err(GridError::Length { field, expected, actual });
            }
        }
        for (field, values) in [("free", &w.free), ("largest", &w.largest)] {
            if values.iter().any(|v| !v.is_finite() || *v < 0.0) {
                return Err(GridError::Value(field));
            }
        }
        let centroid_ok = w.centroid.chunks_exact(2).all(|c| c[0].abs() <= 90.0 && c[1].abs() <= 180.0);
        if !centroid_ok {
            return Err(GridError::Value("centroid"));
        }
        Ok(CapacityGrid {
            size: w.size,
            level: w.level,
            origin: w.origin,
            nodes: w.nodes,
            free: w.free,
            largest: w.largest,
            centroid: w.centroid,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::GridInput;

    fn two_cities() -> CapacityGrid {
        CapacityGrid::merge(&[
            GridInput::Node { position: Position::new(48.137, 11.575), free: Capacity::new(4.0, 8192.0, 1000.0) },
            GridInput::Node { position: Position::new(52.520, 13.405), free: Capacity::new(0.0, 0.0, 0.0) },
        ])
    }

    #[test]
    fn cell_queries_find_the_nodes() {
        let grid = two_cities();
        let munich = grid.cell_at(Position::new(48.137, 11.575)).unwrap();
        assert_eq!(munich.nodes, 1);
        assert_eq!(munich.free.cpu, 4.0);
        assert!(grid.has_free_capacity(Position::new(48.137, 11.575), &Capacity::new(2.0, 100.0, 0.0)));
        assert!(!grid.has_free_capacity(Position::new(52.520, 13.405), &Capacity::MIN_USEFUL));
        assert!(grid.cell_at(Position::new(-33.0, 151.0)).is_none(), "Sydney is outside a Munich-Berlin grid");
        let total = grid.total();
        assert_eq!(total.nodes, 2);
        assert_eq!(total.average().cpu, 2.0);
        assert_eq!(grid.occupied_cells().count(), 2);
    }

    #[test]
    fn occupied_extent_boxes_the_occupied_cells() {
        assert_eq!(CapacityGrid::empty(8).occupied_extent(), None);
        let mut grid = CapacityGrid::empty(8);
        for (col, row) in [(5, 1), (2, 3), (6, 3), (4, 6)] {
            grid.nodes[row * 8 + col] = 1;
        }
        assert_eq!(grid.occupied_extent(), Some(((2, 1), (6, 6))));
        let grid = two_cities();
        let offsets: Vec<(u16, u16)> = grid.occupied_cells().map(|c| (c.col, c.row)).collect();
        let (low, high) = grid.occupied_extent().unwrap();
        assert_eq!(low, (offsets.iter().map(|o| o.0).min().unwrap(), offsets.iter().map(|o| o.1).min().unwrap()));
        assert_eq!(high, (offsets.iter().map(|o| o.0).max().unwrap(), offsets.iter().map(|o| o.1).max().unwrap()));
    }

    /// The definition, pass by pass as it was first written: the rewrite must answer as it does.
    fn differs_by_definition(old: &CapacityGrid, new: &CapacityGrid, threshold: f64) -> bool {
        if old.size != new.size || old.level != new.level || old.origin != new.origin {
            return true;
        }
        let threshold = if threshold.is_finite() { threshold.max(0.0) } else { 0.0 };
        let occupied = old.nodes.iter().filter(|&&n| n > 0).count().max(1) as f64;
        let mean_nodes = f64::from(old.nodes.iter().sum::<u32>().max(new.nodes.iter().sum())) / occupied;
        let nodes_moved = old.nodes.iter().zip(&new.nodes).any(|(&a, &b)| {
            (a == 0) != (b == 0) || f64::from(a.abs_diff(b)) > threshold * f64::from(a.max(b)).max(mean_nodes)
        });
        if nodes_moved {
            return true;
        }
        let (mine, theirs) = (old.total().free.to_array(), new.total().free.to_array());
        for r in 0..RESOURCES {
            let mean_cell = mine[r].max(theirs[r]) / occupied;
            for values in [(&old.free, &new.free), (&old.largest, &new.largest)] {
                for cell in 0..old.nodes.len() {
                    let (a, b) = (f64::from(values.0[cell * RESOURCES + r]), f64::from(values.1[cell * RESOURCES + r]));
                    if (a - b).abs() > threshold * a.max(b).max(mean_cell) {
                        return true;
                    }
                }
            }
        }
        let max_shift = threshold * old.cell_size_deg();
        old.centroid.iter().zip(&new.centroid).any(|(a, b)| f64::from((a - b).abs()) > max_shift)
    }

    proptest::proptest! {
        /// Grids of a few dozen machines, and the same grids with some values scaled: small changes, large ones, and
        /// none, against thresholds from 0 to 0.5.
        #[test]
        fn significance_agrees_with_its_definition(
            machines in proptest::collection::vec((47.0..49.0f64, 10.0..12.0f64, 0.0..64.0f64), 1..40),
            scales in proptest::collection::vec((0usize..192, 0.5..1.5f32), 0..4),
            threshold in 0.0..0.5f64,
        ) {
            let inputs: Vec<GridInput> = machines
                .iter()
                .map(|&(lat, lon, cpu)| GridInput::Node {
                    position: Position::new(lat, lon),
                    free: Capacity::new(cpu, 1024.0 + cpu * 10.0, 100.0),
                })
                .collect();
            let old = CapacityGrid::merge(&inputs);
            let mut new = old.clone();
            for &(at, scale) in &scales {
                let at = at % new.free.len();
                new.free[at] *= scale;
                new.largest[at] *= scale;
            }
            proptest::prop_assert_eq!(
                old.differs_significantly(&new, threshold),
                differs_by_definition(&old, &new, threshold)
            );
        }
    }

    #[test]
    fn significant_change_ignores_noise() {
        let grid = two_cities();
        let mut noisy = grid.clone();
        noisy.free[0] *= 1.01;
        assert!(!grid.differs_significantly(&noisy, 0.1));
        let mut changed = grid.clone();
        let munich = changed.nodes.iter().position(|&n| n > 0).unwrap();
        changed.free[munich * RESOURCES] = 1.0;
        assert!(grid.differs_significantly(&changed, 0.1));
        let mut more = grid.clone();
        more.nodes[munich] += 1;
        assert!(grid.differs_significantly(&more, 0.1));
        let empty = grid.nodes.iter().position(|&n| n == 0).unwrap();
        let mut first = grid.clone();
        first.nodes[empty] = 1;
        assert!(grid.differs_significantly(&first, 0.1), "a cell's first node is news");
    }

    #[test]
    fn one_more_node_among_many_is_not_significant() {
        let mut crowded = two_cities();
        let munich = crowded.nodes.iter().position(|&n| n > 0).unwrap();
        crowded.nodes[munich] = 100;
        let mut one_more = crowded.clone();
        one_more.nodes[munich] = 101;
        assert!(!crowded.differs_significantly(&one_more, 0.1));
        let mut many_more = crowded.clone();
        many_more.nodes[munich] = 115;
        assert!(crowded.differs_significantly(&many_more, 0.1));
        let mut gone = crowded.clone();
        let berlin = crowded.nodes.iter().rposition(|&n| n > 0).unwrap();
        gone.nodes[berlin] = 0;
        assert!(crowded.differs_significantly(&gone, 0.1), "a cell's last node leaving is news");
    }

    #[test]
    fn malformed_wire_grids_are_rejected() {
        let grid = two_cities();
        let mut bytes = Vec::new();
        ciborium::into_writer(&grid, &mut bytes).unwrap();
        let back: CapacityGrid = ciborium::from_reader(bytes.as_slice()).unwrap();
        assert_eq!(back, grid);

        let mut short = grid.clone();
        short.nodes.pop();
        let mut neg = grid.clone();
        neg.free[0] = -1.0;
        let mut huge = grid.clone();
        huge.level = MAX_LEVEL + 1;
        for bad in [short, neg, huge] {
            let mut bytes = Vec::new();
            ciborium::into_writer(&bad, &mut bytes).unwrap();
            assert!(ciborium::from_reader::<CapacityGrid, _>(bytes.as_slice()).is_err());
        }
        assert!(ciborium::from_reader::<CapacityGrid, _>(&b"\xa1\x61x\x01"[..]).is_err());
    }
}
