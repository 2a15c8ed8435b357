//! The data plane: Oakestra's NetManager/ProxyTUN done right (seed 002 §3.4–3.6, DESIGN.md "Data plane").
//!
//! Pure parts (no I/O, unit-tested and fuzzed): `packet` (parse, in-place rewrite, RFC 1624 checksums, MSS clamp),
//! `flow` (bounded connection table), `proxy` (the translation decision), `policy` (which instance), `tunnel` (wire format, peer table),
//! `liveness` (silent peers), `pending` (packets waiting for a route), `routes` (route table types and index). I/O shell: `device` (TUN), `setup` (netlink), `engine` (packet loop),
//! this module (the `DataPlane` handle) and `api` (HTTP routes). `commands` holds the CLI.
//!
//! # Public API (for the daemon)
//! ```ignore
//! let dp = DataPlane::start(DataPlaneConfig::new(node_name, subnet)).await?; // needs root
//! dp.set_routes(table).await?;            // RouteTable: nodes, services, instances (routes issue feeds it)
//! let mut rx = dp.watch_routes();         // watch::Receiver<RouteTable>: the table in force, on every change
//! let mut notices = dp.take_notices().unwrap(); // mpsc::Receiver<Notice>: table queries etc. (first call only)
//! let a = dp.attach(AttachRequest { .. }).await?;   // veth + namespace IP into a service namespace
//! dp.detach("app.appns.svc.svcns", 0).await?;
//! dp.counters();                          // CounterSnapshot (drops by reason, packets, bytes)
//! dp.status().await;                      // DataPlaneStatus (also GET /v1/dataplane)
//! let router = dp.router();               // axum::Router: /v1/dataplane, /v1/dataplane/routes, /v1/instances
//! dp.shutdown().await?;                   // removes everything it installed
//! ```
//! Routes need not be complete: with sealed tunnels a machine accepts authentic datagrams from machines its table
//! does not list and sends replies back along routes learned from that traffic (`reply_routes`); `Notice`s ask
//! the agent for the rest. A packet to an overlay address the table does not know waits (up to 1 s, bounded) for
//! the table that knows it, so `set_routes` soon after `Notice::UnknownAddress` loses nothing. Tunnel peers we send
//! to but do not hear from are probed; silent for ~3 s more, their instances get no new connections and each
//! becomes a `Notice::InstanceUnreachable`. `start` may run at any point of the agent's life, and `shutdown` then `start` again
//! with the same prefix works (the agent restarts the data plane when its subnet is renumbered).
//!
//! Kernel objects are named after `DataPlaneConfig::prefix` (bridge `<p>br`, TUN `<p>tun`, veths `<p>h<n>`,
//! namespaces `<p>-<service>-<n>`); `start` removes any left by a crashed run with the same prefix.

pub mod api;
pub mod batch;
pub mod commands;
pub mod counters;
pub mod cpu_latency;
pub mod crypto;
pub mod device;
pub mod engine;
pub mod flow;
pub mod liveness;
pub mod notices;
pub mod packet;
pub mod pending;
pub mod policy;
pub mod proxy;
pub mod reply_routes;
pub mod routes;
pub mod setup;
pub mod tunnel;

use crate::netns::{self, NamespaceRef};
use anyhow::{Context, anyhow, bail};
use counters::{CounterSnapshot, Counters};
use crypto::PairCiphers;
use engine::{Command, CommandSender, Engine, LoopStatus};
use flow::FlowTimeouts;
use ipnet::Ipv4Net;
use notices::NoticeLimiter;
use proxy::{Proxy, ProxyConfig};
use routes::{NodeId, RouteIndex, RouteTable};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, mpsc, oneshot, watch};
use tunnel::PeerTable;

pub use notices::Notice;

pub const DEFAULT_TUNNEL_PORT: u16 = 50103;
pub const DEFAULT_SERVICE_RANGE: &str = "10.30.0.0/16";
pub const DEFAULT_PREFIX: &str = "cnp";

