//! The bounded connection table: which instance a connection to a ServiceIP was given, and how to translate its
//! replies back. Entries expire on TCP FIN/RST and idle timeouts; when full, the least recently used entry goes.
//! Time is passed in (`now`, a monotonic offset chosen by the caller).

use super::packet::{Protocol, TCP_FIN, TCP_RST};
use lru::LruCache;
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::num::NonZeroUsize;
use std::time::Duration;

/// A connection as seen in one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub protocol: Protocol,
    pub src: Ipv4Addr,
    pub src_port: u16,
    pub dst: Ipv4Addr,
    pub dst_port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowTimeouts {
    pub tcp_established: Duration,
    /// After a RST, or FINs seen both ways: long enough for the last ACKs.
    pub tcp_closing: Duration,
    pub udp: Duration,
    pub icmp: Duration,
}

impl Default for FlowTimeouts {
    fn default() -> Self {
        Self {
            tcp_established: Duration::from_secs(2 * 3600),
            tcp_closing: Duration::from_secs(10),
            udp: Duration::from_secs(60),
            icmp: Duration::from_secs(30),
        }
    }
}

/// One proxied connection to a ServiceIP.
#[derive(Debug, Clone, Copy)]
pub struct Flow {
    pub service_ip: Ipv4Addr,
    /// The chosen instance (route index position and its InstanceIP).
    pub instance: usize,
    pub instance_ip: Ipv4Addr,
    /// Key its replies arrive with (after the remote side's translation).
    pub reply_key: FlowKey,
    last_seen: Duration,
    fin_out: bool,
    fin_in: bool,
    closing: bool,
}

impl Flow {
    pub fn new(service_ip: Ipv4Addr, instance: usize, instance_ip: Ipv4Addr, reply_key: FlowKey) -> Self {
        Self {
            service_ip,
            instance,
            instance_ip,
            reply_key,
            last_seen: Duration::ZERO,
            fin_out: false,
            fin_in: false,
            closing: false,
        }
    }

    fn expired(&self, protocol: Protocol, now: Duration, timeouts: &FlowTimeouts) -> bool {
        let timeout = match protocol {
            Protocol::Tcp if self.closing => timeouts.tcp_closing,
            Protocol::Tcp => timeouts.tcp_established,
            Protocol::Udp => timeouts.udp,
            Protocol::Icmp => timeouts.icmp,
        };
        now.saturating_sub(self.last_seen) > timeout
    }

    fn observe(&mut self, tcp_flags: u8, outgoing: bool, now: Duration) {
        self.last_seen = now;
        if tcp_flags & TCP_RST != 0 {
            self.closing = true;
        }
        if tcp_flags & TCP_FIN != 0 {
            if outgoing {
                self.fin_out = true;
            } else {
                self.fin_in = true;
            }
            self.closing |= self.fin_out && self.fin_in;
        }
    }
}

pub struct FlowTable {
    flows: LruCache<FlowKey, Flow>,
    by_reply: HashMap<FlowKey, FlowKey>,
    timeouts: FlowTimeouts,
}

impl FlowTable {
    pub fn new(capacity: NonZeroUsize, timeouts: FlowTimeouts) -> Self {
        Self { flows: LruCache::new(capacity), by_reply: HashMap::with_capacity(capacity.get()), timeouts }
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// The live flow for an outgoing packet, refreshed; an expired one is removed and not returned.
    pub fn outgoing(&mut self, key: &FlowKey, tcp_flags: u8, now: Duration) -> Option<Flow> {
        let flow = self.flows.get_mut(key)?;
        if flow.expired(key.protocol, now, &self.timeouts) {
            self.remove(key);
            return None;
        }
        flow.observe(tcp_flags, true, now);
        Some(*flow)
    }

    /// Records a new flow. Returns true when the table was full and its least recently used flow was evicted.
    pub fn insert(&mut self, key: FlowKey, mut flow: Flow, tcp_flags: u8, now: Duration) -> bool {
        flow.observe(tcp_flags, true, now);
        self.by_reply.insert(flow.reply_key, key);
        match self.flows.push(key, flow) {
            Some((old_key, old)) => {
                if old_key != key || old.reply_key != flow.reply_key {
                    self.by_reply.remove(&old.reply_key);
                }
                old_key != key
            }
            None => false,
        }
    }

    /// The ServiceIP a reply must appear to come from, if it belongs to a live flow.
    pub fn incoming(&mut self, reply_key: &FlowKey, tcp_flags: u8, now: Duration) -> Option<Ipv4Addr> {
        let key = *self.by_reply.get(reply_key)?;
        let flow = self.flows.get_mut(&key)?;
        if flow.expired(key.protocol, now, &self.timeouts) {
            self.remove(&key);
            return None;
        }
        flow.observe(tcp_flags, false, now);
        Some(flow.service_ip)
    }

    pub fn remove(&mut self, key: &FlowKey) {
        if let Some(flow) = self.flows.pop(key) {
            self.by_reply.remove(&flow.reply_key);
        }
    }

    /// Drops every flow matching `predicate`; returns how many.
    pub fn remove_where(&mut self, mut predicate: impl FnMut(&FlowKey, &Flow) -> bool) -> usize {
        let doomed: Vec<FlowKey> = self.flows.iter().filter(|(k, f)| predicate(k, f)).map(|(k, _)| *k).collect();
        for key in &doomed {
            self.remove(key);
        }
        doomed.len()
    }

    /// Updates the route-index position of every flow's instance (after a new route table).
    pub fn remap_instances(&mut self, mut position: impl FnMut(&Flow) -> usize) {
        for (_, flow) in self.flows.iter_mut() {
            flow.instance = position(flow);
        }
    }

    /// Removes expired flows; returns how many.
    pub fn expire(&mut self, now: Duration) -> usize {
        let timeouts = self.timeouts;
        self.remove_where(|key, flow| flow.expired(key.protocol, now, &timeouts))
    }
}

#[cfg(test)]
mod tests {
    use super::super::packet::TCP_SYN;
    use super::*;

