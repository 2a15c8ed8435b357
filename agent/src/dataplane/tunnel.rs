//! The tunnel wire format and the bounded set of peers with live tunnel state.
//!
//! Every datagram starts with a 12-byte header:
//! `version (1) | message type (1) | flags (1) | reserved, zero (1) | sender node id (8, big endian)`. With the
//! `SEALED` flag the body is encrypted and authenticated (see `crypto`); the plaintext body is
//! - data: one IPv4 packet, already translated;
//! - route-not-found: the 4-byte IPv4 address the receiver does not host;
//! - keepalive: nothing.
//!
//! Data is sent from one buffer: the packet is read into `buf[HEADER_LEN..]` and the header written in front, so
//! nothing is copied or allocated per packet.

use super::crypto::{ReplayWindow, SEAL_OVERHEAD};
use super::routes::NodeId;
use lru::LruCache;
use std::net::{Ipv4Addr, SocketAddr};
use std::num::NonZeroUsize;
use std::time::Duration;

pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 12;
/// Underlay overhead per tunnelled packet: outer IPv4 + UDP + our header + sealing (reserved even when tunnels
/// are not encrypted, so the MTU does not change with the keys).
pub const OVERHEAD: usize = 20 + 8 + HEADER_LEN + SEAL_OVERHEAD;
/// Header flag: the body is sealed.
pub const FLAG_SEALED: u8 = 1;
/// Largest IP packet the data plane handles (bounded buffers; jumbo underlays are not supported yet).
pub const MAX_PACKET: usize = 9000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MessageType {
    Data = 1,
    RouteNotFound = 2,
    Keepalive = 3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message<'a> {
    Data(&'a [u8]),
    RouteNotFound(Ipv4Addr),
    Keepalive,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    TooShort,
    UnknownVersion,
    UnknownType,
    BadLength,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub sender: NodeId,
    pub kind: MessageType,
    pub sealed: bool,
}

/// Decodes and checks the fixed header.
pub fn decode_header(datagram: &[u8]) -> Result<Header, DecodeError> {
    if datagram.len() < HEADER_LEN {
        return Err(DecodeError::TooShort);
    }
    if datagram[0] != VERSION || datagram[2] & !FLAG_SEALED != 0 || datagram[3] != 0 {
        return Err(DecodeError::UnknownVersion);
    }
    let kind = match datagram[1] {
        t if t == MessageType::Data as u8 => MessageType::Data,
        t if t == MessageType::RouteNotFound as u8 => MessageType::RouteNotFound,
        t if t == MessageType::Keepalive as u8 => MessageType::Keepalive,
        _ => return Err(DecodeError::UnknownType),
    };
    let mut id = [0u8; 8];
    id.copy_from_slice(&datagram[4..HEADER_LEN]);
    Ok(Header { sender: NodeId(u64::from_be_bytes(id)), kind, sealed: datagram[2] & FLAG_SEALED != 0 })
}

/// Interprets a (plaintext or opened) body of a message of type `kind`.
pub fn decode_body(kind: MessageType, body: &[u8]) -> Result<Message<'_>, DecodeError> {
    match kind {
        MessageType::Data if body.is_empty() || body.len() > MAX_PACKET => Err(DecodeError::BadLength),
        MessageType::Data => Ok(Message::Data(body)),
        MessageType::RouteNotFound => {
            let octets: [u8; 4] = body.try_into().map_err(|_| DecodeError::BadLength)?;
            Ok(Message::RouteNotFound(Ipv4Addr::from(octets)))
        }
        MessageType::Keepalive if body.is_empty() => Ok(Message::Keepalive),
        MessageType::Keepalive => Err(DecodeError::BadLength),
    }
}

pub fn write_header(buf: &mut [u8], kind: MessageType, sender: NodeId, sealed: bool) {
    buf[0] = VERSION;
    buf[1] = kind as u8;
    buf[2] = if sealed { FLAG_SEALED } else { 0 };
    buf[3] = 0;
    buf[4..HEADER_LEN].copy_from_slice(&sender.0.to_be_bytes());
}

/// Decodes an unsealed datagram; `Data` borrows the packet in place.
#[cfg(test)]
pub fn decode(datagram: &[u8]) -> Result<(NodeId, Message<'_>), DecodeError> {
    let header = decode_header(datagram)?;
    if header.sealed {
        return Err(DecodeError::BadLength);
    }
    Ok((header.sender, decode_body(header.kind, &datagram[HEADER_LEN..])?))
}

#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub endpoint: SocketAddr,
    /// Last data packet either way; keepalives do not count, so a peer nobody uses goes idle.
    pub last_data: Duration,
    /// Last datagram of any kind we sent.
    pub last_tx: Duration,
    /// Counters of sealed messages seen from this peer. Lost when the peer is evicted or idles out; the sender's
    /// counter keeps rising, so old messages stay useless only while they are older than the new window.
    pub replay: ReplayWindow,
}

/// Peers we exchanged data with recently, bounded (LRU) so state cannot grow without limit.
pub struct PeerTable {
    peers: LruCache<NodeId, Peer>,
    idle_timeout: Duration,
}

