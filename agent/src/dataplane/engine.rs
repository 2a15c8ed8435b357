//! The packet loop: one thread with its own single-threaded runtime owns the TUN device, the tunnel socket, the
//! proxy and the peer table. Packets are read into reused buffers, translated in place and sent on without a
//! channel hop or allocation; control commands (new routes, attach, detach, status) arrive on a channel.

use super::counters::Counters;
use super::crypto::{self, PAYLOAD_OFFSET, TAG_LEN};
use super::proxy::{Proxy, Verdict};
use super::routes::{NodeId, RouteTable};
use super::tunnel::{self, HEADER_LEN, MAX_PACKET, Message, MessageType, PeerTable};
use chacha20poly1305::ChaCha20Poly1305;
use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tun_rs::AsyncDevice;

/// Packets handled per readiness event before yielding to the other source (fairness, batch-friendly).
const BATCH: usize = 64;
const TICK: Duration = Duration::from_secs(1);

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
}

pub struct Engine {
    pub proxy: Proxy,
    pub peers: PeerTable,
    pub counters: Arc<Counters>,
    pub tun: AsyncDevice,
    pub socket: UdpSocket,
    pub node_id: NodeId,
    pub keepalive_interval: Duration,
    /// Per-peer ciphers when the route table has a tunnel key; then every datagram is sealed.
    pub ciphers: HashMap<NodeId, ChaCha20Poly1305>,
    pub sealing: bool,
    /// Counter of the next sealed message (unique per message across all peers and restarts).
    pub send_counter: u64,
}

/// Where an outgoing packet sits in the TUN buffer: after room for the header and the sealing counter, and
/// before room for the tag, so sealing happens in place.
const TUN_PAYLOAD: usize = PAYLOAD_OFFSET;

/// Initial counter for sealed messages: the wall clock in nanoseconds, so a restarted agent continues above what
/// its peers have seen (it sends far fewer than one message per nanosecond).
pub fn initial_send_counter() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
}

