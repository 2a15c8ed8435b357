//! The packet loop: one thread owns the TUN device, the tunnel socket, the proxy and the peer table, and waits for
//! them in its own `mio` poll. No async runtime: at idle every packet is a wake-up of its own, and a runtime's
//! scheduling and readiness bookkeeping took more CPU per wake-up than handling the packet (the loop on a
//! current-thread tokio runtime spent 41-46 us of CPU per tunnelled ping in both agents together, this one 32-36).
//! Packets are read into reused buffers, translated in place and sent on without a channel hop or allocation.
//! System calls are batched: the packets read from the TUN in one wake-up are sealed back to back and leave in UDP
//! segmentation offload sends (`batch`), and the tunnel socket is read with `recvmmsg` and UDP GRO (several
//! datagrams per call, quinn-udp); control commands (new routes, attach, detach, status) arrive on a channel that
//! wakes the poll, and notices for the agent leave on a bounded one (`try_send`: the loop never waits for the agent).
//!
//! Packets to overlay addresses the table does not know wait in `pending` until a new table knows them (the
//! agent was told and asks the tree); peers we send to but do not hear from are probed and, when silent, declared
//! unreachable (`liveness`).
//!
//! Who may send us tunnel datagrams: with sealed tunnels, any machine holding the tunnel key, from anywhere.
//! Authentication proves the sender, so a machine the table does not list (a client's machine, with routes from
//! the tree) is accepted, and a peer's endpoint is where its latest authentic datagram came from (WireGuard-style
//! roaming; NAT'd machines work). Unsealed tunnels keep the strict check, a listed sender at its listed endpoint:
//! there the sender id is only a claim anyone on the underlay can make, and the listed endpoint is the one thing
//! that ties a datagram to a machine we were told about.

use super::batch::SendBatch;
use super::counters::Counters;
use super::crypto::{PAYLOAD_OFFSET, PairCiphers, TAG_LEN};
use super::liveness::LivenessConfig;
use super::notices::{Notice, NoticeLimiter};
use super::pending::PendingPackets;
use super::proxy::{Proxy, Verdict};
use super::routes::{NodeId, RouteTable};
use super::tunnel::{self, HEADER_LEN, MAX_PACKET, Message, MessageType, PeerTable};
use mio::unix::SourceFd;
use mio::{Events, Poll, Token, Waker};
use std::collections::HashMap;
use std::io::{ErrorKind, IoSliceMut};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tun_rs::SyncDevice;

/// Packets handled per readiness event before yielding to the other source (fairness, batch-friendly).
const BATCH: usize = 64;
const TICK: Duration = Duration::from_secs(1);
/// How often peers' liveness is checked (probes and unreachability are judged at this granularity).
const LIVENESS_TICK: Duration = Duration::from_millis(250);
/// Receive buffers per `recvmmsg`; each holds one datagram or a GRO train of them (`recv_buffer_len`).
const RECV_MESSAGES: usize = 4;
/// Longest wait for a full socket or TUN queue to take a packet before it is dropped (counted as a send error).
const WRITE_WAIT: Duration = Duration::from_millis(100);

const TUN_TOKEN: Token = Token(0);
const SOCKET_TOKEN: Token = Token(1);
const COMMAND_TOKEN: Token = Token(2);

/// The agent's end of the command channel: every command wakes the packet loop.
#[derive(Clone)]
pub struct CommandSender {
    queue: Sender<Command>,
    waker: Arc<Waker>,
}

impl CommandSender {
    /// Fails when the loop has stopped.
    pub fn send(&self, command: Command) -> Result<(), Command> {
        self.queue.send(command).map_err(|err| err.0)?;
        // A failed wake-up leaves the command for the loop's next turn (at the latest its next timer).
        let _ = self.waker.wake();
        Ok(())
    }
}

/// The loop's poll and the command channel that wakes it; the poll moves to the loop's thread.
pub fn command_channel() -> std::io::Result<(Poll, CommandSender, Receiver<Command>)> {
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), COMMAND_TOKEN)?);
    let (queue, receiver) = std::sync::mpsc::channel();
    Ok((poll, CommandSender { queue, waker }, receiver))
}