impl PeerTable {
    pub fn new(capacity: NonZeroUsize, idle_timeout: Duration) -> Self {
        Self { peers: LruCache::new(capacity), idle_timeout }
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Notes a data packet sent to `id`; returns true when another peer was evicted to make room.
    pub fn sent(&mut self, id: NodeId, endpoint: SocketAddr, now: Duration) -> bool {
        if let Some(peer) = self.peers.get_mut(&id) {
            peer.last_data = now;
            peer.last_tx = now;
            peer.endpoint = endpoint;
            return false;
        }
        self.peers.push(id, Peer { endpoint, last_data: now, last_tx: now, replay: ReplayWindow::default() }).is_some()
    }

    /// Notes a data packet received from `id`; returns true when another peer was evicted to make room.
    pub fn received(&mut self, id: NodeId, endpoint: SocketAddr, now: Duration) -> bool {
        if let Some(peer) = self.peers.get_mut(&id) {
            peer.last_data = now;
            return false;
        }
        self.peers
            .push(id, Peer { endpoint, last_data: now, last_tx: Duration::ZERO, replay: ReplayWindow::default() })
            .is_some()
    }

    /// Whether a sealed message's counter from a known peer is new (not a replay).
    pub fn accept_counter(&mut self, id: NodeId, counter: u64) -> bool {
        self.peers.get_mut(&id).is_some_and(|peer| peer.replay.accept(counter))
    }

    /// Drops peers without data for longer than the idle timeout; returns how many.
    pub fn expire(&mut self, now: Duration) -> usize {
        let before = self.peers.len();
        let idle = self.idle_timeout;
        self.peers.retain(|_, peer| now.saturating_sub(peer.last_data) <= idle);
        before - self.peers.len()
    }

    /// Live peers we have sent nothing to for `interval`: they get a keepalive so NAT bindings hold while the
    /// tunnel is in use. Marks them as sent.
    pub fn keepalives_due(&mut self, now: Duration, interval: Duration) -> Vec<(NodeId, SocketAddr)> {
        let mut due = Vec::new();
        for (id, peer) in self.peers.iter_mut() {
            if now.saturating_sub(peer.last_tx) >= interval {
                peer.last_tx = now;
                due.push((*id, peer.endpoint));
            }
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trips() {
        let me = NodeId(0x0102_0304_0506_0708);
        let mut buf = [0u8; HEADER_LEN + 3];
        write_header(&mut buf, MessageType::Data, me, false);
        buf[HEADER_LEN..].copy_from_slice(b"abc");
        assert_eq!(decode(&buf), Ok((me, Message::Data(b"abc"))));
        let mut rnf = [0u8; HEADER_LEN + 4];
        write_header(&mut rnf, MessageType::RouteNotFound, me, false);
        rnf[HEADER_LEN..].copy_from_slice(&[10, 16, 0, 66]);
        assert_eq!(decode(&rnf), Ok((me, Message::RouteNotFound(Ipv4Addr::new(10, 16, 0, 66)))));
        let mut keepalive = [0u8; HEADER_LEN];
        write_header(&mut keepalive, MessageType::Keepalive, me, true);
        let header = decode_header(&keepalive).unwrap();
        assert!(header.sealed && header.kind == MessageType::Keepalive && header.sender == me);
        keepalive[2] = 0;
        assert_eq!(decode(&keepalive), Ok((me, Message::Keepalive)));
        keepalive[2] = 4;
        assert_eq!(decode(&keepalive), Err(DecodeError::UnknownVersion), "unknown flags");
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(decode(&[1, 1, 0]), Err(DecodeError::TooShort));
        let mut buf = [0u8; HEADER_LEN + 4];
        write_header(&mut buf, MessageType::Data, NodeId(1), false);
        buf[0] = 2;
        assert_eq!(decode(&buf), Err(DecodeError::UnknownVersion));
        buf[0] = VERSION;
        buf[1] = 9;
        assert_eq!(decode(&buf), Err(DecodeError::UnknownType));
        buf[1] = MessageType::RouteNotFound as u8;
        assert_eq!(decode(&buf[..HEADER_LEN + 3]), Err(DecodeError::BadLength));
        buf[1] = MessageType::Data as u8;
        assert_eq!(decode(&buf[..HEADER_LEN]), Err(DecodeError::BadLength));
        let oversized = vec![0u8; HEADER_LEN + MAX_PACKET + 1];
        let mut oversized = oversized;
        write_header(&mut oversized, MessageType::Data, NodeId(1), false);
        assert_eq!(decode(&oversized), Err(DecodeError::BadLength));
    }

    #[test]
    fn peers_are_bounded_and_expire() {
        let endpoint: SocketAddr = "192.0.2.1:50103".parse().unwrap();
        let mut peers = PeerTable::new(NonZeroUsize::new(2).unwrap(), Duration::from_secs(60));
        assert!(!peers.sent(NodeId(1), endpoint, Duration::from_secs(0)));
        assert!(!peers.received(NodeId(2), endpoint, Duration::from_secs(10)));
        assert!(peers.sent(NodeId(3), endpoint, Duration::from_secs(20)), "LRU peer 1 evicted");
        assert_eq!(peers.len(), 2);
        let due = peers.keepalives_due(Duration::from_secs(30), Duration::from_secs(15));
        assert_eq!(due, vec![(NodeId(2), endpoint)]);
        assert_eq!(peers.expire(Duration::from_secs(75)), 1, "peer 2 (data at 10) goes; keepalives do not count");
        assert_eq!(peers.len(), 1);
        assert_eq!(peers.expire(Duration::from_secs(81)), 1, "peer 3 (data at 20) goes");
    }

    proptest! {
        /// Fuzz: arbitrary datagrams never panic the decoder.
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&bytes);
        }
    }
}