#[derive(Debug, Clone)]
pub struct DataPlaneConfig {
    /// This machine's name in route tables (its tunnel identity is derived from it).
    pub node_name: String,
    /// This machine's instance subnet; the bridge holds its first host address.
    pub subnet: Ipv4Net,
    /// ServiceIPs and InstanceIPs, routed into the TUN.
    pub service_range: Ipv4Net,
    pub listen: SocketAddr,
    /// MTU of the underlay; the TUN and veths get this minus the tunnel overhead.
    pub underlay_mtu: u16,
    /// Prefix of every kernel object this agent creates (at most 8 characters).
    pub prefix: String,
    /// Start of the names of the network namespaces this agent creates (`<netns_prefix><service>-<n>`). Namespace
    /// names are global to the host, unlike links: agents sharing a host (one per namespace, as in the testbeds)
    /// need distinct ones, or one would remove the other's as leftovers.
    pub netns_prefix: String,
    /// Namespaces of ours that outlived a crash of the agent with their service still running: not removed as
    /// leftovers, so the restarted agent can attach them again.
    pub keep_netns: Vec<String>,
    pub flow_capacity: NonZeroUsize,
    pub flow_timeouts: FlowTimeouts,
    pub peer_capacity: NonZeroUsize,
    pub peer_idle_timeout: Duration,
    pub keepalive_interval: Duration,
    /// When to probe a silent peer and when to give up on it.
    pub liveness: liveness::LivenessConfig,
    /// Client InstanceIPs remembered from traffic so replies find their way back (they expire with
    /// `peer_idle_timeout`).
    pub reply_route_capacity: NonZeroUsize,
    /// Notices waiting for the agent; more are dropped (and counted).
    pub notice_queue: usize,
    /// Bound on CPU wake-up latency held while the data plane runs (see `cpu_latency`); `None` leaves the
    /// machine's idle states alone.
    pub cpu_latency_us: Option<u32>,
    /// How long the packet loop keeps reading after packet work before it sleeps (see `Engine::busy_poll`).
    pub busy_poll: Duration,
    /// The tunnel socket, when the caller bound `listen` already (see [`ReservedSocket`]).
    pub reserved_socket: ReservedSocket,
}

/// A tunnel socket bound before the data plane starts, which the data plane then takes instead of binding its
/// listen address. An agent in tree mode binds its tunnel port first thing: its data plane starts only when the
/// tree grants a subnet, and by then any socket the agent opened meanwhile (libp2p's, mDNS's per interface) could
/// hold the port, which left the machine in the tree without a data plane (seen once in the Mininet testbed).
#[derive(Debug, Clone, Default)]
pub struct ReservedSocket(Arc<std::sync::Mutex<Option<std::net::UdpSocket>>>);

impl ReservedSocket {
    pub fn new(socket: std::net::UdpSocket) -> Self {
        Self(Arc::new(std::sync::Mutex::new(Some(socket))))
    }

    /// The socket, once: a data plane started again later binds its address anew.
    fn take(&self) -> Option<std::net::UdpSocket> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
    }
}

impl DataPlaneConfig {
    pub fn new(node_name: impl Into<String>, subnet: Ipv4Net) -> Self {
        Self {
            node_name: node_name.into(),
            subnet,
            service_range: DEFAULT_SERVICE_RANGE.parse().expect("constant parses"),
            listen: SocketAddr::from(([0, 0, 0, 0], DEFAULT_TUNNEL_PORT)),
            underlay_mtu: 1500,
            prefix: DEFAULT_PREFIX.to_string(),
            netns_prefix: format!("{DEFAULT_PREFIX}-"),
            keep_netns: Vec::new(),
            flow_capacity: NonZeroUsize::new(65536).expect("non-zero"),
            flow_timeouts: FlowTimeouts::default(),
            peer_capacity: NonZeroUsize::new(1024).expect("non-zero"),
            peer_idle_timeout: Duration::from_secs(180),
            keepalive_interval: Duration::from_secs(25),
            liveness: liveness::LivenessConfig::default(),
            reply_route_capacity: NonZeroUsize::new(16384).expect("non-zero"),
            notice_queue: 1024,
            cpu_latency_us: None,
            busy_poll: Duration::ZERO,
            reserved_socket: ReservedSocket::default(),
        }
    }

    /// MTU of the TUN and every service interface: room for the tunnel headers on the underlay.
    pub fn mtu(&self) -> u16 {
        self.underlay_mtu - tunnel::OVERHEAD as u16
    }

    /// Largest TCP segment that fits: MTU minus IPv4 and TCP headers.
    pub fn max_mss(&self) -> u16 {
        self.mtu() - 40
    }

    pub fn gateway(&self) -> Ipv4Addr {
        gateway_of(self.subnet)
    }

    fn validate(&self) -> anyhow::Result<()> {
        setup::check_link_name(&format!("{}tun", self.prefix))?;
        if self.prefix.len() > 8 {
            bail!("prefix {:?} is longer than 8 characters", self.prefix);
        }
        if self.notice_queue == 0 {
            bail!("the notice queue needs room for at least one notice");
        }
        check_instance_subnet(self.subnet)?;
        if usize::from(self.underlay_mtu) < 576 + tunnel::OVERHEAD
            || usize::from(self.underlay_mtu) > tunnel::MAX_PACKET
        {
            bail!(
                "underlay MTU {} must be between {} and {}",
                self.underlay_mtu,
                576 + tunnel::OVERHEAD,
                tunnel::MAX_PACKET
            );
        }
        Ok(())
    }

    fn bridge_name(&self) -> String {
        format!("{}br", self.prefix)
    }

    fn tun_name(&self) -> String {
        format!("{}tun", self.prefix)
    }
}

