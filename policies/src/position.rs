//! Where a machine is and what it can still take.

use serde::{Deserialize, Serialize};

/// A geographic position in degrees (WGS84).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Position {
    pub lat: f64,
    pub lon: f64,
}

impl Position {
    pub fn new(lat: f64, lon: f64) -> Self {
        Self { lat, lon }
    }

    /// Great-circle distance in kilometres (haversine, via the `geo` crate).
    pub fn distance_km(&self, other: &Position) -> f64 {
        use geo::{Distance, Haversine, Point};
        Haversine.distance(Point::new(self.lon, self.lat), Point::new(other.lon, other.lat)) / 1000.0
    }
}

/// Free capacity of a machine (or, summed, of a region). Units: CPU cores, memory MiB, bandwidth Mbit/s.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Capacity {
    pub cpu: f64,
    pub mem_mb: f64,
    pub bandwidth_mbps: f64,
}
