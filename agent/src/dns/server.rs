//! Serving the handler on a UDP socket and a TCP listener on the same address.
//!
//! TCP goes through hickory's [`Server`]. UDP has its own small receive loop built from hickory's pieces
//! ([`UdpStream`], [`Request::from_bytes`], [`ResponseHandle`]) because hickory's loop drops undecodable datagrams
//! without telling anyone, and we count them; it also caps the requests in flight.

use super::api::{DnsStatus, StatusSource};
use super::counters::{DnsCounters, DnsStats};
use super::handler::DnsHandler;
use futures::StreamExt;
use hickory_server::Server;
use hickory_server::net::runtime::{TokioRuntimeProvider, TokioTime};
use hickory_server::net::udp::UdpStream;
use hickory_server::net::xfer::Protocol;
use hickory_server::proto::op::MessageType;
use hickory_server::server::{Request, RequestHandler, ResponseHandle};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, warn};

/// UDP requests handled at once; more are dropped (and counted) rather than queued without bound.
const MAX_UDP_IN_FLIGHT: usize = 1024;
/// A TCP client that sends nothing for this long is disconnected.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Responses queued per TCP connection.
const TCP_RESPONSE_BUFFER: usize = 32;
/// How often a wildcard port (0) is retried when the TCP side of the chosen UDP port is taken.
const BIND_ATTEMPTS: usize = 8;

/// A running resolver. Dropping it stops it too (in the background); [`RunningResolver::shutdown`] waits.
pub struct RunningResolver {
    local_addr: SocketAddr,
    counters: Arc<DnsCounters>,
    status: StatusSource,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl RunningResolver {
    /// The address both the UDP socket and the TCP listener are bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn stats(&self) -> DnsStats {
        self.counters.snapshot()
    }

    pub fn status(&self) -> DnsStatus {
        self.status.status()
    }

    /// `GET /v1/dns` for the local API; keeps answering (with frozen counters) after a shutdown.
    pub fn router(&self) -> axum::Router {
        self.status.router()
    }

    /// Stops serving, closes both sockets and waits until they are closed.
    pub async fn shutdown(mut self) {
        self.stop.take();
        if let Some(task) = self.task.take()
            && let Err(error) = task.await
        {
            warn!(%error, "the DNS server task failed");
        }
    }
}

impl Drop for RunningResolver {
    fn drop(&mut self) {
        // Dropping the sender wakes the server task, which then closes its sockets.
        self.stop.take();
    }
}

/// Binds UDP and TCP on `listen` (the same port for both, also when `listen` has port 0).
pub(super) async fn bind(listen: SocketAddr) -> std::io::Result<(UdpSocket, TcpListener)> {
    let mut last_error = None;
    for _ in 0..BIND_ATTEMPTS {
        let udp = UdpSocket::bind(listen).await?;
        match TcpListener::bind(udp.local_addr()?).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(error) if listen.port() == 0 && error.kind() == std::io::ErrorKind::AddrInUse => {
                last_error = Some(error)
            }
            Err(error) => return Err(error),
        }
    }
    Err(last_error.unwrap_or_else(|| std::io::Error::other("cannot bind the DNS sockets")))
}

/// What [`start`] serves: the handler, and what the status route shows about it.
pub(super) struct Serving {
    pub(super) handler: DnsHandler,
    pub(super) counters: Arc<DnsCounters>,
    pub(super) domain: String,
    pub(super) upstreams: Vec<SocketAddr>,
}

pub(super) fn start(udp: UdpSocket, tcp: TcpListener, serving: Serving) -> std::io::Result<RunningResolver> {
    let Serving { handler, counters, domain, upstreams } = serving;
    let local_addr = udp.local_addr()?;
    let status = StatusSource { listen: local_addr, domain, upstreams, counters: counters.clone() };
    let mut tcp_server = Server::new(handler.clone());
    tcp_server.register_listener(tcp, TCP_IDLE_TIMEOUT, TCP_RESPONSE_BUFFER);
    let (stop, stopped) = oneshot::channel::<()>();
    let udp_counters = counters.clone();
    let task = tokio::spawn(async move {
        tokio::select! {
            () = serve_udp(udp, handler, udp_counters) => warn!("the DNS UDP socket closed"),
            _ = stopped => {}
        }
        if let Err(error) = tcp_server.shutdown_gracefully().await {
            warn!(%error, "the DNS TCP listener failed");
        }
        info!(%local_addr, "DNS resolver stopped");
    });
    info!(%local_addr, "DNS resolver listening on UDP and TCP");
    Ok(RunningResolver { local_addr, counters, status, stop: Some(stop), task: Some(task) })
}

async fn serve_udp(socket: UdpSocket, handler: DnsHandler, counters: Arc<DnsCounters>) {
    // The stream's default peer is never used: every response goes to the address its request came from.
    let unused_peer = SocketAddr::from(([127, 255, 255, 254], 0));
    let (mut stream, responses) = UdpStream::<TokioRuntimeProvider>::with_bound(socket, unused_peer);
    let mut in_flight = JoinSet::new();
    while let Some(received) = stream.next().await {
        while in_flight.try_join_next().is_some() {}
        let (bytes, client) = match received {
            Ok(message) => message.into_parts(),
            Err(error) => {
                debug!(%error, "DNS UDP receive error");
                continue;
            }
        };
        // A response to port 0 or the unspecified address cannot arrive; such sources are spoofed.
        if client.port() == 0 || client.ip().is_unspecified() {
            DnsCounters::bump(&counters.malformed_packets);
            continue;
        }
        let request = match Request::from_bytes(bytes, client, Protocol::Udp) {
            // Answering responses would let anyone bounce traffic off us.
            Ok(request) if request.metadata.message_type == MessageType::Query => request,
            Ok(_) | Err(_) => {
                DnsCounters::bump(&counters.malformed_packets);
                debug!(%client, "dropped a UDP datagram that is not a DNS query");
                continue;
            }
        };
        if in_flight.len() >= MAX_UDP_IN_FLIGHT {
            DnsCounters::bump(&counters.overload_drops);
            continue;
        }
        let handle = ResponseHandle::new(client, responses.with_remote_addr(client), Protocol::Udp);
        let handler = handler.clone();
        in_flight.spawn(async move {
            handler.handle_request::<_, TokioTime>(&request, handle).await;
        });
    }
}