/// How to find the namespace of an instance being attached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachTarget {
    /// Create a fresh named namespace, owned by the process `owner_pid` (`agent run`): detached when it exits.
    Create { owner_pid: u32 },
    /// The namespace of a running process (a container's PID).
    Pid(u32),
    /// An existing named namespace (`/run/netns/NAME`).
    Netns(String),
    /// A namespace an earlier run of this agent created for `owner_pid` (a restart after a crash): used as it is,
    /// and like `Create`, detached and removed when the owner exits.
    Adopt { owner_pid: u32, netns: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachRequest {
    pub service: String,
    pub instance: u32,
    pub target: AttachTarget,
    /// Tree mode: fixed ServiceIPs and an InstanceIP rule for the service's deployment (seed 002 section 3.6.3);
    /// a static route table already fixes every address, so the data plane refuses them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addresses: Option<canopy_overlay::routes::AddressRequest>,
    /// Tree mode: the namespace IP the instance had before the agent restarted, kept when still free, so the
    /// routes other machines hold for it stay right (restores run in parallel: first-free would shuffle them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_ip: Option<Ipv4Addr>,
}

/// An attached instance, as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub service: String,
    pub instance: u32,
    pub namespace_ip: Ipv4Addr,
    pub instance_ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub mtu: u16,
    /// The namespace file to enter (`setns`) to run inside it.
    pub netns_path: PathBuf,
    /// Set when the agent created the namespace (and removes it on detach).
    pub netns_name: Option<String>,
    /// resolv.conf to bind-mount inside, for namespaces the agent created.
    pub resolv_conf: Option<PathBuf>,
    pub host_interface: String,
    pub target: AttachTarget,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DataPlaneStatus {
    pub node: String,
    pub node_id: NodeId,
    pub subnet: Ipv4Net,
    /// Subnets granted after the first filled up.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_subnets: Vec<Ipv4Net>,
    pub gateway: Ipv4Addr,
    pub service_range: Ipv4Net,
    pub listen: SocketAddr,
    pub mtu: u16,
    pub max_mss: u16,
    pub flows: usize,
    pub tunnel_peers: usize,
    /// Client InstanceIPs learned from traffic (see `reply_routes`).
    #[serde(default)]
    pub reply_routes: usize,
    /// Packets waiting for a route table that knows their destination.
    #[serde(default)]
    pub held_packets: usize,
    /// Tunnel peers that stopped answering (their instances get no new connections).
    #[serde(default)]
    pub unreachable_peers: usize,
    pub routes: RouteTable,
    pub attachments: Vec<Attachment>,
    pub counters: CounterSnapshot,
}

/// What `start_engine` hands back: the command channel, the packet-loop thread, the TUN's link index, the
/// counters and the notices' receiving end.
type StartedEngine = (CommandSender, std::thread::JoinHandle<()>, u32, Arc<Counters>, mpsc::Receiver<Notice>);

struct State {
    routes: RouteTable,
    /// Subnets added after the start (`add_subnet`), beside `config.subnet`.
    extra_subnets: Vec<Ipv4Net>,
    attachments: BTreeMap<(String, u32), Attachment>,
    /// Routes we installed into the TUN.
    installed: BTreeSet<Ipv4Net>,
    next_veth: u32,
    old_ip_forward: Option<String>,
    stopped: bool,
}

impl State {
    /// This machine's instance subnets: the one it started with, then those added.
    fn subnets<'a>(&'a self, config: &DataPlaneConfig) -> impl Iterator<Item = Ipv4Net> + 'a {
        std::iter::once(config.subnet).chain(self.extra_subnets.iter().copied())
    }
}

struct Inner {
    config: DataPlaneConfig,
    netlink: rtnetlink::Handle,
    bridge_index: u32,
    tun_index: u32,
    counters: Arc<Counters>,
    commands: CommandSender,
    engine_thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    notices: std::sync::Mutex<Option<mpsc::Receiver<Notice>>>,
    state: Mutex<State>,
    /// The route table in force, for those who derive something from it (the DNS resolver's names).
    routes_watch: watch::Sender<RouteTable>,
    /// Held for the data plane's lifetime when configured.
    _cpu_latency: Option<cpu_latency::CpuLatencyRequest>,
}

/// Handle to a running data plane; cheap to clone.
#[derive(Clone)]
pub struct DataPlane {
    inner: Arc<Inner>,
}

