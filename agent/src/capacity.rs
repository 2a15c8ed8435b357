//! This machine's free capacity, as the overlay's grids and placement see it: measured with sysinfo (free CPU cores
//! = cores x (1 - CPU usage), available memory), optionally overridden per resource from a TOML file
//! (`--capacity-file`: `cpu = .., mem_mb = .., bandwidth_mbps = ..`) so experiments can set it and change it live.
//!
//! Bandwidth has no trustworthy local measurement (link speed says nothing about the path), so it is 0 unless the
//! file gives it; the policies' "saturated" floor ignores bandwidth for that reason.
//!
//! [`monitor`] re-measures every [`MEASURE_EVERY`], re-reads the file when it changes (checked every
//! [`FILE_CHECK_EVERY`]) and tells the overlay only on a significant change, so grids are not resent for noise.

use crate::runtime::Handle;
use anyhow::{Context, bail};
use canopy_policies::Capacity;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// How often the machine is measured.
pub const MEASURE_EVERY: Duration = Duration::from_secs(10);
/// How often the override file is checked for changes.
pub const FILE_CHECK_EVERY: Duration = Duration::from_secs(1);
/// Relative change of any resource that is worth telling the overlay (the grids' own resend threshold is 10%).
pub const SIGNIFICANT_CHANGE: f64 = 0.1;

/// The override file: every key is optional; the keys given replace the measured values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapacityOverride {
    pub cpu: Option<f64>,
    pub mem_mb: Option<f64>,
    pub bandwidth_mbps: Option<f64>,
}

impl CapacityOverride {
    /// Parses and checks the file's text: unknown keys, and values that are negative or not finite, are errors.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let parsed: CapacityOverride = toml::from_str(text)?;
        for (key, value) in [("cpu", parsed.cpu), ("mem_mb", parsed.mem_mb), ("bandwidth_mbps", parsed.bandwidth_mbps)]
        {
            if let Some(v) = value
                && !(v.is_finite() && v >= 0.0)
            {
                bail!("{key} = {v} must be a finite number >= 0");
            }
        }
        Ok(parsed)
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read capacity file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("invalid capacity file {}", path.display()))
    }

    pub fn apply(&self, measured: Capacity) -> Capacity {
        Capacity {
            cpu: self.cpu.unwrap_or(measured.cpu),
            mem_mb: self.mem_mb.unwrap_or(measured.mem_mb),
            bandwidth_mbps: self.bandwidth_mbps.unwrap_or(measured.bandwidth_mbps),
        }
    }
}

/// Free capacity from raw readings: `usage_percent` is the machine-wide CPU usage (0-100).
pub fn free_from_readings(cores: usize, usage_percent: f32, available_bytes: u64) -> Capacity {
    let busy = if usage_percent.is_finite() { f64::from(usage_percent).clamp(0.0, 100.0) / 100.0 } else { 0.0 };
    Capacity {
        cpu: cores as f64 * (1.0 - busy),
        mem_mb: available_bytes as f64 / (1024.0 * 1024.0),
        bandwidth_mbps: 0.0,
    }
}

/// Reads CPU usage and available memory with sysinfo. CPU usage is measured between two refreshes, so the meter
/// keeps its `System` and each reading covers the time since the previous one.
pub struct Meter {
    system: Option<sysinfo::System>,
}

impl Meter {
    /// A meter with a first CPU reading: it waits sysinfo's minimum interval once, so the first value is real.
    pub fn new() -> Self {
        let system = match sysinfo::System::new() {
            Ok(mut system) => {
                system.refresh_cpu_usage();
                std::thread::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL);
                Some(system)
            }
            Err(err) => {
                tracing::warn!(%err, "cannot read system statistics; free capacity counts as the core count only");
                None
            }
        };
        Self { system }
    }

    pub fn measure(&mut self) -> Capacity {
        match &mut self.system {
            Some(system) => {
                system.refresh_cpu_usage();
                system.refresh_memory();
                free_from_readings(system.cpus().len().max(1), system.global_cpu_usage(), system.available_memory())
            }
            None => {
                let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
                free_from_readings(cores, 0.0, 0)
            }
        }
    }
}