impl Engine {
    pub async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let epoch = Instant::now();
        let mut tun_buf = vec![0u8; TUN_PAYLOAD + MAX_PACKET + TAG_LEN].into_boxed_slice();
        let mut udp_buf = vec![0u8; PAYLOAD_OFFSET + MAX_PACKET + TAG_LEN].into_boxed_slice();
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                biased;
                command = commands.recv() => match command {
                    None | Some(Command::Shutdown) => return,
                    Some(command) => self.command(command),
                },
                ready = self.tun.readable() => {
                    if let Err(err) = ready {
                        tracing::error!("TUN device failed: {err}");
                        return;
                    }
                    let now = epoch.elapsed();
                    for _ in 0..BATCH {
                        match self.tun.try_recv(&mut tun_buf[TUN_PAYLOAD..TUN_PAYLOAD + MAX_PACKET]) {
                            Ok(len) => self.handle_tun_packet(&mut tun_buf, len, now).await,
                            Err(err) if err.kind() == ErrorKind::WouldBlock => break,
                            Err(err) => {
                                tracing::warn!("reading the TUN device: {err}");
                                break;
                            }
                        }
                    }
                }
                ready = self.socket.readable() => {
                    if let Err(err) = ready {
                        tracing::error!("tunnel socket failed: {err}");
                        return;
                    }
                    let now = epoch.elapsed();
                    for _ in 0..BATCH {
                        match self.socket.try_recv_from(&mut udp_buf) {
                            Ok((len, from)) => self.handle_tunnel_datagram(&mut udp_buf, len, from, now).await,
                            Err(err) if err.kind() == ErrorKind::WouldBlock => break,
                            // ICMP errors (port unreachable) surface here on Linux; nothing to do but go on.
                            Err(err) => {
                                tracing::debug!("tunnel socket: {err}");
                                break;
                            }
                        }
                    }
                }
                _ = tick.tick() => self.housekeeping(epoch.elapsed()).await,
            }
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::SetRoutes(table, reply) => {
                let result = self.proxy.set_routes(&table);
                if result.is_ok() {
                    let routes = self.proxy.routes();
                    self.sealing = routes.tunnel_key.is_some();
                    self.ciphers = match &routes.tunnel_key {
                        Some(master) => routes
                            .nodes
                            .iter()
                            .map(|n| (n.id, crypto::pair_cipher(master, self.node_id, n.id)))
                            .collect(),
                        None => HashMap::new(),
                    };
                }
                let _ = reply.send(result);
            }
            Command::Attach { namespace_ip, instance_ip } => self.proxy.attach(namespace_ip, instance_ip),
            Command::Detach { namespace_ip } => self.proxy.detach(namespace_ip),
            Command::Status(reply) => {
                let _ = reply.send(LoopStatus { flows: self.proxy.flow_count(), tunnel_peers: self.peers.len() });
            }
            Command::Shutdown => {}
        }
    }

    /// A packet from a local instance, in `buf[TUN_PAYLOAD..TUN_PAYLOAD + len]`.
    async fn handle_tun_packet(&mut self, buf: &mut [u8], len: usize, now: Duration) {
        let counters = self.counters.clone();
        Counters::inc(&counters.tun_rx_packets);
        Counters::add(&counters.tun_rx_bytes, len as u64);
        match self.proxy.outgoing(&mut buf[TUN_PAYLOAD..TUN_PAYLOAD + len], now, &counters) {
            Verdict::Drop => {}
            Verdict::Local => self.write_tun(&buf[TUN_PAYLOAD..TUN_PAYLOAD + len]).await,
            Verdict::Tunnel(node) => {
                let node = &self.proxy.routes().nodes[node];
                let (peer_id, endpoint) = (node.id, node.endpoint);
                let sent = if self.sealing {
                    tunnel::write_header(buf, MessageType::Data, self.node_id, true);
                    self.seal_and_send(buf, len, peer_id, endpoint).await
                } else {
                    // Unsealed: the header goes right before the packet.
                    let start = TUN_PAYLOAD - HEADER_LEN;
                    tunnel::write_header(&mut buf[start..], MessageType::Data, self.node_id, false);
                    self.send(&buf[start..TUN_PAYLOAD + len], endpoint).await;
                    true
                };
                if sent && self.peers.sent(peer_id, endpoint, now) {
                    Counters::inc(&counters.peers_evicted);
                }
            }
            // An instance of this machine that is listed but not attached.
            Verdict::RouteNotFound(_) => Counters::inc(&counters.drop_no_route),
        }
    }

    /// Seals `buf[PAYLOAD_OFFSET..PAYLOAD_OFFSET + len]` (header already written) for `peer` and sends it.
    async fn seal_and_send(&mut self, buf: &mut [u8], len: usize, peer: NodeId, endpoint: SocketAddr) -> bool {
        let Some(cipher) = self.ciphers.get(&peer) else {
            Counters::inc(&self.counters.drop_unauthenticated);
            return false;
        };
        let counter = self.send_counter;
        self.send_counter += 1;
        let total = crypto::seal(cipher, buf, len, self.node_id, peer, counter);
        self.send(&buf[..total], endpoint).await;
        true
    }

    /// Sends a control message (route-not-found, keepalive), sealed when tunnels are encrypted.
    async fn send_control(&mut self, kind: MessageType, body: &[u8], peer: NodeId, endpoint: SocketAddr) {
        let mut buf = [0u8; PAYLOAD_OFFSET + 4 + TAG_LEN];
        if self.sealing {
            tunnel::write_header(&mut buf, kind, self.node_id, true);
            buf[PAYLOAD_OFFSET..PAYLOAD_OFFSET + body.len()].copy_from_slice(body);
            self.seal_and_send(&mut buf, body.len(), peer, endpoint).await;
        } else {
            tunnel::write_header(&mut buf, kind, self.node_id, false);
            buf[HEADER_LEN..HEADER_LEN + body.len()].copy_from_slice(body);
            self.send(&buf[..HEADER_LEN + body.len()], endpoint).await;
        }
    }

    async fn handle_tunnel_datagram(&mut self, buf: &mut [u8], len: usize, from: SocketAddr, now: Duration) {
        let counters = self.counters.clone();
        Counters::inc(&counters.tunnel_rx_packets);
        Counters::add(&counters.tunnel_rx_bytes, len as u64);
        let header = match tunnel::decode_header(&buf[..len]) {
            Ok(header) => header,
            Err(reason) => return counters.tunnel_malformed(reason),
        };
        let Some(node) = self.proxy.routes().node_by_id(header.sender) else {
            return Counters::inc(&counters.drop_unknown_sender);
        };
        if self.proxy.routes().nodes[node].endpoint != from {
            return Counters::inc(&counters.drop_unknown_sender);
        }
        if header.sealed != self.sealing {
            return Counters::inc(&counters.drop_unauthenticated);
        }
        let body = if header.sealed {
            let Some(cipher) = self.ciphers.get(&header.sender) else {
                return Counters::inc(&counters.drop_unauthenticated);
            };
            let Some((counter, body)) = crypto::open(cipher, &mut buf[..len], header.sender, self.node_id) else {
                return Counters::inc(&counters.drop_unauthenticated);
            };
            if self.peers.received(header.sender, from, now) {
                Counters::inc(&counters.peers_evicted);
            }
            if !self.peers.accept_counter(header.sender, counter) {
                return Counters::inc(&counters.drop_replayed);
            }
            body
        } else {
            HEADER_LEN..len
        };
        match tunnel::decode_body(header.kind, &buf[body.clone()]) {
            Err(reason) => counters.tunnel_malformed(reason),
            Ok(Message::RouteNotFound(missing)) => {
                Counters::inc(&counters.route_not_found_received);
                if self.proxy.route_not_found(node, missing) {
                    Counters::inc(&counters.instances_invalidated);
                    tracing::info!("{from} no longer hosts {missing}; its instance gets no new connections");
                }
            }
            Ok(Message::Keepalive) => Counters::inc(&counters.keepalives_received),
            Ok(Message::Data(_)) => {
                if !header.sealed && self.peers.received(header.sender, from, now) {
                    Counters::inc(&counters.peers_evicted);
                }
                match self.proxy.incoming(&mut buf[body.clone()], now, &counters) {
                    Verdict::Local => self.write_tun(&buf[body]).await,
                    Verdict::RouteNotFound(missing) => {
                        Counters::inc(&counters.route_not_found_sent);
                        self.send_control(MessageType::RouteNotFound, &missing.octets(), header.sender, from).await;
                    }
                    Verdict::Drop | Verdict::Tunnel(_) => {}
                }
            }
        }
    }

    async fn write_tun(&self, packet: &[u8]) {
        match self.tun.send(packet).await {
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

    async fn send(&self, datagram: &[u8], to: SocketAddr) {
        match self.socket.send_to(datagram, to).await {
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

    async fn housekeeping(&mut self, now: Duration) {
        let counters = self.counters.clone();
        Counters::add(&counters.flows_expired, self.proxy.expire(now) as u64);
        Counters::add(&counters.peers_expired, self.peers.expire(now) as u64);
        for (peer, endpoint) in self.peers.keepalives_due(now, self.keepalive_interval) {
            self.send_control(MessageType::Keepalive, &[], peer, endpoint).await;
            Counters::inc(&counters.keepalives_sent);
        }
    }
}
