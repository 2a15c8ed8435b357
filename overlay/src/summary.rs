//! Compact subtree summaries that children report up, so coordinators can route joins towards the nearest
//! subtree and balance by size.

use canopy_policies::Position;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Nodes in the subtree, its top included.
    pub size: u32,
    /// Levels in the subtree: 1 for a leaf.
    pub height: u16,
    /// Mean position of the subtree's nodes.
    pub centroid: Position,
}

impl Summary {
    pub fn leaf(position: Position) -> Self {
        Summary { size: 1, height: 1, centroid: position }
    }

    /// The summary of a node at `position` above subtrees `children`.
    pub fn aggregate<'a>(position: Position, children: impl IntoIterator<Item = &'a Summary>) -> Self {
        let mut size: u64 = 1;
        let mut height = 0u16;
        let (mut lat, mut lon) = (position.lat, position.lon);
        for c in children {
            let w = c.size as f64;
            lat += c.centroid.lat * w;
            lon += c.centroid.lon * w;
            size += c.size as u64;
            height = height.max(c.height);
        }
        let n = size as f64;
        Summary {
            size: size.min(u32::MAX as u64) as u32,
            height: height.saturating_add(1),
            centroid: Position::new(lat / n, lon / n),
        }
    }

    pub fn is_valid(&self) -> bool {
        self.size >= 1 && self.height >= 1 && self.centroid.lat.is_finite() && self.centroid.lon.is_finite()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregate_weights_by_size() {
        let a = Summary { size: 3, height: 2, centroid: Position::new(10.0, 0.0) };
        let b = Summary::leaf(Position::new(0.0, 0.0));
        let s = Summary::aggregate(Position::new(0.0, 0.0), [&a, &b]);
        assert_eq!(s.size, 5);
        assert_eq!(s.height, 3);
        assert!((s.centroid.lat - 6.0).abs() < 1e-9);
    }
}