/// Measurement plus the override file, re-read when its modification time or size changes.
pub struct CapacitySource {
    meter: Meter,
    file: Option<PathBuf>,
    /// (mtime, len) of the file as last read, and what it said.
    seen: Option<(Option<SystemTime>, u64)>,
    applied: CapacityOverride,
    measured: Capacity,
}

impl CapacitySource {
    /// Measures once and reads the file; a missing or invalid file is an error here (a typo should stop the start).
    pub fn new(file: Option<PathBuf>) -> anyhow::Result<Self> {
        let mut meter = Meter::new();
        let measured = meter.measure();
        let mut source = Self { meter, file, seen: None, applied: CapacityOverride::default(), measured };
        if let Some(path) = &source.file {
            source.applied = CapacityOverride::load(path)?;
            source.seen = Some(file_stamp(path));
        }
        Ok(source)
    }

    /// Free capacity as of the last measurement and file read.
    pub fn current(&self) -> Capacity {
        self.applied.apply(self.measured)
    }

    pub fn remeasure(&mut self) {
        self.measured = self.meter.measure();
    }

    /// Re-reads the file if it changed; returns true when the override changed. A file that became unreadable or
    /// invalid is reported and the last good override stays in force.
    pub fn reload_if_changed(&mut self) -> bool {
        let Some(path) = &self.file else { return false };
        let stamp = file_stamp(path);
        if self.seen == Some(stamp) {
            return false;
        }
        self.seen = Some(stamp);
        match CapacityOverride::load(path) {
            Ok(new) => {
                let changed = new != self.applied;
                if changed {
                    tracing::info!(file = %path.display(), ?new, "capacity override changed");
                }
                self.applied = new;
                changed
            }
            Err(err) => {
                tracing::warn!(err = format!("{err:#}"), "keeping the previous capacity override");
                false
            }
        }
    }
}

fn file_stamp(path: &Path) -> (Option<SystemTime>, u64) {
    match std::fs::metadata(path) {
        Ok(meta) => (meta.modified().ok(), meta.len()),
        Err(_) => (None, u64::MAX),
    }
}

/// Moves smaller than this (cores, MB, Mbit/s) are measurement noise, however large relative to a near-zero value:
/// a busy machine's free CPU jitters between 0.00 and 0.05 cores every reading.
const NOISE: [f64; 3] = [0.1, 32.0, 1.0];

/// Whether `new` differs from what the overlay was told (`old`) enough to tell it again: a resource moved by more
/// than `threshold` relative to the larger value (and more than noise), or the machine crossed the "saturated" line.
pub fn differs_significantly(old: &Capacity, new: &Capacity, threshold: f64) -> bool {
    let moved = old
        .to_array()
        .iter()
        .zip(new.to_array())
        .zip(NOISE)
        .any(|((&a, b), noise)| (a - b).abs() > (threshold * a.abs().max(b.abs())).max(noise));
    moved || old.fits(&Capacity::MIN_USEFUL) != new.fits(&Capacity::MIN_USEFUL)
}