impl DataPlane {
    /// Sets the machine up (bridge, TUN, routes, sysctls) and starts the packet loop. Must run inside a tokio
    /// runtime (the netlink connection lives there); needs root.
    pub async fn start(config: DataPlaneConfig) -> anyhow::Result<Self> {
        config.validate()?;
        let cpu_latency = config.cpu_latency_us.map(cpu_latency::CpuLatencyRequest::hold).transpose()?;
        if let Some(request) = &cpu_latency {
            tracing::info!(microseconds = request.microseconds, "holding the CPU wake-up latency bound");
        }
        let netlink = setup::connect()?;
        Self::remove_leftovers(&netlink, &config.prefix, &config.netns_prefix, &config.keep_netns).await?;
        let mtu = config.mtu();
        let gateway = Ipv4Net::new(config.gateway(), config.subnet.prefix_len()).expect("prefix checked");
        let bridge_index = setup::create_bridge(&netlink, &config.bridge_name(), gateway, u32::from(mtu)).await?;
        let started = Self::start_engine(&config, &netlink).await;
        let (commands, thread, tun_index, counters, notices) = match started {
            Ok(started) => started,
            Err(err) => {
                let _ = setup::delete_link(&netlink, &config.bridge_name()).await;
                return Err(err);
            }
        };
        let dataplane = DataPlane {
            inner: Arc::new(Inner {
                config,
                netlink,
                bridge_index,
                tun_index,
                counters,
                commands,
                engine_thread: std::sync::Mutex::new(Some(thread)),
                notices: std::sync::Mutex::new(Some(notices)),
                state: Mutex::new(State {
                    routes: RouteTable::default(),
                    extra_subnets: Vec::new(),
                    attachments: BTreeMap::new(),
                    installed: BTreeSet::new(),
                    next_veth: 0,
                    old_ip_forward: None,
                    stopped: false,
                }),
                routes_watch: watch::Sender::new(RouteTable::default()),
                _cpu_latency: cpu_latency,
            }),
        };
        if let Err(err) = dataplane.configure_kernel().await {
            let _ = dataplane.shutdown().await;
            return Err(err);
        }
        dataplane.spawn_watcher();
        tracing::info!(
            node = %dataplane.inner.config.node_name, subnet = %dataplane.inner.config.subnet,
            listen = %dataplane.inner.config.listen, mtu, "data plane started"
        );
        Ok(dataplane)
    }

    async fn remove_leftovers(
        netlink: &rtnetlink::Handle,
        prefix: &str,
        netns_prefix: &str,
        keep_netns: &[String],
    ) -> anyhow::Result<()> {
        let removed = setup::remove_links_with_prefix(netlink, prefix).await?;
        if !removed.is_empty() {
            tracing::warn!("removed links left by an earlier run: {}", removed.join(", "));
        }
        for name in netns::list_named(netns_prefix).into_iter().filter(|n| !keep_netns.contains(n)) {
            tracing::warn!("removing network namespace {name} left by an earlier run");
            netns::delete_named(&name).await?;
        }
        Ok(())
    }

    async fn start_engine(config: &DataPlaneConfig, netlink: &rtnetlink::Handle) -> anyhow::Result<StartedEngine> {
        let counters = Arc::new(Counters::default());
        let (poll, commands, receiver) = engine::command_channel().context("creating the packet loop's poll")?;
        let (notices, notices_rx) = mpsc::channel(config.notice_queue);
        let (ready, ready_rx) = oneshot::channel::<anyhow::Result<()>>();
        let proxy_config = ProxyConfig {
            max_mss: config.max_mss(),
            flow_capacity: config.flow_capacity,
            timeouts: config.flow_timeouts,
            service_range: config.service_range,
            reply_route_capacity: config.reply_route_capacity,
            reply_route_idle: config.peer_idle_timeout,
        };
        let proxy = Proxy::new(config.node_name.clone(), proxy_config, Box::new(policy::PolicyChooser::default()));
        let peers = PeerTable::new(config.peer_capacity, config.peer_idle_timeout);
        let (tun_name, mtu, listen) = (config.tun_name(), config.mtu(), config.listen);
        let node_id = NodeId::from_name(&config.node_name);
        let keepalive_interval = config.keepalive_interval;
        let liveness = config.liveness;
        let busy_poll = config.busy_poll;
        let reserved = config.reserved_socket.clone();
        let pending = pending::PendingPackets::new(pending::PendingConfig {
            max_packet: usize::from(mtu),
            ..pending::PendingConfig::default()
        });
        let underlay_mtu = config.underlay_mtu;
        let ciphers = PairCiphers::new(node_id, config.peer_capacity);
        let notice_limiter = NoticeLimiter::new(config.peer_capacity);
        let engine_counters = counters.clone();
        let thread = std::thread::Builder::new()
            .name("dataplane".into())
            .spawn(move || {
                let opened = || {
                    let tun = device::create(&tun_name, mtu)?;
                    let socket = match reserved.take() {
                        Some(socket) => socket,
                        None => std::net::UdpSocket::bind(listen)
                            .with_context(|| format!("binding the tunnel socket {listen}"))?,
                    };
                    socket.set_nonblocking(true)?;
                    enlarge_socket_buffers(&socket);
                    let udp = quinn_udp::UdpSocketState::new((&socket).into())
                        .context("preparing the tunnel socket for batched I/O")?;
                    anyhow::Ok((tun, socket, udp))
                };
                let (tun, socket, udp) = match opened() {
                    Ok(opened) => opened,
                    Err(err) => {
                        let _ = ready.send(Err(err));
                        return;
                    }
                };
                let _ = ready.send(Ok(()));
                let engine = Engine {
                    proxy,
                    peers,
                    counters: engine_counters,
                    tun,
                    socket,
                    udp,
                    node_id,
                    keepalive_interval,
                    max_datagram: usize::from(underlay_mtu) - 28,
                    ciphers,
                    send_counter: engine::initial_send_counter(),
                    notices,
                    notice_limiter,
                    pending,
                    liveness,
                    busy_poll,
                };
                engine.run(poll, receiver);
            })
            .context("spawning the data-plane thread")?;
        ready_rx.await.map_err(|_| anyhow!("the data-plane thread died while starting"))??;
        let tun_index = setup::link_index(netlink, &config.tun_name())
            .await?
            .ok_or_else(|| anyhow!("TUN device {} not found after creation", config.tun_name()))?;
        Ok((commands, thread, tun_index, counters, notices_rx))
    }

