//! Vivaldi network coordinates (Dabek, Cox, Kaashoek, Morris, SIGCOMM 2004): every node places itself in a 2-D
//! plane plus a "height" (its access-link delay), so that the distance between two coordinates predicts their
//! round-trip time. Each measured RTT to a peer moves the coordinate a little towards agreement, with the adaptive
//! timestep of the paper: a node that is unsure of its own position (high error) and hears from a confident peer
//! moves more. The `latency` policy ranks instances by [`VivaldiCoord::estimate_rtt`].
//!
//! Filtering of raw samples (e.g. the median of the last few pings) is the caller's business; this type takes one
//! RTT at a time.

use serde::{Deserialize, Serialize};

/// Error weight of new samples in the moving error estimate (c_e in the paper).
const ERROR_GAIN: f64 = 0.25;
/// Fraction of the way towards agreement a maximally unsure node moves per sample (c_c in the paper).
const STEP_GAIN: f64 = 0.25;
/// Error of a fresh coordinate, and the cap on errors (1.5 as in Serf's implementation).
pub const MAX_ERROR: f64 = 1.5;
/// Heights never reach zero, so the height direction stays defined (milliseconds).
const MIN_HEIGHT_MS: f64 = 0.01;
/// Distances below this count as "same place" (milliseconds).
const COINCIDENT_MS: f64 = 1e-6;
/// RTTs above this are not network round trips (an hour of queueing is a measurement bug).
const MAX_RTT_MS: f64 = 3_600_000.0;

/// A node's network coordinate. Units are milliseconds of round-trip time.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct VivaldiCoord {
    pub position: [f64; 2],
    pub height: f64,
    /// Relative error estimate of this coordinate (0 = perfect, [`MAX_ERROR`] = no idea).
    pub error: f64,
    /// Picks the direction to move in when two coordinates coincide (all nodes start at the origin); give each
    /// node a different seed. Local only, not sent.
    #[serde(skip)]
    seed: u64,
}

impl Default for VivaldiCoord {
    fn default() -> Self {
        Self::new(0)
    }
}

/// Why a sample was not applied.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum VivaldiError {
    #[error("round-trip time {0} ms is negative, not finite or implausibly large")]
    BadRtt(f64),
    #[error("remote coordinate or error is not a finite, non-negative value")]
    BadRemote,
}

impl VivaldiCoord {
    /// A fresh coordinate at the origin with maximal error.
    pub fn new(seed: u64) -> Self {
        VivaldiCoord { position: [0.0; 2], height: MIN_HEIGHT_MS, error: MAX_ERROR, seed }
    }

    /// Predicted round-trip time to `other` in milliseconds: planar distance plus both heights.
    pub fn estimate_rtt(&self, other: &VivaldiCoord) -> f64 {
        let dx = self.position[0] - other.position[0];
        let dy = self.position[1] - other.position[1];
        dx.hypot(dy) + self.height + other.height
    }

    /// Whether every component is usable (coordinates received from peers are checked with this).
    pub fn is_valid(&self) -> bool {
        self.position.iter().all(|v| v.is_finite())
            && self.height.is_finite()
            && self.height >= 0.0
            && self.error.is_finite()
            && self.error >= 0.0
    }

    /// Applies one measured round-trip time to a peer whose coordinate is `remote` and whose own error estimate is
    /// `remote_error`. Bad samples are rejected and leave the coordinate unchanged.
    pub fn update(&mut self, rtt_ms: f64, remote: &VivaldiCoord, remote_error: f64) -> Result<(), VivaldiError> {
        if !rtt_ms.is_finite() || !(0.0..=MAX_RTT_MS).contains(&rtt_ms) {
            return Err(VivaldiError::BadRtt(rtt_ms));
        }
        if !remote.is_valid() || !remote_error.is_finite() || remote_error < 0.0 {
            return Err(VivaldiError::BadRemote);
        }
        let rtt = rtt_ms.max(COINCIDENT_MS);
        let remote_error = remote_error.min(MAX_ERROR);
        let predicted = self.estimate_rtt(remote);

        // Sample weight: how much to trust this sample relative to what we already believe.
        let weight = self.error / (self.error + remote_error).max(COINCIDENT_MS);
        let relative_error = (predicted - rtt).abs() / rtt;
        self.error =
            (ERROR_GAIN * weight * relative_error + self.error * (1.0 - ERROR_GAIN * weight)).clamp(0.0, MAX_ERROR);

        // Adaptive timestep, then move along the unit height-vector away from (or towards) the remote.
        let force = STEP_GAIN * weight * (rtt - predicted);
        let diff = [self.position[0] - remote.position[0], self.position[1] - remote.position[1]];
        let planar = diff[0].hypot(diff[1]);
        if planar < COINCIDENT_MS {
            // Same planar spot (every node starts at the origin): push apart in a pseudo-random direction and leave
            // the heights alone; otherwise nearly all of the first samples would turn into height.
            let angle = self.pseudo_random_angle(rtt, remote);
            self.position[0] += force * angle.cos();
            self.position[1] += force * angle.sin();
            return Ok(());
        }
        // Height vectors: ||[x, h]|| = ||x|| + h and [x, xh] - [y, yh] = [x - y, xh + yh] (paper, section 5.4).
        let norm = planar + self.height + remote.height;
        self.position[0] += force * diff[0] / norm;
        self.position[1] += force * diff[1] / norm;
        self.height = (self.height + force * (self.height + remote.height) / norm).max(MIN_HEIGHT_MS);
        Ok(())
    }

    /// A direction that differs between nodes (seed) and between samples (remote, rtt), without a clock or RNG.
    fn pseudo_random_angle(&self, rtt: f64, remote: &VivaldiCoord) -> f64 {
        let x = crate::mix::mix64(
            self.seed ^ rtt.to_bits().rotate_left(17) ^ remote.position[0].to_bits() ^ remote.height.to_bits(),
        );
        (x >> 11) as f64 / (1u64 << 53) as f64 * std::f64::consts::TAU
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_nodes_learn_their_distance() {
        let (mut a, mut b) = (VivaldiCoord::new(1), VivaldiCoord::new(2));
        for _ in 0..200 {
            let snapshot = b;
            a.update(40.0, &snapshot, snapshot.error).unwrap();
            let snapshot = a;
            b.update(40.0, &snapshot, snapshot.error).unwrap();
        }
        let estimate = a.estimate_rtt(&b);
        assert!((estimate - 40.0).abs() < 1.0, "estimate {estimate}");
        assert!(a.error < 0.1, "error {}", a.error);
    }

    #[test]
    fn bad_samples_are_rejected_without_change() {
        let mut a = VivaldiCoord::new(1);
        let before = a;
        let remote = VivaldiCoord::new(2);
        assert!(a.update(f64::NAN, &remote, 1.0).is_err());
        assert!(a.update(-1.0, &remote, 1.0).is_err());
        assert!(a.update(10.0, &remote, f64::INFINITY).is_err());
        let broken = VivaldiCoord { position: [f64::NAN, 0.0], ..remote };
        assert!(a.update(10.0, &broken, 1.0).is_err());
        assert_eq!(a, before);
        assert!(a.update(0.0, &remote, 1.0).is_ok(), "a zero RTT (same host) is a valid sample");
    }
}