/// Keeps the overlay's idea of this machine's free capacity current until the agent stops, and publishes every
/// change on `changes` (the records of the instances hosted here carry it). `told` is what the overlay was given
/// at start.
pub async fn monitor(
    mut source: CapacitySource,
    handle: Handle,
    mut told: Capacity,
    changes: tokio::sync::watch::Sender<Capacity>,
) {
    let mut file_check = tokio::time::interval(FILE_CHECK_EVERY);
    file_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut measure = tokio::time::interval(MEASURE_EVERY);
    measure.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    measure.tick().await; // the first tick is immediate; the source was measured when created
    loop {
        // An override change is sent at once, whatever its size: the experimenter asked for it.
        let force = tokio::select! {
            _ = file_check.tick() => {
                if !source.reload_if_changed() {
                    continue;
                }
                true
            }
            _ = measure.tick() => {
                source.remeasure();
                false
            }
        };
        let now = source.current();
        if force && now != told || differs_significantly(&told, &now, SIGNIFICANT_CHANGE) {
            tracing::debug!(?now, "free capacity changed");
            if handle.set_capacity(now).await.is_err() {
                return; // the agent is stopping
            }
            changes.send_replace(now);
            told = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_become_free_capacity() {
        let c = free_from_readings(4, 25.0, 2048 * 1024 * 1024);
        assert_eq!(c, Capacity::new(3.0, 2048.0, 0.0));
        // Nonsense usage readings are clamped, never negative capacity.
        assert_eq!(free_from_readings(2, 150.0, 0).cpu, 0.0);
        assert_eq!(free_from_readings(2, f32::NAN, 0).cpu, 2.0);
    }

    #[test]
    fn override_replaces_only_the_given_keys() {
        let o = CapacityOverride::parse("cpu = 0.5\nbandwidth_mbps = 100").unwrap();
        assert_eq!(o.apply(Capacity::new(8.0, 4096.0, 0.0)), Capacity::new(0.5, 4096.0, 100.0));
        assert_eq!(CapacityOverride::parse("").unwrap(), CapacityOverride::default());
    }

    #[test]
    fn bad_override_files_are_errors() {
        assert!(CapacityOverride::parse("cpus = 2").is_err(), "unknown key");
        assert!(CapacityOverride::parse("cpu = -1").is_err());
        assert!(CapacityOverride::parse("mem_mb = nan").is_err());
        assert!(CapacityOverride::parse("cpu = \"two\"").is_err());
        assert!(CapacityOverride::parse("cpu = ").is_err());
    }

    #[test]
    fn significance_ignores_noise_but_not_saturation() {
        let base = Capacity::new(4.0, 4096.0, 0.0);
        assert!(!differs_significantly(&base, &Capacity::new(3.8, 4000.0, 0.0), 0.1));
        assert!(differs_significantly(&base, &Capacity::new(3.0, 4096.0, 0.0), 0.1));
        assert!(differs_significantly(&base, &Capacity::new(4.0, 4096.0, 10.0), 0.1));
        // 0.9 -> 1.5 MiB is within the threshold here but crosses the "saturated" line.
        assert!(differs_significantly(&Capacity::new(0.011, 0.9, 0.0), &Capacity::new(0.011, 1.5, 0.0), 0.9));
        assert!(!differs_significantly(&Capacity::ZERO, &Capacity::ZERO, 0.1));
        // A busy machine's free CPU jittering near zero is not news.
        assert!(!differs_significantly(&Capacity::new(0.002, 4096.0, 0.0), &Capacity::new(0.009, 4090.0, 0.0), 0.1));
    }

    #[test]
    fn the_file_is_reread_when_it_changes_and_a_broken_edit_keeps_the_last_good_one() {
        let dir = std::env::temp_dir().join(format!("canopy-capacity-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("capacity.toml");
        std::fs::write(&path, "cpu = 2\n").unwrap();
        let mut source = CapacitySource::new(Some(path.clone())).unwrap();
        assert_eq!(source.current().cpu, 2.0);
        assert!(!source.reload_if_changed(), "unchanged file");
        // A different size is a change even when the modification time's resolution hides it.
        std::fs::write(&path, "cpu = 0.25\nmem_mb = 64\n").unwrap();
        assert!(source.reload_if_changed());
        assert_eq!((source.current().cpu, source.current().mem_mb), (0.25, 64.0));
        std::fs::write(&path, "cpu = -3 # broken\n").unwrap();
        assert!(!source.reload_if_changed());
        assert_eq!(source.current().cpu, 0.25, "the last good override stays");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(CapacitySource::new(Some(path)).is_err(), "a missing file stops the start");
    }
}