    async fn configure_kernel(&self) -> anyhow::Result<()> {
        let config = &self.inner.config;
        let old = setup::write_sysctl("net.ipv4.ip_forward", "1")?;
        self.inner.state.lock().await.old_ip_forward = Some(old);
        // Translated packets leave the TUN with overlay sources; replies come back through the bridge.
        for interface in [config.tun_name(), config.bridge_name()] {
            setup::write_sysctl(&format!("net.ipv4.conf.{interface}.rp_filter"), "0")?;
        }
        setup::add_route(&self.inner.netlink, config.service_range, self.inner.tun_index).await?;
        self.inner.state.lock().await.installed.insert(config.service_range);
        Ok(())
    }

    /// Notices for the agent (table queries, unreachable instances, services in use). The first call gets the
    /// receiver; later calls get `None`. Unread notices are dropped once the queue is full (and counted).
    pub fn take_notices(&self) -> Option<mpsc::Receiver<Notice>> {
        self.inner.notices.lock().expect("not poisoned").take()
    }

    pub fn counters(&self) -> CounterSnapshot {
        self.inner.counters.snapshot()
    }

    fn send(&self, command: Command) -> anyhow::Result<()> {
        self.inner.commands.send(command).map_err(|_| anyhow!("the data plane has stopped"))
    }

    /// Replaces the route table and the kernel routes into the TUN (ServiceIP range and other machines' subnets).
    pub async fn set_routes(&self, table: RouteTable) -> anyhow::Result<()> {
        RouteIndex::build(&table)?;
        let (reply, answer) = oneshot::channel();
        self.send(Command::SetRoutes(table.clone(), reply))?;
        answer.await.map_err(|_| anyhow!("the data plane has stopped"))??;
        let config = &self.inner.config;
        let mut wanted: BTreeSet<Ipv4Net> =
            table.nodes.iter().filter(|n| n.name != config.node_name).flat_map(|n| n.subnets()).collect();
        wanted.insert(config.service_range);
        let mut state = self.inner.state.lock().await;
        let own: Vec<Ipv4Net> = state.subnets(config).collect();
        let stale: Vec<Ipv4Net> = state.installed.difference(&wanted).copied().collect();
        for net in stale {
            setup::delete_route(&self.inner.netlink, net, self.inner.tun_index).await?;
            state.installed.remove(&net);
        }
        let missing: Vec<Ipv4Net> = wanted.difference(&state.installed).copied().collect();
        for net in missing {
            if let Some(mine) = own.iter().find(|o| o.contains(&net.network()) || net.contains(&o.network())) {
                bail!("node list gives another machine {net}, which overlaps this machine's subnet {mine}");
            }
            setup::add_route(&self.inner.netlink, net, self.inner.tun_index).await?;
            state.installed.insert(net);
        }
        state.routes = table.clone();
        self.inner.routes_watch.send_replace(table);
        Ok(())
    }

    /// The route table in force now and whenever it is replaced.
    pub fn watch_routes(&self) -> watch::Receiver<RouteTable> {
        self.inner.routes_watch.subscribe()
    }

    /// Adds another instance subnet (the tree granted it when the first ones filled up): the bridge takes its `.1`,
    /// the instances' gateway there.
    pub async fn add_subnet(&self, subnet: Ipv4Net) -> anyhow::Result<()> {
        check_instance_subnet(subnet)?;
        let config = &self.inner.config;
        let mut state = self.inner.state.lock().await;
        if state.stopped {
            bail!("the data plane has stopped");
        }
        if let Some(mine) =
            state.subnets(config).find(|o| o.contains(&subnet.network()) || subnet.contains(&o.network()))
        {
            bail!("subnet {subnet} overlaps this machine's subnet {mine}");
        }
        let gateway = Ipv4Net::new(gateway_of(subnet), subnet.prefix_len()).expect("prefix checked");
        setup::add_address(&self.inner.netlink, self.inner.bridge_index, gateway).await?;
        state.extra_subnets.push(subnet);
        tracing::info!(%subnet, "instance subnet added");
        Ok(())
    }

