//! The tunnel wire format and the bounded set of peers with live tunnel state.
//!
//! Every datagram starts with a 12-byte header:
//! `version (1) | message type (1) | flags (1) | reserved, zero (1) | sender node id (8, big endian)`. With the
//! `SEALED` flag the body is encrypted and authenticated (see `crypto`); the plaintext body is
//! - data: one IPv4 packet, already translated;
//! - route-not-found: the 4-byte IPv4 address the receiver does not host;
//! - keepalive: nothing;
//! - probe: nothing; the receiver answers with a keepalive (`liveness`).
//!
//! Data is sent from one buffer: the packet is read into `buf[HEADER_LEN..]` and the header written in front, so
//! nothing is copied or allocated per packet.

use super::crypto::{ReplayWindow, SEAL_OVERHEAD};
use super::liveness::{Liveness, LivenessAction, LivenessConfig};
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
    /// "Are you there?": answered with a keepalive.
    Probe = 4,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message<'a> {
    Data(&'a [u8]),
    RouteNotFound(Ipv4Addr),
    Keepalive,
    Probe,
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
        t if t == MessageType::Probe as u8 => MessageType::Probe,
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
        MessageType::Probe if body.is_empty() => Ok(Message::Probe),
        MessageType::Probe => Err(DecodeError::BadLength),
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
    pub liveness: Liveness,
}

impl Peer {
    fn new(endpoint: SocketAddr, last_data: Duration, last_tx: Duration) -> Self {
        Peer { endpoint, last_data, last_tx, replay: ReplayWindow::default(), liveness: Liveness::default() }
    }
}

/// An authentic message was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Authentic {
    /// Another peer was evicted to make room for this one.
    pub evicted: bool,
    /// It came from another endpoint than the peer's last one.
    pub roamed: bool,
    /// The peer had been declared unreachable (`liveness`) and is heard from again.
    pub recovered: bool,
}

