//! The planar lattice every capacity grid is drawn on.
//!
//! Projection: equirectangular (plate carrée) with `x = lon + 180°` and `y = lat + 90°`, in degrees. We chose it over
//! Web Mercator because (a) it is the same on every node without exchanging parameters, so grids from different
//! subtrees align exactly, (b) it is linear in latitude and longitude, so every cell is an exact lat/lon rectangle
//! (`cell_at`, rendering and the wire format need no trigonometry), and (c) it has no singularity at the poles
//! (Web Mercator stops at ±85.05°). Its east-west stretching away from the equator only changes how many kilometres
//! a cell spans, never which cell a node falls in; distances are always measured with haversine on real positions.
//!
//! Cells at level `z` are squares of `360 / 2^z` degrees aligned to multiples of that size, so they nest like a
//! quadtree: every cell at level `z` lies inside exactly one cell at every coarser level. That nesting is what makes
//! grid merging exact (see `merge`). Longitude does not wrap: a grid spanning the antimeridian becomes wide.

use crate::position::Position;
use serde::{Deserialize, Serialize};

/// Finest level: cells of 360/2^20 degrees, about 38 m at the equator. Geo-IP or configured positions are not more
/// precise than that, and the bound keeps indices small.
pub const MAX_LEVEL: u8 = 20;

/// Edge length in degrees of a cell at `level`.
pub fn cell_size_deg(level: u8) -> f64 {
    360.0 / f64::from(1u32 << level.min(MAX_LEVEL))
}

fn columns(level: u8) -> i32 {
    1 << level.min(MAX_LEVEL)
}

fn rows(level: u8) -> i32 {
    // 180° of latitude is half of 360°: one row at level 0, 2^(z-1) rows above.
    (columns(level) >> 1).max(1)
}

/// A cell of the lattice at some level: column counted eastwards from 180°W, row northwards from 90°S.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct CellIndex {
    pub col: i32,
    pub row: i32,
}

impl CellIndex {
    pub fn new(col: i32, row: i32) -> Self {
        Self { col, row }
    }

    /// The cell containing this one `levels` levels coarser (an arithmetic shift floors, also for negatives).
    pub fn coarsen(self, levels: u8) -> CellIndex {
        let shift = u32::from(levels).min(31);
        CellIndex { col: self.col >> shift, row: self.row >> shift }
    }
}

/// The lattice cell holding `position` at `level`; `None` for non-finite coordinates.
pub fn cell_of(position: Position, level: u8) -> Option<CellIndex> {
    let p = position.normalized()?;
    let size = cell_size_deg(level);
    let col = ((p.lon + 180.0) / size).floor() as i32;
    let row = ((p.lat + 90.0) / size).floor() as i32;
    // The north pole (y = 180) belongs to the top row rather than to a row of its own.
    Some(CellIndex { col: col.clamp(0, columns(level) - 1), row: row.clamp(0, rows(level) - 1) })
}

/// A lat/lon rectangle (degrees). Latitudes are clamped to [-90, 90].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CellBounds {
    pub south: f64,
    pub west: f64,
    pub north: f64,
    pub east: f64,
}

impl CellBounds {
    /// The rectangle covered by `cols x rows` cells at `level` starting at `origin` (its south-west cell).
    pub fn of_cells(origin: CellIndex, cols: u32, rows: u32, level: u8) -> CellBounds {
        let size = cell_size_deg(level);
        let west = f64::from(origin.col) * size - 180.0;
        let south = f64::from(origin.row) * size - 90.0;
        CellBounds {
            south: south.clamp(-90.0, 90.0),
            west,
            north: (south + f64::from(rows) * size).clamp(-90.0, 90.0),
            east: west + f64::from(cols) * size,
        }
    }

    /// Inclusive of all edges, so neighbouring rectangles share their border.
    pub fn contains(&self, p: Position) -> bool {
        p.lat >= self.south && p.lat <= self.north && p.lon >= self.west && p.lon <= self.east
    }

    /// `other` lies entirely within `self` (up to `tolerance_deg`).
    pub fn encloses(&self, other: &CellBounds, tolerance_deg: f64) -> bool {
        other.south >= self.south - tolerance_deg
            && other.north <= self.north + tolerance_deg
            && other.west >= self.west - tolerance_deg
            && other.east <= self.east + tolerance_deg
    }

    pub fn center(&self) -> Position {
        Position::new((self.south + self.north) / 2.0, (self.west + self.east) / 2.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_nest_across_levels() {
        let munich = Position::new(48.137, 11.575);
        let fine = cell_of(munich, 18).unwrap();
        for coarse_level in 0..18 {
            assert_eq!(fine.coarsen(18 - coarse_level), cell_of(munich, coarse_level).unwrap());
        }
    }

    #[test]
    fn cell_bounds_contain_the_position() {
        let p = Position::new(-33.87, 151.21);
        for level in 0..=MAX_LEVEL {
            let idx = cell_of(p, level).unwrap();
            let b = CellBounds::of_cells(idx, 1, 1, level);
            assert!(b.contains(p), "level {level}: {b:?}");
        }
    }

    #[test]
    fn poles_and_antimeridian_stay_inside_the_lattice() {
        for level in [0, 1, 5, MAX_LEVEL] {
            let north = cell_of(Position::new(90.0, 180.0), level).unwrap();
            assert_eq!(north.row, rows(level) - 1);
            assert_eq!(north.col, 0, "180°E wraps to 180°W");
            let south = cell_of(Position::new(-90.0, 179.999_999), level).unwrap();
            assert_eq!(south.row, 0);
            assert_eq!(south.col, columns(level) - 1);
        }
        assert!(cell_of(Position::new(f64::INFINITY, 0.0), 3).is_none());
    }

    #[test]
    fn negative_indices_coarsen_by_floor() {
        assert_eq!(CellIndex::new(-1, -3).coarsen(1), CellIndex::new(-1, -2));
    }
}