    /// Attaches an instance's namespace: a veth on the bridge, its namespace IP, routes, and (for namespaces the
    /// agent creates) a resolv.conf. Addresses come from the route table entry of this instance on this machine.
    pub async fn attach(&self, request: AttachRequest) -> anyhow::Result<Attachment> {
        let config = &self.inner.config;
        let mut state = self.inner.state.lock().await;
        if state.stopped {
            bail!("the data plane has stopped");
        }
        if request.addresses.is_some() {
            bail!(
                "fixed addresses need routes from the tree: with a static route table, the table gives the addresses"
            );
        }
        let key = (request.service.clone(), request.instance);
        if state.attachments.contains_key(&key) {
            bail!("instance {} of {} is already attached", request.instance, request.service);
        }
        let index = RouteIndex::build(&state.routes)?;
        let position = index.find_instance(&request.service, request.instance).ok_or_else(|| {
            anyhow!("the route table has no instance {} of service {}", request.instance, request.service)
        })?;
        let instance = &index.instances[position];
        let host = &index.nodes[instance.node].name;
        if *host != config.node_name {
            bail!(
                "instance {} of {} belongs to machine {host}, not {}",
                request.instance,
                request.service,
                config.node_name
            );
        }
        let (namespace_ip, instance_ip) = (instance.namespace_ip, instance.instance_ip);
        let subnet = state
            .subnets(config)
            .find(|s| s.contains(&namespace_ip))
            .ok_or_else(|| anyhow!("namespace IP {namespace_ip} lies in none of this machine's subnets"))?;
        let gateway = gateway_of(subnet);
        if namespace_ip == gateway || namespace_ip == subnet.network() || namespace_ip == subnet.broadcast() {
            bail!("namespace IP {namespace_ip} is not usable in this machine's subnet {subnet}");
        }
        let (netns_ref, netns_name) = match &request.target {
            AttachTarget::Create { owner_pid } => {
                if !netns::process_alive(*owner_pid) {
                    bail!("owner process {owner_pid} is not running");
                }
                let name = format!("{}{}-{}", config.netns_prefix, sanitize(&request.service), request.instance);
                netns::create_named(&name).await?;
                (NamespaceRef::Named(name.clone()), Some(name))
            }
            AttachTarget::Adopt { owner_pid, netns } => {
                if !netns::process_alive(*owner_pid) {
                    bail!("owner process {owner_pid} is not running");
                }
                (NamespaceRef::Named(netns.clone()), Some(netns.clone()))
            }
            AttachTarget::Pid(pid) => (NamespaceRef::Pid(*pid), None),
            AttachTarget::Netns(name) => (NamespaceRef::Named(name.clone()), None),
        };
        let netns_path = netns_ref.path();
        let veth = state.next_veth;
        state.next_veth += 1;
        let host_interface = format!("{}h{veth}", config.prefix);
        let peer_interface = format!("{}p{veth}", config.prefix);
        let attached = async {
            if !netns_path.exists() {
                bail!("network namespace {} does not exist", netns_path.display());
            }
            let mtu = u32::from(config.mtu());
            setup::create_veth(
                &self.inner.netlink,
                &host_interface,
                &peer_interface,
                mtu,
                self.inner.bridge_index,
                &netns_path,
            )
            .await?;
            let address = Ipv4Net::new(namespace_ip, subnet.prefix_len()).expect("prefix checked");
            netns::configure_inside(&netns_path, &peer_interface, address, gateway).await?;
            let resolv_conf = match &netns_name {
                Some(name) => {
                    netns::write_resolv_conf(name, config.gateway())?;
                    Some(PathBuf::from(netns::NETNS_ETC_DIR).join(name).join("resolv.conf"))
                }
                None => None,
            };
            anyhow::Ok(resolv_conf)
        }
        .await;
        let resolv_conf = match attached {
            Ok(resolv_conf) => resolv_conf,
            Err(err) => {
                let _ = setup::delete_link(&self.inner.netlink, &host_interface).await;
                if let Some(name) = &netns_name {
                    let _ = netns::delete_named(name).await;
                }
                return Err(err);
            }
        };
        self.send(Command::Attach { namespace_ip, instance_ip })?;
        let attachment = Attachment {
            service: request.service,
            instance: request.instance,
            namespace_ip,
            instance_ip,
            gateway,
            mtu: config.mtu(),
            netns_path,
            netns_name,
            resolv_conf,
            host_interface,
            target: request.target,
        };
        tracing::info!(
            service = %attachment.service, instance = attachment.instance, namespace_ip = %namespace_ip,
            instance_ip = %instance_ip, "instance attached"
        );
        state.attachments.insert(key, attachment.clone());
        Ok(attachment)
    }

