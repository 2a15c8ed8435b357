//! An opt-in CPU wake-up latency bound for the packet path (`--cpu-latency-us`).
//!
//! Every packet through the tunnel wakes a data-plane thread: the sender's agent on its TUN, the receiver's on its
//! socket, and the same again for the answer. On an idle machine each wake-up first brings a CPU out of its idle
//! state; on the virtual machines measured here (halt exits to the hypervisor) that costs a median 28 us, four times
//! per round trip. The kernel's PM QoS interface lets a process bound that exit latency while it holds
//! `/dev/cpu_dma_latency` open: the idle loop then keeps to shallow states (at 0, it polls), so wake-ups are
//! immediate, at the price of idle CPUs that draw more power. Operators choose it per machine; it is off by default.

use anyhow::Context;
use std::fs::File;
use std::io::Write;
use std::path::Path;

const PM_QOS_DEVICE: &str = "/dev/cpu_dma_latency";

/// The request in force; dropping it (closing the file) lifts the bound.
#[derive(Debug)]
pub struct CpuLatencyRequest {
    _device: File,
    pub microseconds: u32,
}

impl CpuLatencyRequest {
    /// Bounds CPU exit latency to `microseconds` for as long as the returned value lives.
    pub fn hold(microseconds: u32) -> anyhow::Result<Self> {
        Self::hold_at(Path::new(PM_QOS_DEVICE), microseconds)
    }

    fn hold_at(device: &Path, microseconds: u32) -> anyhow::Result<Self> {
        let value = i32::try_from(microseconds).context("--cpu-latency-us is too large")?;
        let mut file = File::options().write(true).open(device).with_context(|| {
            format!("--cpu-latency-us needs {} (the kernel's PM QoS interface, writable by root)", device.display())
        })?;
        // The interface takes the bound as a native-endian 32-bit integer.
        file.write_all(&value.to_ne_bytes()).with_context(|| format!("writing {}", device.display()))?;
        Ok(CpuLatencyRequest { _device: file, microseconds })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_is_written_as_a_native_32_bit_integer_and_kept_open() {
        let device = std::env::temp_dir().join(format!("canopy-cpu-latency-test-{}", std::process::id()));
        std::fs::write(&device, b"").unwrap();
        let request = CpuLatencyRequest::hold_at(&device, 7);
        let written = std::fs::read(&device);
        let _ = std::fs::remove_file(&device);
        assert_eq!(written.unwrap(), 7i32.to_ne_bytes());
        assert_eq!(request.unwrap().microseconds, 7);
    }

    #[test]
    fn a_missing_device_says_what_is_needed() {
        let err = CpuLatencyRequest::hold_at(Path::new("/nonexistent/cpu_dma_latency"), 0).unwrap_err();
        assert!(format!("{err:#}").contains("PM QoS"), "{err:#}");
    }
}