/// A sealed message whose counter was already seen or is too old.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replayed;

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

    /// Notes a data packet to `id` and returns where to send it (and whether another peer was evicted to make
    /// room). With `roaming` (sealed tunnels) a known peer keeps the endpoint its latest authentic datagram came
    /// from; otherwise, and for a new peer, the `listed` endpoint (the route table's) is used. `None`: the peer is
    /// neither known nor listed.
    pub fn sent(
        &mut self,
        id: NodeId,
        listed: Option<SocketAddr>,
        roaming: bool,
        now: Duration,
    ) -> Option<(SocketAddr, bool)> {
        if let Some(peer) = self.peers.get_mut(&id) {
            peer.last_data = now;
            peer.last_tx = now;
            peer.liveness.data_sent(now);
            if !roaming && let Some(listed) = listed {
                peer.endpoint = listed;
            }
            return Some((peer.endpoint, false));
        }
        let endpoint = listed?;
        let mut peer = Peer::new(endpoint, now, now);
        peer.liveness.data_sent(now);
        Some((endpoint, self.peers.push(id, peer).is_some()))
    }

    /// Notes an unsealed data packet from a listed peer at its listed endpoint; returns true when another peer was
    /// evicted to make room.
    pub fn received(&mut self, id: NodeId, endpoint: SocketAddr, now: Duration) -> bool {
        if let Some(peer) = self.peers.get_mut(&id) {
            peer.last_data = now;
            return false;
        }
        self.peers.push(id, Peer::new(endpoint, now, Duration::ZERO)).is_some()
    }

    /// Notes a datagram of any kind from a listed peer at its listed endpoint (unsealed tunnels; sealed ones use
    /// `authentic`). Returns true when the peer had been unreachable.
    pub fn heard(&mut self, id: NodeId) -> bool {
        self.peers.peek_mut(&id).is_some_and(|peer| peer.liveness.heard())
    }

    /// Notes an authentic sealed message with `counter` from `id`, which came from `from`. A replayed counter is
    /// refused and changes nothing; otherwise the peer's endpoint becomes `from` (roaming: authentication proves
    /// the sender, wherever its datagrams now come from, e.g. behind a NAT), and data refreshes its idle timer.
    pub fn authentic(
        &mut self,
        id: NodeId,
        from: SocketAddr,
        counter: u64,
        data: bool,
        now: Duration,
    ) -> Result<Authentic, Replayed> {
        let mut evicted = false;
        if !self.peers.contains(&id) {
            evicted = self.peers.push(id, Peer::new(from, now, Duration::ZERO)).is_some();
        }
        let peer = self.peers.get_mut(&id).expect("present: just checked or inserted");
        if !peer.replay.accept(counter) {
            return Err(Replayed);
        }
        let roamed = peer.endpoint != from;
        peer.endpoint = from;
        if data {
            peer.last_data = now;
        }
        let recovered = peer.liveness.heard();
        Ok(Authentic { evicted, roamed, recovered })
    }

    /// Where datagrams to `id` go now, if it has tunnel state.
    #[cfg(test)]
    pub fn endpoint(&self, id: NodeId) -> Option<SocketAddr> {
        self.peers.peek(&id).map(|peer| peer.endpoint)
    }

    /// The route table now lists another endpoint for `id`: use it until the peer's next authentic datagram.
    pub fn relisted(&mut self, id: NodeId, endpoint: SocketAddr) {
        if let Some(peer) = self.peers.peek_mut(&id) {
            peer.endpoint = endpoint;
        }
    }

    /// Drops peers without data for longer than the idle timeout; returns how many. Those that were unreachable
    /// are passed to `forgotten_unreachable` (nobody probes them any more, so their state is forgotten too).
    pub fn expire(&mut self, now: Duration, mut forgotten_unreachable: impl FnMut(NodeId)) -> usize {
        let before = self.peers.len();
        let idle = self.idle_timeout;
        self.peers.retain(|id, peer| {
            let keep = now.saturating_sub(peer.last_data) <= idle;
            if !keep && peer.liveness.unreachable() {
                forgotten_unreachable(*id);
            }
            keep
        });
        before - self.peers.len()
    }

    /// Whether `id` is declared unreachable.
    #[cfg(test)]
    pub fn unreachable(&self, id: NodeId) -> bool {
        self.peers.peek(&id).is_some_and(|peer| peer.liveness.unreachable())
    }

    /// Ids of the peers declared unreachable.
    pub fn unreachable_peers(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.peers.iter().filter(|(_, peer)| peer.liveness.unreachable()).map(|(id, _)| *id)
    }

    /// Advances every peer's liveness to `now`: the peers to probe (and where), and those that have just become
    /// unreachable. Probes count as sent datagrams for the keepalive timer.
    pub fn poll_liveness(
        &mut self,
        now: Duration,
        config: &LivenessConfig,
    ) -> Vec<(NodeId, SocketAddr, LivenessAction)> {
        let mut due = Vec::new();
        for (id, peer) in self.peers.iter_mut() {
            let action = peer.liveness.poll(now, config);
            if action.probe {
                peer.last_tx = now;
            }
            if action != LivenessAction::default() {
                due.push((*id, peer.endpoint, action));
            }
        }
        due
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
        assert_eq!(peers.sent(NodeId(1), Some(endpoint), false, Duration::from_secs(0)), Some((endpoint, false)));
        assert!(!peers.received(NodeId(2), endpoint, Duration::from_secs(10)));
        assert_eq!(peers.sent(NodeId(3), None, true, Duration::from_secs(20)), None, "neither known nor listed");
        let evicted = peers.sent(NodeId(3), Some(endpoint), true, Duration::from_secs(20));
        assert_eq!(evicted, Some((endpoint, true)), "LRU peer 1 evicted");
        assert_eq!(peers.len(), 2);
        let due = peers.keepalives_due(Duration::from_secs(30), Duration::from_secs(15));
        assert_eq!(due, vec![(NodeId(2), endpoint)]);
        assert_eq!(
            peers.expire(Duration::from_secs(75), |_| {}),
            1,
            "peer 2 (data at 10) goes; keepalives do not count"
        );
        assert_eq!(peers.len(), 1);
        assert_eq!(peers.expire(Duration::from_secs(81), |_| {}), 1, "peer 3 (data at 20) goes");
    }

    #[test]
    fn authentic_messages_roam_and_replays_change_nothing() {
        let listed: SocketAddr = "192.0.2.1:50103".parse().unwrap();
        let nat: SocketAddr = "198.51.100.7:40000".parse().unwrap();
        let spoofed: SocketAddr = "203.0.113.9:1".parse().unwrap();
        let mut peers = PeerTable::new(NonZeroUsize::new(4).unwrap(), Duration::from_secs(60));
        let t = Duration::from_secs;
        // A peer nobody listed, behind a NAT: known from its first authentic datagram.
        assert_eq!(
            peers.authentic(NodeId(7), nat, 100, true, t(1)),
            Ok(Authentic { evicted: false, roamed: false, recovered: false })
        );
        assert_eq!(peers.endpoint(NodeId(7)), Some(nat));
        assert_eq!(peers.sent(NodeId(7), None, true, t(2)), Some((nat, false)), "replies go where it spoke from");
        // A replayed datagram from elsewhere neither passes nor moves the peer.
        assert_eq!(peers.authentic(NodeId(7), spoofed, 100, true, t(3)), Err(Replayed));
        assert_eq!(peers.endpoint(NodeId(7)), Some(nat));
        // A listed peer we sent to first, then heard from behind its NAT: sealed replies follow it.
        assert_eq!(peers.sent(NodeId(8), Some(listed), true, t(4)), Some((listed, false)));
        assert_eq!(peers.authentic(NodeId(8), nat, 5, false, t(5)).map(|a| a.roamed), Ok(true));
        assert_eq!(peers.sent(NodeId(8), Some(listed), true, t(6)), Some((nat, false)));
        // Unsealed mode always uses the listed endpoint; a new table entry resets a roamed one.
        assert_eq!(peers.sent(NodeId(8), Some(listed), false, t(7)), Some((listed, false)));
        peers.authentic(NodeId(8), nat, 6, true, t(8)).unwrap();
        peers.relisted(NodeId(8), listed);
        assert_eq!(peers.endpoint(NodeId(8)), Some(listed));
        // Keepalives do not keep a peer alive: only data does.
        peers.authentic(NodeId(7), nat, 101, false, t(50)).unwrap();
        assert_eq!(peers.expire(t(63), |_| {}), 1, "peer 7 (data at 2) idles out; peer 8 (data at 8) stays");
        assert_eq!(peers.endpoint(NodeId(7)), None);
    }

    #[test]
    fn probes_round_trip_and_carry_nothing() {
        let mut probe = [0u8; HEADER_LEN + 1];
        write_header(&mut probe, MessageType::Probe, NodeId(3), false);
        assert_eq!(decode(&probe[..HEADER_LEN]), Ok((NodeId(3), Message::Probe)));
        assert_eq!(decode(&probe), Err(DecodeError::BadLength));
    }

    #[test]
    fn silent_peers_become_unreachable_and_recover_when_heard() {
        let listed: SocketAddr = "192.0.2.1:50103".parse().unwrap();
        let config = LivenessConfig::default();
        let mut peers = PeerTable::new(NonZeroUsize::new(4).unwrap(), Duration::from_secs(60));
        let t = Duration::from_millis;
        let (mut probes, mut declared) = (0, Vec::new());
        for ms in (0..=5000).step_by(250) {
            peers.sent(NodeId(1), Some(listed), true, t(ms));
            for (id, endpoint, action) in peers.poll_liveness(t(ms), &config) {
                assert_eq!((id, endpoint), (NodeId(1), listed));
                probes += usize::from(action.probe);
                if action.became_unreachable {
                    declared.push(ms);
                }
            }
        }
        assert_eq!(declared, vec![4000]);
        assert!(probes >= 4 && peers.unreachable(NodeId(1)));
        assert_eq!(peers.unreachable_peers().collect::<Vec<_>>(), vec![NodeId(1)]);
        // The answer to a probe (a keepalive) makes it reachable again.
        let answer = peers.authentic(NodeId(1), listed, 1, false, t(5100)).unwrap();
        assert!(answer.recovered);
        assert!(!peers.unreachable(NodeId(1)));
        assert!(!peers.authentic(NodeId(1), listed, 2, false, t(5200)).unwrap().recovered);
        // Unsealed tunnels: any datagram from the listed peer counts.
        for ms in (6000..=11_000).step_by(250) {
            peers.sent(NodeId(1), Some(listed), false, t(ms));
            peers.poll_liveness(t(ms), &config);
        }
        assert!(peers.unreachable(NodeId(1)));
        assert!(peers.heard(NodeId(1)));
        assert!(!peers.heard(NodeId(2)), "unknown peers are not created by control messages");
        // An unreachable peer that idles out is reported so its instances are not held back forever.
        for ms in (11_250..=16_000).step_by(250) {
            peers.sent(NodeId(1), Some(listed), false, t(ms));
            peers.poll_liveness(t(ms), &config);
        }
        assert!(peers.unreachable(NodeId(1)));
        let mut forgotten = Vec::new();
        assert_eq!(peers.expire(t(80_000), |id| forgotten.push(id)), 1);
        assert_eq!(forgotten, vec![NodeId(1)]);
    }

    proptest! {
        /// Fuzz: arbitrary datagrams never panic the decoder.
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&bytes);
        }
    }
}