    pub async fn detach(&self, service: &str, instance: u32) -> anyhow::Result<Attachment> {
        let mut state = self.inner.state.lock().await;
        let attachment = state
            .attachments
            .remove(&(service.to_string(), instance))
            .ok_or_else(|| anyhow!("instance {instance} of {service} is not attached"))?;
        self.release(&attachment, false).await?;
        Ok(attachment)
    }

    /// Removes the instance's link; its named namespace too unless `keep_namespace` (a data plane restarting on
    /// a new subnet adopts it again, with the instance's process still inside).
    async fn release(&self, attachment: &Attachment, keep_namespace: bool) -> anyhow::Result<()> {
        let _ = self.send(Command::Detach { namespace_ip: attachment.namespace_ip });
        setup::delete_link(&self.inner.netlink, &attachment.host_interface).await?;
        if let Some(name) = &attachment.netns_name
            && !keep_namespace
        {
            netns::delete_named(name).await?;
        }
        tracing::info!(service = %attachment.service, instance = attachment.instance, "instance detached");
        Ok(())
    }

    pub async fn attachments(&self) -> Vec<Attachment> {
        self.inner.state.lock().await.attachments.values().cloned().collect()
    }

    pub async fn status(&self) -> anyhow::Result<DataPlaneStatus> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Status(reply))?;
        let loop_status: LoopStatus = answer.await.map_err(|_| anyhow!("the data plane has stopped"))?;
        let config = &self.inner.config;
        let state = self.inner.state.lock().await;
        Ok(DataPlaneStatus {
            node: config.node_name.clone(),
            node_id: NodeId::from_name(&config.node_name),
            subnet: config.subnet,
            extra_subnets: state.extra_subnets.clone(),
            gateway: config.gateway(),
            service_range: config.service_range,
            listen: config.listen,
            mtu: config.mtu(),
            max_mss: config.max_mss(),
            flows: loop_status.flows,
            tunnel_peers: loop_status.tunnel_peers,
            reply_routes: loop_status.reply_routes,
            held_packets: loop_status.held_packets,
            unreachable_peers: loop_status.unreachable_peers,
            routes: state.routes.clone(),
            attachments: state.attachments.values().cloned().collect(),
            counters: self.counters(),
        })
    }

    /// Detaches instances whose process or namespace is gone, every second, until shutdown.
    fn spawn_watcher(&self) {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let dataplane = DataPlane { inner };
                let gone: Vec<(String, u32)> = {
                    let state = dataplane.inner.state.lock().await;
                    if state.stopped {
                        return;
                    }
                    state.attachments.iter().filter(|(_, a)| !attachment_alive(a)).map(|(key, _)| key.clone()).collect()
                };
                for (service, instance) in gone {
                    tracing::info!(%service, instance, "instance's process or namespace is gone");
                    if let Err(err) = dataplane.detach(&service, instance).await {
                        tracing::warn!("detaching {service} instance {instance}: {err:#}");
                    }
                }
            }
        });
    }

    /// Stops the packet loop and removes everything the data plane installed.
    pub async fn shutdown(&self) -> anyhow::Result<()> {
        self.stop(false).await
    }

    /// Like `shutdown`, but the named namespaces of attached instances stay (with their processes), for a data
    /// plane started next with them in `keep_netns` to adopt (`AttachTarget::Adopt`), e.g. after a renumbering.
    pub async fn shutdown_keeping_namespaces(&self) -> anyhow::Result<()> {
        self.stop(true).await
    }

    async fn stop(&self, keep_namespaces: bool) -> anyhow::Result<()> {
        let mut state = self.inner.state.lock().await;
        if state.stopped {
            return Ok(());
        }
        state.stopped = true;
        let _ = self.inner.commands.send(Command::Shutdown);
        let thread = self.inner.engine_thread.lock().expect("not poisoned").take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        let mut first_error = None;
        let attachments: Vec<Attachment> = std::mem::take(&mut state.attachments).into_values().collect();
        for attachment in &attachments {
            if let Err(err) = self.release(attachment, keep_namespaces).await {
                first_error.get_or_insert(err);
            }
        }
        // The TUN disappears with the thread's file descriptor, and its routes with it.
        if let Err(err) = setup::remove_links_with_prefix(&self.inner.netlink, &self.inner.config.prefix).await {
            first_error.get_or_insert(err);
        }
        if let Some(old) = state.old_ip_forward.take()
            && let Err(err) = setup::write_sysctl("net.ipv4.ip_forward", &old)
        {
            first_error.get_or_insert(err);
        }
        tracing::info!("data plane stopped and cleaned up");
        first_error.map_or(Ok(()), Err)
    }
}

/// The bridge's address in an instance subnet (`.1`): the instances' gateway.
pub fn gateway_of(subnet: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()) + 1)
}