pub enum Command {
    SetRoutes(RouteTable, oneshot::Sender<anyhow::Result<()>>),
    Attach { namespace_ip: Ipv4Addr, instance_ip: Ipv4Addr },
    Detach { namespace_ip: Ipv4Addr },
    Status(oneshot::Sender<LoopStatus>),
    Shutdown,
}

#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct LoopStatus {
    pub flows: usize,
    pub tunnel_peers: usize,
    pub reply_routes: usize,
    #[serde(default)]
    pub held_packets: usize,
    #[serde(default)]
    pub unreachable_peers: usize,
}

/// Reused buffers and metadata for `recvmmsg` on the tunnel socket.
struct ReceiveBuffers {
    buffers: [Box<[u8]>; RECV_MESSAGES],
    meta: [quinn_udp::RecvMeta; RECV_MESSAGES],
}

impl ReceiveBuffers {
    fn new(len: usize) -> Self {
        Self {
            buffers: std::array::from_fn(|_| vec![0u8; len].into_boxed_slice()),
            meta: [quinn_udp::RecvMeta::default(); RECV_MESSAGES],
        }
    }
}

pub struct Engine {
    pub proxy: Proxy,
    pub peers: PeerTable,
    pub counters: Arc<Counters>,
    /// Non-blocking, like the socket.
    pub tun: SyncDevice,
    pub socket: UdpSocket,
    /// Batched sends and receives (GSO, GRO, recvmmsg) on `socket`.
    pub udp: quinn_udp::UdpSocketState,
    pub node_id: NodeId,
    pub keepalive_interval: Duration,
    /// Largest tunnel datagram expected on the underlay (its MTU minus IPv4 and UDP headers).
    pub max_datagram: usize,
    /// Per-peer ciphers when the route table has a tunnel key; then every datagram is sealed.
    pub ciphers: PairCiphers,
    /// Counter of the next sealed message (unique per message across all peers and restarts).
    pub send_counter: u64,
    pub notices: mpsc::Sender<Notice>,
    pub notice_limiter: NoticeLimiter,
    /// Outgoing packets waiting for a route table that knows their destination.
    pub pending: PendingPackets,
    pub liveness: LivenessConfig,
    /// How long the loop keeps reading without sleeping after packet work (`busy_poll`); zero sleeps at once.
    pub busy_poll: Duration,
}

/// What a drain did: how many packets it read, and whether it found its source empty (the poll is edge-triggered,
/// so a source not found empty is read again before the loop waits).
struct Drained {
    read: usize,
    empty: bool,
}

/// Where an outgoing packet sits in the TUN buffer: after room for the header and the sealing counter, and
/// before room for the tag, so sealing happens in place.
const TUN_PAYLOAD: usize = PAYLOAD_OFFSET;

/// Initial counter for sealed messages: the wall clock in nanoseconds, so a restarted agent continues above what
/// its peers have seen (it sends far fewer than one message per nanosecond).
pub fn initial_send_counter() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
}

/// Room for the longest GRO train the kernel may hand over (`gro_segments` datagrams of the underlay's size, as
/// quinn-udp asks: a shorter buffer truncates the train), and at least for one datagram of the largest packet.
fn recv_buffer_len(gro_segments: usize, max_datagram: usize) -> usize {
    (gro_segments.max(1) * max_datagram).max(PAYLOAD_OFFSET + MAX_PACKET + TAG_LEN)
}

