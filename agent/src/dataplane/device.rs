//! The TUN device: the kernel routes the ServiceIP range and other machines' subnets into it; the agent reads
//! those packets and writes translated ones back for local delivery.

use anyhow::Context;
use tun_rs::{DeviceBuilder, SyncDevice};

const TX_QUEUE_LEN: u32 = 4096;

/// Creates the TUN device `name` (up, no address) with `mtu`, non-blocking (the packet loop polls it).
pub fn create(name: &str, mtu: u16) -> anyhow::Result<SyncDevice> {
    let device = DeviceBuilder::new()
        .name(name)
        .mtu(mtu)
        .packet_information(false)
        // Bursts from fast senders wait here while the packet loop catches up instead of being dropped.
        .tx_queue_len(TX_QUEUE_LEN)
        .build_sync()
        .with_context(|| format!("creating TUN device {name} (needs root or CAP_NET_ADMIN)"))?;
    device.set_nonblocking(true).with_context(|| format!("making TUN device {name} non-blocking"))?;
    Ok(device)
}