    fn key(protocol: Protocol, port: u16) -> FlowKey {
        FlowKey {
            protocol,
            src: Ipv4Addr::new(10, 16, 0, 2),
            src_port: port,
            dst: Ipv4Addr::new(10, 30, 0, 2),
            dst_port: 80,
        }
    }

    fn reply(protocol: Protocol, port: u16) -> FlowKey {
        FlowKey {
            protocol,
            src: Ipv4Addr::new(10, 30, 2, 1),
            src_port: 80,
            dst: Ipv4Addr::new(10, 16, 0, 2),
            dst_port: port,
        }
    }

    fn table(capacity: usize) -> FlowTable {
        FlowTable::new(NonZeroUsize::new(capacity).unwrap(), FlowTimeouts::default())
    }

    fn flow(protocol: Protocol, port: u16) -> Flow {
        Flow::new(Ipv4Addr::new(10, 30, 0, 2), 0, Ipv4Addr::new(10, 30, 2, 1), reply(protocol, port))
    }

    #[test]
    fn reply_maps_back_to_service_ip() {
        let mut flows = table(8);
        let now = Duration::from_secs(1);
        flows.insert(key(Protocol::Tcp, 1000), flow(Protocol::Tcp, 1000), TCP_SYN, now);
        assert_eq!(flows.incoming(&reply(Protocol::Tcp, 1000), 0, now), Some(Ipv4Addr::new(10, 30, 0, 2)));
        assert_eq!(flows.incoming(&reply(Protocol::Tcp, 1001), 0, now), None);
        assert!(flows.outgoing(&key(Protocol::Tcp, 1000), 0, now).is_some());
    }

    #[test]
    fn tcp_closes_after_fins_and_rst() {
        let mut flows = table(8);
        let t0 = Duration::from_secs(100);
        flows.insert(key(Protocol::Tcp, 1), flow(Protocol::Tcp, 1), TCP_SYN, t0);
        flows.insert(key(Protocol::Tcp, 2), flow(Protocol::Tcp, 2), TCP_SYN, t0);
        flows.outgoing(&key(Protocol::Tcp, 1), TCP_FIN, t0);
        flows.incoming(&reply(Protocol::Tcp, 1), TCP_FIN, t0);
        flows.incoming(&reply(Protocol::Tcp, 2), TCP_RST, t0);
        assert_eq!(flows.expire(t0 + Duration::from_secs(5)), 0);
        assert_eq!(flows.expire(t0 + Duration::from_secs(11)), 2);
        assert_eq!(flows.len(), 0);
        assert_eq!(flows.incoming(&reply(Protocol::Tcp, 1), 0, t0), None);
    }

    #[test]
    fn idle_udp_expires_and_active_stays() {
        let mut flows = table(8);
        flows.insert(key(Protocol::Udp, 1), flow(Protocol::Udp, 1), 0, Duration::ZERO);
        flows.insert(key(Protocol::Udp, 2), flow(Protocol::Udp, 2), 0, Duration::ZERO);
        flows.outgoing(&key(Protocol::Udp, 2), 0, Duration::from_secs(50));
        assert_eq!(flows.expire(Duration::from_secs(70)), 1);
        assert!(flows.outgoing(&key(Protocol::Udp, 2), 0, Duration::from_secs(70)).is_some());
        // Lazy expiry on lookup as well.
        assert!(flows.outgoing(&key(Protocol::Udp, 2), 0, Duration::from_secs(200)).is_none());
    }

    #[test]
    fn bounded_with_lru_eviction() {
        let mut flows = table(2);
        let now = Duration::ZERO;
        assert!(!flows.insert(key(Protocol::Udp, 1), flow(Protocol::Udp, 1), 0, now));
        assert!(!flows.insert(key(Protocol::Udp, 2), flow(Protocol::Udp, 2), 0, now));
        flows.outgoing(&key(Protocol::Udp, 1), 0, now);
        assert!(flows.insert(key(Protocol::Udp, 3), flow(Protocol::Udp, 3), 0, now));
        assert_eq!(flows.len(), 2);
        assert!(flows.incoming(&reply(Protocol::Udp, 2), 0, now).is_none(), "evicted flow's reply index is gone");
        assert!(flows.incoming(&reply(Protocol::Udp, 1), 0, now).is_some());
        assert_eq!(flows.by_reply.len(), 2);
    }
}
