//! The packet loop: one thread with its own single-threaded runtime owns the TUN device, the tunnel socket, the
//! proxy and the peer table. Packets are read into reused buffers, translated in place and sent on without a
//! channel hop or allocation; control commands (new routes, attach, detach, status) arrive on a channel.

use super::counters::Counters;
use super::proxy::{Proxy, Verdict};
use super::routes::{NodeId, RouteTable};
use super::tunnel::{self, HEADER_LEN, MAX_PACKET, Message, MessageType, PeerTable};
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
}

impl Engine {
    pub async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let epoch = Instant::now();
        let mut tun_buf = vec![0u8; HEADER_LEN + MAX_PACKET].into_boxed_slice();
        let mut udp_buf = vec![0u8; HEADER_LEN + MAX_PACKET].into_boxed_slice();
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
                        match self.tun.try_recv(&mut tun_buf[HEADER_LEN..]) {
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
                let _ = reply.send(self.proxy.set_routes(&table));
            }
            Command::Attach { namespace_ip, instance_ip } => self.proxy.attach(namespace_ip, instance_ip),
            Command::Detach { namespace_ip } => self.proxy.detach(namespace_ip),
            Command::Status(reply) => {
                let _ = reply.send(LoopStatus { flows: self.proxy.flow_count(), tunnel_peers: self.peers.len() });
            }
            Command::Shutdown => {}
        }
    }

    /// A packet from a local instance, in `buf[HEADER_LEN..HEADER_LEN + len]`.
    async fn handle_tun_packet(&mut self, buf: &mut [u8], len: usize, now: Duration) {
        let counters = &*self.counters;
        Counters::inc(&counters.tun_rx_packets);
        Counters::add(&counters.tun_rx_bytes, len as u64);
        match self.proxy.outgoing(&mut buf[HEADER_LEN..HEADER_LEN + len], now, counters) {
            Verdict::Drop => {}
            Verdict::Local => self.write_tun(&buf[HEADER_LEN..HEADER_LEN + len]).await,
            Verdict::Tunnel(node) => {
                let node = &self.proxy.routes().nodes[node];
                let (peer_id, endpoint) = (node.id, node.endpoint);
                tunnel::write_header(&mut buf[..HEADER_LEN], MessageType::Data, self.node_id);
                self.send(&buf[..HEADER_LEN + len], endpoint).await;
                if self.peers.sent(peer_id, endpoint, now) {
                    Counters::inc(&counters.peers_evicted);
                }
            }
            // An instance of this machine that is listed but not attached.
            Verdict::RouteNotFound(_) => Counters::inc(&counters.drop_no_route),
        }
    }

    async fn handle_tunnel_datagram(&mut self, buf: &mut [u8], len: usize, from: SocketAddr, now: Duration) {
        let counters = self.counters.clone();
        Counters::inc(&counters.tunnel_rx_packets);
        Counters::add(&counters.tunnel_rx_bytes, len as u64);
        let (sender, route_not_found) = match tunnel::decode(&buf[..len]) {
            Err(reason) => {
                counters.tunnel_malformed(reason);
                return;
            }
            Ok((sender, Message::Data(_))) => (sender, None),
            Ok((sender, Message::RouteNotFound(missing))) => (sender, Some(Some(missing))),
            Ok((sender, Message::Keepalive)) => (sender, Some(None)),
        };
        let Some(node) = self.proxy.routes().node_by_id(sender) else {
            Counters::inc(&counters.drop_unknown_sender);
            return;
        };
        if self.proxy.routes().nodes[node].endpoint != from {
            Counters::inc(&counters.drop_unknown_sender);
            return;
        }
        match route_not_found {
            Some(Some(missing)) => {
                Counters::inc(&counters.route_not_found_received);
                if self.proxy.route_not_found(node, missing) {
                    Counters::inc(&counters.instances_invalidated);
                    tracing::info!("{from} no longer hosts {missing}; its instance gets no new connections");
                }
                return;
            }
            Some(None) => {
                Counters::inc(&counters.keepalives_received);
                return;
            }
            None => {}
        }
        if self.peers.received(sender, from, now) {
            Counters::inc(&counters.peers_evicted);
        }
        match self.proxy.incoming(&mut buf[HEADER_LEN..len], now, &counters) {
            Verdict::Local => self.write_tun(&buf[HEADER_LEN..len]).await,
            Verdict::RouteNotFound(missing) => {
                Counters::inc(&counters.route_not_found_sent);
                let mut answer = [0u8; HEADER_LEN + 4];
                let answer_len = tunnel::encode_route_not_found(&mut answer, self.node_id, missing);
                self.send(&answer[..answer_len], from).await;
            }
            Verdict::Drop | Verdict::Tunnel(_) => {}
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
        for (_, endpoint) in self.peers.keepalives_due(now, self.keepalive_interval) {
            let mut keepalive = [0u8; HEADER_LEN];
            tunnel::encode_keepalive(&mut keepalive, self.node_id);
            self.send(&keepalive, endpoint).await;
            Counters::inc(&counters.keepalives_sent);
        }
    }
}
