//! Where a machine is and what it can still take.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::ops::Add;
use std::str::FromStr;

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

    /// The same place with latitude clamped to [-90, 90] and longitude wrapped into [-180, 180);
    /// `None` when a coordinate is not a finite number (such a position is unusable, not fixable).
    pub fn normalized(&self) -> Option<Position> {
        if !self.lat.is_finite() || !self.lon.is_finite() {
            return None;
        }
        let lon = (self.lon + 180.0).rem_euclid(360.0) - 180.0;
        Some(Position { lat: self.lat.clamp(-90.0, 90.0), lon })
    }
}

/// One kind of resource a machine offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Resource {
    Cpu,
    Mem,
    Bandwidth,
}

impl Resource {
    pub const ALL: [Resource; 3] = [Resource::Cpu, Resource::Mem, Resource::Bandwidth];

    /// Position of this resource in [`Capacity::to_array`].
    pub fn index(self) -> usize {
        match self {
            Resource::Cpu => 0,
            Resource::Mem => 1,
            Resource::Bandwidth => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Resource::Cpu => "cpu",
            Resource::Mem => "mem",
            Resource::Bandwidth => "bandwidth",
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Resource::Cpu => "cores",
            Resource::Mem => "MiB",
            Resource::Bandwidth => "Mbit/s",
        }
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown resource {0:?} (expected cpu, mem or bandwidth)")]
pub struct UnknownResource(pub String);

impl FromStr for Resource {
    type Err = UnknownResource;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Resource::ALL.into_iter().find(|r| r.as_str() == s).ok_or_else(|| UnknownResource(s.to_owned()))
    }
}

/// Free capacity of a machine (or, summed, of a region). Units: CPU cores, memory MiB, bandwidth Mbit/s.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Capacity {
    pub cpu: f64,
    pub mem_mb: f64,
    pub bandwidth_mbps: f64,
}

impl Capacity {
    pub const ZERO: Capacity = Capacity { cpu: 0.0, mem_mb: 0.0, bandwidth_mbps: 0.0 };

    /// Below this a machine counts as saturated: 1% of a core or 1 MiB of memory cannot host anything useful.
    /// Bandwidth is not part of the floor because many machines cannot measure it.
    pub const MIN_USEFUL: Capacity = Capacity { cpu: 0.01, mem_mb: 1.0, bandwidth_mbps: 0.0 };

    pub fn new(cpu: f64, mem_mb: f64, bandwidth_mbps: f64) -> Self {
        Self { cpu, mem_mb, bandwidth_mbps }
    }

    pub fn get(&self, resource: Resource) -> f64 {
        match resource {
            Resource::Cpu => self.cpu,
            Resource::Mem => self.mem_mb,
            Resource::Bandwidth => self.bandwidth_mbps,
        }
    }

    pub fn to_array(&self) -> [f64; 3] {
        [self.cpu, self.mem_mb, self.bandwidth_mbps]
    }

    pub fn from_array(values: [f64; 3]) -> Self {
        Self { cpu: values[0], mem_mb: values[1], bandwidth_mbps: values[2] }
    }

    /// True when every resource is at least what `demand` asks for.
    pub fn fits(&self, demand: &Capacity) -> bool {
        self.cpu >= demand.cpu && self.mem_mb >= demand.mem_mb && self.bandwidth_mbps >= demand.bandwidth_mbps
    }

    /// Negative or non-finite readings (a broken probe, a malicious peer) become zero.
    pub fn sanitized(&self) -> Capacity {
        let clean = |v: f64| if v.is_finite() && v > 0.0 { v } else { 0.0 };
        Capacity { cpu: clean(self.cpu), mem_mb: clean(self.mem_mb), bandwidth_mbps: clean(self.bandwidth_mbps) }
    }

    /// Resource-wise maximum.
    pub fn max(&self, other: &Capacity) -> Capacity {
        Capacity {
            cpu: self.cpu.max(other.cpu),
            mem_mb: self.mem_mb.max(other.mem_mb),
            bandwidth_mbps: self.bandwidth_mbps.max(other.bandwidth_mbps),
        }
    }

    /// Ordering used by the highest-capacity policies: more free CPU first, then memory, then bandwidth.
    pub fn cmp_for_hc(&self, other: &Capacity) -> std::cmp::Ordering {
        self.cpu
            .total_cmp(&other.cpu)
            .then(self.mem_mb.total_cmp(&other.mem_mb))
            .then(self.bandwidth_mbps.total_cmp(&other.bandwidth_mbps))
    }
}

impl Add for Capacity {
    type Output = Capacity;
    fn add(self, rhs: Capacity) -> Capacity {
        Capacity {
            cpu: self.cpu + rhs.cpu,
            mem_mb: self.mem_mb + rhs.mem_mb,
            bandwidth_mbps: self.bandwidth_mbps + rhs.bandwidth_mbps,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn munich_to_berlin_is_about_505_km() {
        let munich = Position::new(48.137, 11.575);
        let berlin = Position::new(52.520, 13.405);
        let d = munich.distance_km(&berlin);
        assert!((d - 505.0).abs() < 5.0, "{d}");
    }

    #[test]
    fn normalization_wraps_longitude_and_rejects_nan() {
        let p = Position::new(95.0, 190.0).normalized().unwrap();
        assert_eq!(p.lat, 90.0);
        assert!((p.lon - -170.0).abs() < 1e-9);
        assert_eq!(Position::new(0.0, 180.0).normalized().unwrap().lon, -180.0);
        assert!(Position::new(f64::NAN, 0.0).normalized().is_none());
    }

    #[test]
    fn fits_and_sanitize() {
        let free = Capacity::new(2.0, 512.0, 0.0);
        assert!(free.fits(&Capacity::MIN_USEFUL));
        assert!(!free.fits(&Capacity::new(2.5, 0.0, 0.0)));
        let dirty = Capacity::new(f64::NAN, -3.0, f64::INFINITY);
        assert_eq!(dirty.sanitized(), Capacity::ZERO);
    }

    #[test]
    fn resource_names_round_trip() {
        for r in Resource::ALL {
            assert_eq!(r.as_str().parse::<Resource>().unwrap(), r);
        }
        assert!("gpu".parse::<Resource>().is_err());
    }
}
