//! Text rendering of a capacity grid (for `agent status`, logs and tests). PNG renderers in other crates use
//! [`CapacityGrid::cells`] instead; nothing here does I/O.

use crate::grid::CapacityGrid;
use crate::position::Resource;
use std::fmt::Write;

/// Shades from least to most free capacity; a blank cell has no nodes.
const SHADES: &[u8] = b".:-=+*#%@";

impl CapacityGrid {
    /// A heatmap of the summed free `resource` per cell, north at the top, with the rectangle and a legend.
    pub fn to_ascii(&self, resource: Resource) -> String {
        let size = usize::from(self.size);
        let r = resource.index();
        let max = (0..size * size)
            .filter(|&c| self.nodes[c] > 0)
            .map(|c| f64::from(self.free[c * crate::grid::RESOURCES + r]))
            .fold(0.0f64, f64::max);
        let b = self.bounds();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "free {} ({}) per cell, {}x{} cells of {:.4}°, lat {:.4}..{:.4}, lon {:.4}..{:.4}",
            resource,
            resource.unit(),
            size,
            size,
            self.cell_size_deg(),
            b.south,
            b.north,
            b.west,
            b.east
        );
        let _ = writeln!(out, "+{}+", "-".repeat(size));
        for row in (0..size).rev() {
            out.push('|');
            for col in 0..size {
                let cell = row * size + col;
                if self.nodes[cell] == 0 {
                    out.push(' ');
                    continue;
                }
                let value = f64::from(self.free[cell * crate::grid::RESOURCES + r]);
                let shade = if max > 0.0 {
                    ((value / max) * (SHADES.len() - 1) as f64).round().clamp(0.0, (SHADES.len() - 1) as f64) as usize
                } else {
                    0
                };
                out.push(char::from(SHADES[shade]));
            }
            out.push_str("|\n");
        }
        let _ = writeln!(out, "+{}+", "-".repeat(size));
        let step = max / (SHADES.len() - 1) as f64;
        let _ = write!(out, "legend: ' ' no nodes");
        for (i, shade) in SHADES.iter().enumerate() {
            let _ = write!(out, ", '{}' ~{:.2}", char::from(*shade), step * i as f64);
        }
        let total = self.total();
        let _ =
            writeln!(out, "\ntotal: {} nodes, {:.2} {} free", total.nodes, total.free.get(resource), resource.unit());
        out
    }
}

#[cfg(test)]
mod tests {
    use crate::grid::CapacityGrid;
    use crate::merge::GridInput;
    use crate::position::{Capacity, Position, Resource};

    #[test]
    fn heatmap_marks_the_richest_cell_and_leaves_empty_cells_blank() {
        let grid = CapacityGrid::merge_sized(
            4,
            &[
                GridInput::Node { position: Position::new(10.0, 10.0), free: Capacity::new(8.0, 0.0, 0.0) },
                GridInput::Node { position: Position::new(13.0, 13.0), free: Capacity::new(0.0, 0.0, 0.0) },
            ],
        );
        let text = grid.to_ascii(Resource::Cpu);
        println!("{text}");
        let rows: Vec<&str> = text.lines().filter(|l| l.starts_with('|')).collect();
        assert_eq!(rows.len(), 4);
        let joined: String = rows.concat();
        assert_eq!(joined.matches('@').count(), 1);
        assert_eq!(joined.matches('.').count(), 1);
        assert_eq!(joined.matches(' ').count(), 14);
        // The richer node is further south and west: its '@' is below and left of the '.'.
        let at = rows.iter().position(|r| r.contains('@')).unwrap();
        let dot = rows.iter().position(|r| r.contains('.')).unwrap();
        assert!(at > dot);
        assert!(text.contains("legend"));
        assert!(text.contains("total: 2 nodes, 8.00 cores free"));
    }
}
