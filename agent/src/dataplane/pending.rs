//! Packets held for an overlay address the route table does not know yet (no I/O; time is passed in).
//!
//! With routes from the tree a machine learns routes lazily: a client's first SYN to a ServiceIP its machine has
//! not looked up yet finds no route. Dropping it costs the client a 1 s SYN retransmission although the tree
//! answers in milliseconds; so the packet waits here and is sent on through the normal outgoing path as soon as
//! a new route table knows its destination. Bounded per destination and in total, held at most `max_age`; all
//! buffers are allocated up front, so holding and releasing allocate nothing.

use std::net::Ipv4Addr;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingConfig {
    pub per_address: usize,
    pub total: usize,
    /// Longest packet held (the TUN's MTU: nothing longer is read from it).
    pub max_packet: usize,
    pub max_age: Duration,
}

impl Default for PendingConfig {
    fn default() -> Self {
        Self { per_address: 8, total: 256, max_packet: 1500, max_age: Duration::from_secs(1) }
    }
}

/// Why a packet was not held (it is dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotHeld {
    AddressFull,
    QueueFull,
    TooLong,
}

#[derive(Debug, Clone, Copy)]
struct Held {
    destination: Ipv4Addr,
    since: Duration,
    slot: usize,
    len: usize,
}

pub struct PendingPackets {
    config: PendingConfig,
    /// `total` slots of `max_packet` bytes.
    buffers: Box<[u8]>,
    free_slots: Vec<usize>,
    /// In arrival order.
    held: Vec<Held>,
}

impl PendingPackets {
    pub fn new(config: PendingConfig) -> Self {
        Self {
            buffers: vec![0u8; config.total * config.max_packet].into_boxed_slice(),
            free_slots: (0..config.total).rev().collect(),
            held: Vec::with_capacity(config.total),
            config,
        }
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Holds a copy of `packet`, bound for `destination`. Packets older than `max_age` are dropped first (their
    /// count is returned in `Ok`, to be counted as drops).
    pub fn hold(&mut self, packet: &[u8], destination: Ipv4Addr, now: Duration) -> Result<usize, NotHeld> {
        if packet.len() > self.config.max_packet {
            return Err(NotHeld::TooLong);
        }
        let expired = self.expire(now);
        if self.held.iter().filter(|held| held.destination == destination).count() >= self.config.per_address {
            return Err(NotHeld::AddressFull);
        }
        let Some(slot) = self.free_slots.pop() else { return Err(NotHeld::QueueFull) };
        let start = slot * self.config.max_packet;
        self.buffers[start..start + packet.len()].copy_from_slice(packet);
        self.held.push(Held { destination, since: now, slot, len: packet.len() });
        Ok(expired)
    }

    /// Drops packets held longer than `max_age`; returns how many.
    pub fn expire(&mut self, now: Duration) -> usize {
        let max_age = self.config.max_age;
        let before = self.held.len();
        let free_slots = &mut self.free_slots;
        self.held.retain(|held| {
            let keep = now.saturating_sub(held.since) <= max_age;
            if !keep {
                free_slots.push(held.slot);
            }
            keep
        });
        before - self.held.len()
    }

    /// Takes the oldest held packet whose destination is now `routable`, copying it into `out` (at least
    /// `max_packet` long); returns its length.
    pub fn take_routable(&mut self, mut routable: impl FnMut(Ipv4Addr) -> bool, out: &mut [u8]) -> Option<usize> {
        let position = self.held.iter().position(|held| routable(held.destination))?;
        let held = self.held.remove(position);
        let start = held.slot * self.config.max_packet;
        out[..held.len].copy_from_slice(&self.buffers[start..start + held.len]);
        self.free_slots.push(held.slot);
        Some(held.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> PendingConfig {
        PendingConfig { per_address: 2, total: 3, max_packet: 8, max_age: Duration::from_secs(1) }
    }

    const X: Ipv4Addr = Ipv4Addr::new(10, 30, 0, 7);
    const Y: Ipv4Addr = Ipv4Addr::new(10, 30, 0, 8);
    const Z: Ipv4Addr = Ipv4Addr::new(10, 30, 0, 9);

    #[test]
    fn packets_are_released_in_order_once_their_destination_is_routable() {
        let mut pending = PendingPackets::new(config());
        let now = Duration::ZERO;
        assert_eq!(pending.hold(b"x1", X, now), Ok(0));
        assert_eq!(pending.hold(b"y1", Y, now), Ok(0));
        assert_eq!(pending.hold(b"x2-long", X, now), Ok(0));
        let mut out = [0u8; 8];
        assert_eq!(pending.take_routable(|_| false, &mut out), None, "nothing routable yet");
        let mut released = Vec::new();
        while let Some(len) = pending.take_routable(|dst| dst == X, &mut out) {
            released.push(out[..len].to_vec());
        }
        assert_eq!(released, [b"x1".to_vec(), b"x2-long".to_vec()]);
        assert_eq!(pending.len(), 1, "y still waits");
        assert_eq!(pending.take_routable(|dst| dst == Y, &mut out), Some(2));
        assert_eq!(&out[..2], b"y1");
    }

    #[test]
    fn bounded_per_address_in_total_and_in_length() {
        let mut pending = PendingPackets::new(config());
        let now = Duration::ZERO;
        pending.hold(b"a", X, now).unwrap();
        pending.hold(b"b", X, now).unwrap();
        assert_eq!(pending.hold(b"c", X, now), Err(NotHeld::AddressFull));
        pending.hold(b"d", Y, now).unwrap();
        assert_eq!(pending.hold(b"e", Z, now), Err(NotHeld::QueueFull));
        assert_eq!(pending.hold(b"123456789", Z, now), Err(NotHeld::TooLong));
        assert_eq!(pending.len(), 3);
    }

    #[test]
    fn packets_wait_at_most_max_age_and_their_slots_are_reused() {
        let mut pending = PendingPackets::new(config());
        pending.hold(b"old", X, Duration::from_millis(0)).unwrap();
        pending.hold(b"new", Y, Duration::from_millis(600)).unwrap();
        assert_eq!(pending.expire(Duration::from_millis(1000)), 0);
        assert_eq!(pending.expire(Duration::from_millis(1001)), 1);
        // Holding also drops what is too old, and reports it.
        pending.hold(b"z1", Z, Duration::from_millis(1500)).unwrap();
        assert_eq!(pending.hold(b"z2", Z, Duration::from_millis(1700)), Ok(1), "y's packet expired");
        let mut out = [0u8; 8];
        assert_eq!(pending.take_routable(|_| true, &mut out), Some(2));
        assert_eq!(&out[..2], b"z1");
        assert_eq!(pending.take_routable(|_| true, &mut out), Some(2));
        assert_eq!(&out[..2], b"z2");
        // Slots freed by expiry and release are used again: three fit.
        for (n, dst) in [X, Y, X].into_iter().enumerate() {
            assert!(pending.hold(&[n as u8], dst, Duration::from_millis(1800)).is_ok());
        }
        assert_eq!(pending.hold(b"!", Y, Duration::from_millis(1800)), Err(NotHeld::QueueFull));
    }
}