fn check_instance_subnet(subnet: Ipv4Net) -> anyhow::Result<()> {
    if subnet.prefix_len() > 29 {
        bail!("subnet {subnet} is too small for a gateway and instances");
    }
    if subnet.trunc() != subnet {
        bail!("subnet {subnet} has host bits set (did you mean {}?)", subnet.trunc());
    }
    Ok(())
}

/// Socket buffer size for the tunnel: room for bursts while the packet loop is busy (the kernel default of about
/// 200 KB drops packets at multi-gigabit rates).
const TUNNEL_SOCKET_BUFFER: usize = 8 << 20;

/// Raises the tunnel socket's buffers, beyond the sysctl limits when allowed (root), else up to them.
fn enlarge_socket_buffers(socket: &std::net::UdpSocket) {
    use nix::sys::socket::{setsockopt, sockopt};
    if setsockopt(socket, sockopt::RcvBufForce, &TUNNEL_SOCKET_BUFFER).is_err() {
        let _ = setsockopt(socket, sockopt::RcvBuf, &TUNNEL_SOCKET_BUFFER);
    }
    if setsockopt(socket, sockopt::SndBufForce, &TUNNEL_SOCKET_BUFFER).is_err() {
        let _ = setsockopt(socket, sockopt::SndBuf, &TUNNEL_SOCKET_BUFFER);
    }
}

fn attachment_alive(attachment: &Attachment) -> bool {
    match &attachment.target {
        AttachTarget::Create { owner_pid } | AttachTarget::Adopt { owner_pid, .. } => {
            netns::process_alive(*owner_pid) && attachment.netns_path.exists()
        }
        AttachTarget::Pid(pid) => NamespaceRef::Pid(*pid).alive(),
        AttachTarget::Netns(name) => NamespaceRef::Named(name.clone()).alive(),
    }
}

/// Keeps a service name usable inside a namespace name.
fn sanitize(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RouteTable {
        serde_json::from_value(serde_json::json!({
            "tunnel_key": "5a".repeat(32),
            "nodes": [
                {"name": "a", "subnet": "10.16.0.0/26", "endpoint": "192.0.2.1:50103"},
                {"name": "b", "subnet": "10.16.0.64/26", "endpoint": "192.0.2.2:50103"},
            ],
            "services": [{"name": "t.default.web.default", "service_ip": "10.30.0.2", "instances": [
                {"number": 0, "instance_ip": "10.30.2.1", "namespace_ip": "10.16.0.66", "node": "b"}]}],
        }))
        .expect("test table")
    }

    /// The agent starts the data plane when the tree grants its subnet (after running a while), and restarts it
    /// on the same prefix when the subnet is renumbered. Runs in a private network namespace (root only).
    #[test]
    fn starts_late_and_restarts_on_the_same_prefix() {
        if !nix::unistd::geteuid().is_root() || !std::path::Path::new("/dev/net/tun").exists() {
            eprintln!("skipping starts_late_and_restarts_on_the_same_prefix: needs root and /dev/net/tun");
            return;
        }
        // Threads inherit the namespace of the thread that creates them: the engine thread lands in ours too.
        let outcome = std::thread::spawn(|| -> anyhow::Result<()> {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).context("unshare(CLONE_NEWNET)")?;
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async {
                let netlink = setup::connect()?;
                tokio::time::sleep(Duration::from_millis(300)).await;
                let subnets = ["10.16.0.0/26", "10.16.0.128/26", "10.16.0.0/26"];
                for (round, subnet) in subnets.into_iter().enumerate() {
                    let mut config = DataPlaneConfig::new("a", subnet.parse()?);
                    config.prefix = "trs".into();
                    config.netns_prefix = "trs-".into();
                    let dataplane = DataPlane::start(config).await.with_context(|| format!("start {round}"))?;
                    let mut table = table();
                    table.nodes[0].subnet = subnet.parse()?;
                    dataplane.set_routes(table).await.with_context(|| format!("routes {round}"))?;
                    assert!(dataplane.take_notices().is_some(), "the first call gets the notices");
                    assert!(dataplane.take_notices().is_none());
                    assert!(setup::link_index(&netlink, "trsbr").await?.is_some(), "bridge in round {round}");
                    assert!(setup::link_index(&netlink, "trstun").await?.is_some(), "TUN in round {round}");
                    let status = dataplane.status().await?;
                    assert_eq!(status.subnet.to_string(), subnet);
                    dataplane.shutdown().await.with_context(|| format!("shutdown {round}"))?;
                    assert!(dataplane.status().await.is_err(), "stopped");
                    assert!(setup::link_index(&netlink, "trsbr").await?.is_none(), "bridge removed in round {round}");
                    assert!(setup::link_index(&netlink, "trstun").await?.is_none(), "TUN removed in round {round}");
                }
                Ok(())
            })
        })
        .join()
        .expect("the test thread does not panic");
        outcome.unwrap();
    }
}