impl Engine {
    pub fn run(mut self, mut poll: Poll, commands: Receiver<Command>) {
        let registered = poll
            .registry()
            .register(&mut SourceFd(&self.tun.as_raw_fd()), TUN_TOKEN, mio::Interest::READABLE)
            .and_then(|()| {
                let socket = self.socket.as_raw_fd();
                poll.registry().register(&mut SourceFd(&socket), SOCKET_TOKEN, mio::Interest::READABLE)
            });
        if let Err(err) = registered {
            tracing::error!("registering the TUN device and tunnel socket for polling: {err}");
            return;
        }
        let epoch = Instant::now();
        let mut batch = SendBatch::new(TUN_PAYLOAD, self.udp.max_gso_segments());
        let mut receive = ReceiveBuffers::new(recv_buffer_len(self.udp.gro_segments(), self.max_datagram));
        let mut events = Events::with_capacity(8);
        let (mut next_tick, mut next_liveness) = (epoch + TICK, epoch + LIVENESS_TICK);
        // Whatever was queued before the registration gives no edge: look once.
        let (mut tun_ready, mut socket_ready) = (true, true);
        loop {
            loop {
                match commands.try_recv() {
                    Ok(Command::Shutdown) | Err(TryRecvError::Disconnected) => return,
                    Ok(command) => {
                        if self.command(command) {
                            self.release_pending(&mut batch, epoch.elapsed());
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                }
            }
            let mut worked = false;
            // One clock read for the packets of this turn (the clock is read per wake-up, not per packet).
            let elapsed = epoch.elapsed();
            if tun_ready {
                let drained = self.drain_tun(&mut batch, elapsed);
                tun_ready = !drained.empty;
                worked |= drained.read > 0;
            }
            if socket_ready {
                let drained = self.drain_socket(&mut receive, elapsed);
                socket_ready = !drained.empty;
                worked |= drained.read > 0;
            }
            if worked && !tun_ready && !socket_ready {
                self.busy_poll(&mut batch, &mut receive, epoch);
            }
            // Read again: busy polling may have taken a while.
            let now = Instant::now();
            if now >= next_tick {
                self.housekeeping(now - epoch);
                next_tick = now + TICK;
            }
            if now >= next_liveness {
                self.check_liveness(now - epoch);
                next_liveness = now + LIVENESS_TICK;
            }
            let timeout = if tun_ready || socket_ready {
                Duration::ZERO
            } else {
                next_tick.min(next_liveness).saturating_duration_since(now)
            };
            if let Err(err) = poll.poll(&mut events, Some(timeout)) {
                if err.kind() == ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!("polling the TUN device and tunnel socket: {err}");
                return;
            }
            for event in events.iter() {
                match event.token() {
                    TUN_TOKEN => tun_ready = true,
                    SOCKET_TOKEN => socket_ready = true,
                    // Commands are read at the top of every turn.
                    _ => {}
                }
            }
        }
    }

    /// Reads and handles what waits on the TUN (up to a batch), then sends it.
    fn drain_tun(&mut self, batch: &mut SendBatch, now: Duration) -> Drained {
        let mut drained = Drained { read: 0, empty: false };
        for _ in 0..BATCH {
            match self.tun.recv(&mut batch.slot()[TUN_PAYLOAD..TUN_PAYLOAD + MAX_PACKET]) {
                Ok(len) => {
                    drained.read += 1;
                    self.handle_tun_packet(batch, len, now)
                }
                Err(err) if err.kind() == ErrorKind::WouldBlock => {
                    drained.empty = true;
                    break;
                }
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(err) => {
                    // Not a packet error (those never reach us): wait for the device's next edge.
                    tracing::warn!("reading the TUN device: {err}");
                    drained.empty = true;
                    break;
                }
            }
        }
        self.flush(batch);
        drained
    }

    /// Reads and handles what waits on the tunnel socket (up to a batch).
    fn drain_socket(&mut self, receive: &mut ReceiveBuffers, now: Duration) -> Drained {
        let mut drained = Drained { read: 0, empty: false };
        let mut failed = false;
        for _ in 0..BATCH / RECV_MESSAGES {
            let mut slices = receive.buffers.each_mut().map(|buffer| IoSliceMut::new(&mut buffer[..]));
            match self.udp.recv((&self.socket).into(), &mut slices, &mut receive.meta) {
                Ok(messages) => {
                    failed = false;
                    Counters::inc(&self.counters.tunnel_rx_reads);
                    for (buffer, meta) in receive.buffers.iter_mut().zip(&receive.meta).take(messages) {
                        let stride = meta.stride.max(1);
                        for datagram in buffer[..meta.len].chunks_mut(stride) {
                            let len = datagram.len();
                            drained.read += 1;
                            self.handle_tunnel_datagram(datagram, len, meta.addr, now);
                        }
                    }
                }
                Err(err) if err.kind() == ErrorKind::WouldBlock => {
                    drained.empty = true;
                    break;
                }
                // ICMP errors (port unreachable) surface here on Linux, one per read, and datagrams may wait behind
                // them: read on. Two errors in a row are not that; wait for the socket's next edge instead of spinning.
                Err(err) => {
                    tracing::debug!("tunnel socket: {err}");
                    if failed {
                        drained.empty = true;
                        break;
                    }
                    failed = true;
                }
            }
        }
        drained
    }

    /// After packet work, keeps reading both sources without sleeping until they have been quiet for
    /// `busy_poll`, or a batch has gone by (so commands and timers are not starved). The answer to what was just
    /// sent usually comes back within tens of microseconds; catching it awake saves the thread's wake-up, which
    /// on virtual machines costs about as much as the rest of the path. Between tries the thread yields its CPU:
    /// when whoever produces the answer waits for that CPU, spinning would only delay it.
    fn busy_poll(&mut self, batch: &mut SendBatch, receive: &mut ReceiveBuffers, epoch: Instant) {
        if self.busy_poll.is_zero() {
            return;
        }
        let mut quiet_since = Instant::now();
        let mut handled = 0;
        while handled < BATCH {
            let now = epoch.elapsed();
            let read = self.drain_tun(batch, now).read + self.drain_socket(receive, now).read;
            if read > 0 {
                handled += read;
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() >= self.busy_poll {
                break;
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// Handles a control command; returns true when a new route table is in force.
    fn command(&mut self, command: Command) -> bool {
        match command {
            Command::SetRoutes(table, reply) => {
                let listed: HashMap<NodeId, SocketAddr> =
                    self.proxy.routes().nodes.iter().map(|n| (n.id, n.endpoint)).collect();
                let result = self.proxy.set_routes(&table);
                if result.is_ok() {
                    let routes = self.proxy.routes();
                    self.ciphers.set_key(routes.tunnel_key);
                    // A newly listed endpoint replaces a roamed one until the peer's next authentic datagram.
                    for node in &routes.nodes {
                        if listed.get(&node.id) != Some(&node.endpoint) {
                            self.peers.relisted(node.id, node.endpoint);
                        }
                    }
                    self.notice_limiter.routes_changed();
                }
                let installed = result.is_ok();
                let _ = reply.send(result);
                return installed;
            }
            Command::Attach { namespace_ip, instance_ip } => self.proxy.attach(namespace_ip, instance_ip),
            Command::Detach { namespace_ip } => self.proxy.detach(namespace_ip),
            Command::Status(reply) => {
                let _ = reply.send(LoopStatus {
                    flows: self.proxy.flow_count(),
                    tunnel_peers: self.peers.len(),
                    reply_routes: self.proxy.reply_route_count(),
                    held_packets: self.pending.len(),
                    unreachable_peers: self.peers.unreachable_peers().count(),
                });
            }
            Command::Shutdown => {}
        }
        false
    }

    /// Sends on the held packets whose destination the new route table knows, oldest first.
    fn release_pending(&mut self, batch: &mut SendBatch, now: Duration) {
        loop {
            let proxy = &self.proxy;
            let out = &mut batch.slot()[TUN_PAYLOAD..TUN_PAYLOAD + MAX_PACKET];
            let Some(len) = self.pending.take_routable(|destination| proxy.knows(destination), out) else { break };
            Counters::inc(&self.counters.held_released);
            self.forward_outgoing(batch, len, now);
        }
        self.flush(batch);
    }

    /// A packet from a local instance, in `batch.slot()[TUN_PAYLOAD..TUN_PAYLOAD + len]`.
    fn handle_tun_packet(&mut self, batch: &mut SendBatch, len: usize, now: Duration) {
        Counters::inc(&self.counters.tun_rx_packets);
        Counters::add(&self.counters.tun_rx_bytes, len as u64);
        self.forward_outgoing(batch, len, now);
    }

    /// Translates and sends on a packet of a local instance (read from the TUN, or held until now).
    fn forward_outgoing(&mut self, batch: &mut SendBatch, len: usize, now: Duration) {
        let counters = self.counters.clone();
        let verdict = self.proxy.outgoing(&mut batch.slot()[TUN_PAYLOAD..TUN_PAYLOAD + len], now, &counters);
        if let Some(service) = self.proxy.take_new_connection()
            && self.notice_limiter.service_used(service, now)
        {
            let name = self.proxy.routes().services[service].name.clone();
            self.notify(Notice::ServiceUsed(name));
        }
        match verdict {
            Verdict::Drop => {}
            Verdict::Local => self.write_tun(&batch.slot()[TUN_PAYLOAD..TUN_PAYLOAD + len]),
            Verdict::Tunnel(node) => {
                let node = &self.proxy.routes().nodes[node];
                let (peer, listed) = (node.id, node.endpoint);
                self.tunnel_packet(batch, len, peer, Some(listed), now);
            }
            Verdict::TunnelToPeer(peer) => {
                let routes = self.proxy.routes();
                let listed = routes.node_by_id(peer).map(|node| routes.nodes[node].endpoint);
                self.tunnel_packet(batch, len, peer, listed, now);
            }
            // An instance of this machine that is listed but not attached.
            Verdict::RouteNotFound(_) => Counters::inc(&counters.drop_no_route),
            // The agent may find a route: the packet waits for it (untranslated) a little while.
            Verdict::UnknownAddress(address) => {
                match self.pending.hold(&batch.slot()[TUN_PAYLOAD..TUN_PAYLOAD + len], address, now) {
                    Ok(expired) => {
                        Counters::inc(&counters.packets_held);
                        Counters::add(&counters.held_expired, expired as u64);
                        Counters::add(&counters.drop_no_route, expired as u64);
                    }
                    Err(_) => Counters::inc(&counters.drop_no_route),
                }
                if self.notice_limiter.unknown_address(address, now) {
                    self.notify(Notice::UnknownAddress(address));
                }
            }
        }
    }

    /// Builds the tunnel datagram of the translated packet in `batch.slot()[TUN_PAYLOAD..TUN_PAYLOAD + len]` for
    /// `peer` (sealed in place, or with the plain header) and adds it to the batch. With sealed tunnels it goes to
    /// the peer's latest authentic endpoint when known, else to the `listed` one.
    fn tunnel_packet(
        &mut self,
        batch: &mut SendBatch,
        len: usize,
        peer: NodeId,
        listed: Option<SocketAddr>,
        now: Duration,
    ) {
        let sealing = self.ciphers.sealing();
        let Some((endpoint, evicted)) = self.peers.sent(peer, listed, sealing, now) else {
            // A learned reply route whose peer has gone idle: nowhere to send it.
            return Counters::inc(&self.counters.drop_no_route);
        };
        if evicted {
            Counters::inc(&self.counters.peers_evicted);
        }
        let slot = batch.slot();
        let size = if sealing {
            tunnel::write_header(slot, MessageType::Data, self.node_id, true);
            let Some(size) = self.seal(slot, len, peer) else { return };
            size
        } else {
            // Unsealed: the header goes right before the packet, and the datagram to the front of the slot.
            let start = TUN_PAYLOAD - HEADER_LEN;
            tunnel::write_header(&mut slot[start..], MessageType::Data, self.node_id, false);
            slot.copy_within(start..TUN_PAYLOAD + len, 0);
            HEADER_LEN + len
        };
        if !batch.push(size, endpoint) {
            self.send_batch(batch);
            batch.restart_with(size, endpoint);
        }
        if batch.full() {
            self.flush(batch);
        }
    }

    /// Sends the batched datagrams and empties the batch.
    fn flush(&self, batch: &mut SendBatch) {
        self.send_batch(batch);
        batch.clear();
    }

    /// Sends the batched datagrams (one GSO send when there are several); the batch is left as it is.
    fn send_batch(&self, batch: &mut SendBatch) {
        let Some(pending) = batch.pending() else { return };
        let transmit = quinn_udp::Transmit {
            destination: pending.destination,
            ecn: None,
            contents: pending.contents,
            segment_size: pending.segment_size,
            src_ip: None,
        };
        let sent = retry_when_full(self.socket.as_fd(), || self.udp.try_send((&self.socket).into(), &transmit));
        match sent {
            Ok(()) => {
                Counters::inc(&self.counters.tunnel_tx_sends);
                Counters::add(&self.counters.tunnel_tx_packets, pending.count as u64);
                Counters::add(&self.counters.tunnel_tx_bytes, pending.contents.len() as u64);
            }
            Err(err) => {
                Counters::add(&self.counters.tunnel_send_errors, pending.count as u64);
                tracing::debug!("sending {} datagrams to {}: {err}", pending.count, pending.destination);
            }
        }
        // quinn-udp turns GSO off when the kernel refuses it.
        batch.set_max_segments(self.udp.max_gso_segments());
    }

    /// Seals `buf[PAYLOAD_OFFSET..PAYLOAD_OFFSET + len]` (header already written) for `peer`; returns the sealed
    /// message's length.
    fn seal(&mut self, buf: &mut [u8], len: usize, peer: NodeId) -> Option<usize> {
        let counter = self.send_counter;
        self.send_counter += 1;
        let sealed = self.ciphers.seal(buf, len, peer, counter);
        if sealed.is_none() {
            Counters::inc(&self.counters.drop_unauthenticated);
        }
        sealed
    }

    /// Sends a control message (route-not-found, keepalive), sealed when tunnels are encrypted.
    fn send_control(&mut self, kind: MessageType, body: &[u8], peer: NodeId, endpoint: SocketAddr) {
        let mut buf = [0u8; PAYLOAD_OFFSET + 4 + TAG_LEN];
        if self.ciphers.sealing() {
            tunnel::write_header(&mut buf, kind, self.node_id, true);
            buf[PAYLOAD_OFFSET..PAYLOAD_OFFSET + body.len()].copy_from_slice(body);
            if let Some(size) = self.seal(&mut buf, body.len(), peer) {
                self.send(&buf[..size], endpoint);
            }
        } else {
            tunnel::write_header(&mut buf, kind, self.node_id, false);
            buf[HEADER_LEN..HEADER_LEN + body.len()].copy_from_slice(body);
            self.send(&buf[..HEADER_LEN + body.len()], endpoint);
        }
    }

    fn handle_tunnel_datagram(&mut self, buf: &mut [u8], len: usize, from: SocketAddr, now: Duration) {
        let counters = self.counters.clone();
        Counters::inc(&counters.tunnel_rx_packets);
        Counters::add(&counters.tunnel_rx_bytes, len as u64);
        let header = match tunnel::decode_header(&buf[..len]) {
            Ok(header) => header,
            Err(reason) => return counters.tunnel_malformed(reason),
        };
        if header.sealed != self.ciphers.sealing() {
            return Counters::inc(&counters.drop_unauthenticated);
        }
        let body = if header.sealed {
            let Some((counter, body)) = self.ciphers.open(&mut buf[..len], header.sender) else {
                return Counters::inc(&counters.drop_unauthenticated);
            };
            match self.peers.authentic(header.sender, from, counter, header.kind == MessageType::Data, now) {
                Err(tunnel::Replayed) => return Counters::inc(&counters.drop_replayed),
                Ok(accepted) => {
                    if accepted.recovered {
                        self.peer_recovered(header.sender);
                    }
                    if accepted.evicted {
                        Counters::inc(&counters.peers_evicted);
                    }
                    if accepted.roamed {
                        Counters::inc(&counters.peers_roamed);
                        tracing::debug!(peer = ?header.sender, %from, "peer roamed");
                    }
                }
            }
            body
        } else {
            let routes = self.proxy.routes();
            let listed = routes.node_by_id(header.sender).map(|node| routes.nodes[node].endpoint);
            if listed != Some(from) {
                return Counters::inc(&counters.drop_unknown_sender);
            }
            if self.peers.heard(header.sender) {
                self.peer_recovered(header.sender);
            }
            HEADER_LEN..len
        };
        match tunnel::decode_body(header.kind, &buf[body.clone()]) {
            Err(reason) => counters.tunnel_malformed(reason),
            Ok(Message::RouteNotFound(missing)) => {
                Counters::inc(&counters.route_not_found_received);
                if let Some(instance) = self.proxy.route_not_found(header.sender, missing) {
                    Counters::inc(&counters.instances_invalidated);
                    tracing::info!("{from} no longer hosts {missing}; its instance gets no new connections");
                    let routes = self.proxy.routes();
                    if let Some(service) = routes.service_of_instance(instance) {
                        let number = routes.instances[instance].number;
                        let notice = Notice::InstanceUnreachable { service: service.to_string(), instance: number };
                        self.notify(notice);
                    }
                }
            }
            Ok(Message::Keepalive) => Counters::inc(&counters.keepalives_received),
            // Answered with a keepalive, never a probe: two machines cannot ping-pong.
            Ok(Message::Probe) => {
                Counters::inc(&counters.probes_received);
                self.send_control(MessageType::Keepalive, &[], header.sender, from);
                Counters::inc(&counters.keepalives_sent);
            }
            Ok(Message::Data(_)) => {
                if !header.sealed && self.peers.received(header.sender, from, now) {
                    Counters::inc(&counters.peers_evicted);
                }
                match self.proxy.incoming(&mut buf[body.clone()], header.sender, now, &counters) {
                    Verdict::Local => self.write_tun(&buf[body]),
                    Verdict::RouteNotFound(missing) => {
                        Counters::inc(&counters.route_not_found_sent);
                        self.send_control(MessageType::RouteNotFound, &missing.octets(), header.sender, from);
                    }
                    _ => {}
                }
            }
        }
    }

    /// Hands a notice to the agent without waiting: dropped and counted when its queue is full.
    fn notify(&self, notice: Notice) {
        match self.notices.try_send(notice) {
            Ok(()) => Counters::inc(&self.counters.notices_sent),
            Err(_) => Counters::inc(&self.counters.notices_dropped),
        }
    }

    fn write_tun(&self, packet: &[u8]) {
        match retry_when_full(self.tun.as_fd(), || self.tun.send(packet)) {
            Ok(_) => {
                Counters::inc(&self.counters.tun_tx_packets);
                Counters::add(&self.counters.tun_tx_bytes, packet.len() as u64);
            }
            Err(err) => {
                Counters::inc(&self.counters.tun_write_errors);
                tracing::debug!("writing to the TUN device: {err}");
            }
        }
    }

    fn send(&self, datagram: &[u8], to: SocketAddr) {
        match retry_when_full(self.socket.as_fd(), || self.socket.send_to(datagram, to)) {
            Ok(_) => {
                Counters::inc(&self.counters.tunnel_tx_packets);
                Counters::add(&self.counters.tunnel_tx_bytes, datagram.len() as u64);
            }
            Err(err) => {
                Counters::inc(&self.counters.tunnel_send_errors);
                tracing::debug!("sending to {to}: {err}");
            }
        }
    }

    fn housekeeping(&mut self, now: Duration) {
        let counters = self.counters.clone();
        let (flows, reply_routes) = self.proxy.expire(now);
        Counters::add(&counters.flows_expired, flows as u64);
        Counters::add(&counters.reply_routes_expired, reply_routes as u64);
        let proxy = &mut self.proxy;
        let expired_peers = self.peers.expire(now, |peer| proxy.node_reachable(peer));
        Counters::add(&counters.peers_expired, expired_peers as u64);
        let expired = self.pending.expire(now);
        Counters::add(&counters.held_expired, expired as u64);
        Counters::add(&counters.drop_no_route, expired as u64);
        for (peer, endpoint) in self.peers.keepalives_due(now, self.keepalive_interval) {
            self.send_control(MessageType::Keepalive, &[], peer, endpoint);
            Counters::inc(&counters.keepalives_sent);
        }
    }

    /// Probes silent peers we send to, and acts on those that have just become unreachable.
    fn check_liveness(&mut self, now: Duration) {
        for (peer, endpoint, action) in self.peers.poll_liveness(now, &self.liveness) {
            if action.probe {
                self.send_control(MessageType::Probe, &[], peer, endpoint);
                Counters::inc(&self.counters.probes_sent);
            }
            if action.became_unreachable {
                self.peer_unreachable(peer, now);
            }
        }
    }

    /// A peer stopped answering: like route-not-found for each of its instances (no new connections; the agent
    /// is told so it can re-query), until it is heard from again.
    fn peer_unreachable(&mut self, peer: NodeId, now: Duration) {
        Counters::inc(&self.counters.peers_unreachable);
        let lost = self.proxy.node_unreachable(peer);
        let routes = self.proxy.routes();
        let name = routes.node_by_id(peer).map_or("(not in the table)", |node| routes.nodes[node].name.as_str());
        tracing::warn!(
            ?peer,
            node = name,
            instances = lost.len(),
            "tunnel peer stopped answering; its instances get no new connections"
        );
        if !self.notice_limiter.peer_unreachable(peer, now) {
            return;
        }
        for instance in lost {
            let routes = self.proxy.routes();
            if let Some(service) = routes.service_of_instance(instance) {
                let number = routes.instances[instance].number;
                self.notify(Notice::InstanceUnreachable { service: service.to_string(), instance: number });
            }
        }
    }

    fn peer_recovered(&mut self, peer: NodeId) {
        Counters::inc(&self.counters.peers_recovered);
        self.proxy.node_reachable(peer);
        tracing::info!(?peer, "tunnel peer answers again; its instances are available");
    }
}

/// Runs `write`, and when `fd`'s queue is full waits for room and tries again, for at most `WRITE_WAIT` in all: the
/// loop has nothing better to do than let the queue drain, as a packet dropped here is a TCP segment lost. The bound
/// is overall because a queue can report room that is still too little for this write.
fn retry_when_full<T>(fd: BorrowedFd<'_>, mut write: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
    use nix::poll::{PollFd, PollFlags, PollTimeout};
    let mut deadline = None;
    loop {
        match write() {
            Err(err) if err.kind() == ErrorKind::WouldBlock => {
                let deadline = *deadline.get_or_insert_with(|| Instant::now() + WRITE_WAIT);
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(err);
                }
                let mut fds = [PollFd::new(fd, PollFlags::POLLOUT)];
                // poll(2) counts whole milliseconds: round up, so the wait does not end before the deadline.
                let millis = i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
                let timeout = PollTimeout::try_from(millis).unwrap_or(PollTimeout::MAX);
                match nix::poll::poll(&mut fds, timeout) {
                    // Room, a timeout (one last try) or a signal: the write again, then the deadline decides.
                    Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                    Err(poll_err) => return Err(poll_err.into()),
                }
            }
            Err(err) if err.kind() == ErrorKind::Interrupted => continue,
            result => return result,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    #[test]
    fn a_command_wakes_the_poll_and_waits_in_the_channel() {
        let (mut poll, sender, receiver) = command_channel().unwrap();
        // The agent keeps its sender: the waker lives as long as one does.
        let agent_side = sender.clone();
        let from_agent = std::thread::spawn(move || agent_side.send(Command::Shutdown).is_ok());
        let mut events = Events::with_capacity(4);
        poll.poll(&mut events, Some(Duration::from_secs(5))).unwrap();
        assert!(events.iter().any(|event| event.token() == COMMAND_TOKEN), "no wake-up within 5 s");
        assert!(from_agent.join().unwrap());
        assert!(matches!(receiver.try_recv(), Ok(Command::Shutdown)));
        drop(sender);
    }

    #[test]
    fn sending_to_a_stopped_loop_fails() {
        let (_poll, sender, receiver) = command_channel().unwrap();
        drop(receiver);
        assert!(sender.send(Command::Shutdown).is_err());
    }

    /// A datagram socket pair whose sending side is full.
    fn full_pair() -> (UnixDatagram, UnixDatagram) {
        let (writer, reader) = UnixDatagram::pair().unwrap();
        writer.set_nonblocking(true).unwrap();
        while writer.send(&[0u8; 512]).is_ok() {}
        (writer, reader)
    }

    #[test]
    fn a_full_queue_is_waited_for_until_it_drains() {
        let (writer, reader) = full_pair();
        let drain = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            reader.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 512];
            while reader.recv(&mut buf).is_ok() {}
            reader
        });
        let sent = retry_when_full(writer.as_fd(), || writer.send(b"after the wait"));
        assert_eq!(sent.unwrap(), 14);
        drop(drain.join().unwrap());
    }

    #[test]
    fn a_queue_that_stays_full_gives_up_after_the_wait() {
        let (writer, _reader) = full_pair();
        let started = Instant::now();
        let sent = retry_when_full(writer.as_fd(), || writer.send(b"never"));
        assert_eq!(sent.unwrap_err().kind(), ErrorKind::WouldBlock);
        assert!(started.elapsed() >= WRITE_WAIT, "gave up after {:?}", started.elapsed());
    }
}
