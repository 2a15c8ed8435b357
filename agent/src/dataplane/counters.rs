//! Data-plane counters: every packet handled or dropped is counted here. Atomics, so the status API reads them
//! without asking the packet loop.

use super::packet::Malformed;
use super::tunnel::DecodeError;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident),* $(,)?) => {
        #[derive(Debug, Default)]
        pub struct Counters {
            $($(#[doc = $doc])* pub $name: AtomicU64,)*
        }

        /// A point-in-time copy of `Counters`, as the API shows it.
        #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
        pub struct CounterSnapshot {
            $($(#[doc = $doc])* pub $name: u64,)*
        }

        impl Counters {
            pub fn snapshot(&self) -> CounterSnapshot {
                CounterSnapshot { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }
    };
}

counters! {
    /// Packets read from the TUN device (sent by local instances).
    tun_rx_packets,
    tun_rx_bytes,
    /// Packets written to the TUN device (delivered to local instances).
    tun_tx_packets,
    tun_tx_bytes,
    tunnel_tx_packets,
    tunnel_tx_bytes,
    /// Send calls for tunnelled data: `tunnel_tx_packets` over this is the batching factor (UDP GSO).
    tunnel_tx_sends,
    tunnel_rx_packets,
    tunnel_rx_bytes,
    /// Receive calls that returned datagrams (recvmmsg, UDP GRO): `tunnel_rx_packets` over this is the batching.
    tunnel_rx_reads,
    /// Translated packets whose destination is on this machine (never tunnelled).
    local_deliveries,
    /// Truncated or invalid IPv4/TCP/UDP/ICMP headers.
    drop_malformed,
    /// IPv6 and other non-IPv4 packets.
    drop_not_ipv4,
    drop_ip_options,
    drop_fragment,
    drop_unsupported_protocol,
    drop_unsupported_icmp,
    /// Packets from the TUN whose source is not an attached instance.
    drop_unknown_source,
    /// Destinations that are no ServiceIP, InstanceIP or machine subnet we know (no route).
    drop_no_route,
    /// A ServiceIP without any available instance.
    drop_no_instance,
    /// Tunnel datagrams that are too short, oversized, of unknown version or type.
    drop_tunnel_malformed,
    /// Unsealed tunnel datagrams from a node id or address not in the route table.
    drop_unknown_sender,
    /// Sealed datagrams that fail authentication, or unsealed ones when tunnels are encrypted (and vice versa).
    drop_unauthenticated,
    /// Sealed datagrams whose counter was already seen or is too old.
    drop_replayed,
    /// Tunnelled packets for an address this machine does not host (answered with route-not-found).
    route_not_found_sent,
    route_not_found_received,
    instances_invalidated,
    mss_clamped,
    flows_evicted,
    flows_expired,
    peers_evicted,
    peers_expired,
    /// Authentic datagrams from a peer at a new endpoint (it moved, or sits behind a NAT): replies follow it.
    peers_roamed,
    /// Client InstanceIPs learned from traffic (the table does not know them) so replies find their way back.
    reply_routes_learned,
    reply_routes_evicted,
    reply_routes_expired,
    /// Notices sent to the agent (table queries, unreachable instances, services in use).
    notices_sent,
    /// Notices dropped because the agent did not keep up (the packet loop never waits).
    notices_dropped,
    keepalives_sent,
    keepalives_received,
    /// Probes sent to peers we send data to but have not heard from for a while (`liveness`).
    probes_sent,
    probes_received,
    /// Peers declared unreachable: probes unanswered while we kept sending.
    peers_unreachable,
    /// Unreachable peers heard from again.
    peers_recovered,
    /// Packets to an unknown overlay address held until a route table knows it.
    packets_held,
    /// Held packets sent on after a new route table knew their destination.
    held_released,
    /// Held packets dropped because no table knew their destination in time (also counted in `drop_no_route`).
    held_expired,
    tun_write_errors,
    tunnel_send_errors,
}

impl Counters {
    pub fn add(counter: &AtomicU64, value: u64) {
        counter.fetch_add(value, Ordering::Relaxed);
    }

    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn malformed(&self, reason: Malformed) {
        Self::inc(match reason {
            Malformed::NotIpv4 => &self.drop_not_ipv4,
            Malformed::BadHeader => &self.drop_malformed,
            Malformed::IpOptions => &self.drop_ip_options,
            Malformed::Fragment => &self.drop_fragment,
            Malformed::UnsupportedProtocol => &self.drop_unsupported_protocol,
            Malformed::UnsupportedIcmp => &self.drop_unsupported_icmp,
        });
    }

    pub fn tunnel_malformed(&self, _reason: DecodeError) {
        Self::inc(&self.drop_tunnel_malformed);
    }
}
