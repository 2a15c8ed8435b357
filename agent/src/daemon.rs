//! `agent start` and `agent join`: the daemon. Runs in the foreground (systemd-friendly, see
//! `agent/canopy-agent.service`), owns the data dir (refusing a second agent on it), serves the local API and
//! metrics, and drives the overlay over libp2p until SIGTERM / Ctrl-C or `agent leave`.
//!
//! Settings come from flags, then `CANOPY_*` environment variables, then the `--config` TOML file, then defaults.

use crate::api;
use crate::cli::GlobalArgs;
use crate::dataplane::routes::RouteTable;
use crate::dataplane::{AttachRequest, AttachTarget, Attachment, DataPlane, DataPlaneConfig, ReservedSocket};
use crate::persist::{self, KeySource, StateStore};
use crate::runtime::behaviour::{SwarmOptions, build_swarm};
use crate::runtime::driver::{Driver, DriverConfig, Mode};
use crate::runtime::metrics::{self, Metrics};
use crate::runtime::{self, Handle};
use crate::tree_routes::TreeRoutesConfig;
use anyhow::{Context, anyhow, bail};
use canopy_overlay::Position;
use canopy_overlay::routes::ServiceDomain;
use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Default libp2p port (QUIC on UDP and TCP).
pub const DEFAULT_P2P_PORT: u16 = 4001;
pub use crate::dataplane::DEFAULT_TUNNEL_PORT;
const DEFAULT_BOOTSTRAP_ATTEMPTS: u32 = 5;

/// Flags shared by `start` and `join`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DaemonArgs {
    /// TOML file with any of: position, listen, tunnel_port, tunnel_endpoints, network_key_file, mdns, metrics,
    /// bootstrap_attempts, subnet, routes, dataplane, capacity_file, max_children, machine_prefix, cpu_latency_us,
    /// busy_poll_us.
    /// Flags and CANOPY_* variables override it.
    #[arg(long, env = "CANOPY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// This machine's position, latitude,longitude in degrees (e.g. 48.14,11.58).
    #[arg(long, env = "CANOPY_POSITION", value_name = "LAT,LON", value_parser = parse_position)]
    pub position: Option<Position>,
    /// libp2p listen address (repeatable). Default: QUIC and TCP on port 4001 on all interfaces.
    #[arg(long = "listen", env = "CANOPY_LISTEN", value_name = "MULTIADDR", value_delimiter = ',')]
    pub listen: Vec<Multiaddr>,
    /// UDP port of the data-plane tunnel.
    #[arg(long, env = "CANOPY_TUNNEL_PORT", value_name = "PORT")]
    pub tunnel_port: Option<u16>,
    /// Where other machines reach this machine's tunnel, when that is not a listen address: behind a NAT, the
    /// router's public address and the UDP port it forwards to --tunnel-port (repeatable; listed first).
    #[arg(long = "tunnel-endpoint", env = "CANOPY_TUNNEL_ENDPOINT", value_name = "IP:PORT", value_delimiter = ',')]
    pub tunnel_endpoints: Vec<SocketAddr>,
    /// File holding the overlay's network key (64 hex characters). `agent start` creates one when none is given.
    #[arg(long, env = "CANOPY_NETWORK_KEY_FILE", value_name = "FILE")]
    pub network_key_file: Option<PathBuf>,
    /// Do not discover peers on the LAN with mDNS.
    #[arg(long, env = "CANOPY_NO_MDNS")]
    pub no_mdns: bool,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9464).
    #[arg(long, env = "CANOPY_METRICS", value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    /// How many times to try reaching the bootstrap peer (with exponential backoff) before giving up.
    #[arg(long, env = "CANOPY_BOOTSTRAP_ATTEMPTS", value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100))]
    pub bootstrap_attempts: Option<u32>,
    /// This machine's subnet for the data plane (until the tree grants subnets).
    #[arg(long, env = "CANOPY_SUBNET", value_name = "CIDR")]
    pub subnet: Option<ipnet::Ipv4Net>,
    /// Static route table for the data plane (with --subnet).
    #[arg(long, env = "CANOPY_ROUTES", value_name = "FILE")]
    pub routes: Option<PathBuf>,
    /// Run the control plane only, even with --subnet.
    #[arg(long, env = "CANOPY_NO_DATAPLANE")]
    pub no_dataplane: bool,
    /// Most children a node accepts before its group splits (the tree's fan-out; every agent should use the same).
    #[arg(long, env = "CANOPY_MAX_CHILDREN", value_name = "N", value_parser = clap::value_parser!(u16).range(2..=256))]
    pub max_children: Option<u16>,
    /// Prefix length of the machine subnets the tree grants (default 26: 61 instances each; a machine that fills
    /// one gets another). Every agent of an overlay must use the same.
    #[arg(long, env = "CANOPY_MACHINE_PREFIX", value_name = "BITS", value_parser = clap::value_parser!(u8).range(25..=29))]
    pub machine_prefix: Option<u8>,
    /// TOML file overriding the measured free capacity (`cpu = .., mem_mb = .., bandwidth_mbps = ..`, any subset);
    /// re-read when it changes, so experiments can change it live.
    #[arg(long, env = "CANOPY_CAPACITY_FILE", value_name = "FILE")]
    pub capacity_file: Option<PathBuf>,
    /// Bound CPU wake-up latency while the data plane runs (0 = idle CPUs poll): lower tunnel latency on idle
    /// machines for more idle power. Needs /dev/cpu_dma_latency (root). Off by default.
    #[arg(long, env = "CANOPY_CPU_LATENCY_US", value_name = "MICROSECONDS")]
    pub cpu_latency_us: Option<u32>,
    /// After packet work, keep the data-plane thread reading for this long before it sleeps, so a quick answer
    /// finds it awake (saves a wake-up per round trip; costs CPU while it waits). 0 (default) sleeps at once.
    #[arg(long, env = "CANOPY_BUSY_POLL_US", value_name = "MICROSECONDS")]
    pub busy_poll_us: Option<u32>,
}

#[derive(Debug, clap::Args)]
pub struct JoinArgs {
    /// Any member of the overlay: a multiaddr (/ip4/10.0.0.1/udp/4001/quic-v1) or host:port.
    #[arg(value_name = "BOOTSTRAP")]
    pub bootstrap: String,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

/// The config file. Unknown keys are an error, so a typo does not go unnoticed.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    position: Option<String>,
    listen: Option<Vec<String>>,
    tunnel_port: Option<u16>,
    tunnel_endpoints: Option<Vec<SocketAddr>>,
    network_key_file: Option<PathBuf>,
    mdns: Option<bool>,
    metrics: Option<SocketAddr>,
    bootstrap_attempts: Option<u32>,
    subnet: Option<ipnet::Ipv4Net>,
    routes: Option<PathBuf>,
    dataplane: Option<bool>,
    capacity_file: Option<PathBuf>,
    max_children: Option<u16>,
    machine_prefix: Option<u8>,
    cpu_latency_us: Option<u32>,
    busy_poll_us: Option<u32>,
}

/// Effective settings after merging flags, environment and config file.
#[derive(Debug, Clone)]
pub struct Settings {
    pub position: Position,
    pub listen: Vec<Multiaddr>,
    pub tunnel_port: u16,
    pub tunnel_endpoints: Vec<SocketAddr>,
    pub network_key_file: Option<PathBuf>,
    pub mdns: bool,
    pub metrics: Option<SocketAddr>,
    pub bootstrap_attempts: u32,
    pub subnet: Option<ipnet::Ipv4Net>,
    pub routes: Option<PathBuf>,
    pub dataplane: bool,
    pub capacity_file: Option<PathBuf>,
    pub max_children: Option<u16>,
    pub machine_prefix: u8,
    pub cpu_latency_us: Option<u32>,
    pub busy_poll_us: u32,
}

impl DaemonArgs {
    pub fn settings(&self) -> anyhow::Result<Settings> {
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config file {}", path.display()))?;
                toml::from_str::<FileConfig>(&text)
                    .with_context(|| format!("invalid config file {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let position = match (self.position, &file.position) {
            (Some(p), _) => p,
            (None, Some(text)) => parse_position(text).map_err(|e| anyhow!("config file: position: {e}"))?,
            (None, None) => Position::default(),
        };
        let listen = if !self.listen.is_empty() {
            self.listen.clone()
        } else if let Some(list) = &file.listen {
            list.iter()
                .map(|a| {
                    a.parse::<Multiaddr>().map_err(|e| anyhow!("config file: listen: malformed multiaddr {a:?}: {e}"))
                })
                .collect::<anyhow::Result<_>>()?
        } else {
            default_listen()
        };
        let bootstrap_attempts =
            self.bootstrap_attempts.or(file.bootstrap_attempts).unwrap_or(DEFAULT_BOOTSTRAP_ATTEMPTS);
        if bootstrap_attempts == 0 {
            bail!("config file: bootstrap_attempts must be at least 1");
        }
        Ok(Settings {
            position,
            listen,
            tunnel_port: self.tunnel_port.or(file.tunnel_port).unwrap_or(DEFAULT_TUNNEL_PORT),
            tunnel_endpoints: match self.tunnel_endpoints.is_empty() {
                false => self.tunnel_endpoints.clone(),
                true => file.tunnel_endpoints.unwrap_or_default(),
            },
            network_key_file: self.network_key_file.clone().or(file.network_key_file),
            mdns: !self.no_mdns && file.mdns.unwrap_or(true),
            metrics: self.metrics.or(file.metrics),
            bootstrap_attempts,
            subnet: self.subnet.or(file.subnet),
            routes: self.routes.clone().or(file.routes),
            dataplane: !self.no_dataplane && file.dataplane.unwrap_or(true),
            capacity_file: self.capacity_file.clone().or(file.capacity_file),
            max_children: match self.max_children.or(file.max_children) {
                Some(n) if n < 2 => bail!("config file: max_children must be at least 2"),
                n => n,
            },
            machine_prefix: match self.machine_prefix.or(file.machine_prefix) {
                Some(bits) if !(25..=29).contains(&bits) => {
                    bail!("config file: machine_prefix must be between 25 and 29 (a /24 block holds the subnets)")
                }
                bits => bits.unwrap_or(canopy_overlay::routing::RoutingConfig::default().machine_prefix),
            },
            cpu_latency_us: self.cpu_latency_us.or(file.cpu_latency_us),
            busy_poll_us: self.busy_poll_us.or(file.busy_poll_us).unwrap_or(0),
        })
    }
}

fn default_listen() -> Vec<Multiaddr> {
    vec![
        Multiaddr::empty()
            .with(Protocol::Ip4([0, 0, 0, 0].into()))
            .with(Protocol::Udp(DEFAULT_P2P_PORT))
            .with(Protocol::QuicV1),
        Multiaddr::empty().with(Protocol::Ip4([0, 0, 0, 0].into())).with(Protocol::Tcp(DEFAULT_P2P_PORT)),
    ]
}

pub fn parse_position(text: &str) -> Result<Position, String> {
    let (lat, lon) = text.split_once(',').ok_or_else(|| format!("expected LAT,LON, got {text:?}"))?;
    let lat: f64 = lat.trim().parse().map_err(|_| format!("latitude {lat:?} is not a number"))?;
    let lon: f64 = lon.trim().parse().map_err(|_| format!("longitude {lon:?} is not a number"))?;
    if !(-90.0..=90.0).contains(&lat) || !(-180.0..=180.0).contains(&lon) {
        return Err(format!("position {lat},{lon} is out of range (latitude -90..90, longitude -180..180)"));
    }
    Ok(Position::new(lat, lon))
}

/// `BOOTSTRAP` as dialable addresses: a multiaddr as given, or `host:port` resolved to QUIC and TCP addresses.
pub async fn resolve_bootstrap(text: &str) -> anyhow::Result<Vec<Multiaddr>> {
    let text = text.trim();
    if text.starts_with('/') {
        let addr: Multiaddr = text.parse().map_err(|e| anyhow!("malformed bootstrap multiaddr {text:?}: {e}"))?;
        return Ok(vec![addr]);
    }
    let (host, port) = text
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("bootstrap {text:?} is neither a multiaddr (/ip4/...) nor host:port"))?;
    let port: u16 = port.parse().map_err(|_| anyhow!("bootstrap {text:?}: port {port:?} is not a number"))?;
    let resolved =
        tokio::time::timeout(Duration::from_secs(10), tokio::net::lookup_host((host.trim_matches(['[', ']']), port)))
            .await
            .map_err(|_| anyhow!("resolving bootstrap host {host:?} timed out"))?
            .with_context(|| format!("cannot resolve bootstrap host {host:?}"))?;
    let mut addrs = Vec::new();
    for socket in resolved {
        let ip = Multiaddr::from(socket.ip());
        addrs.push(ip.clone().with(Protocol::Udp(socket.port())).with(Protocol::QuicV1));
        addrs.push(ip.with(Protocol::Tcp(socket.port())));
    }
    if addrs.is_empty() {
        bail!("bootstrap host {host:?} has no addresses");
    }
    Ok(addrs)
}

pub fn start(global: &GlobalArgs, args: &DaemonArgs) -> anyhow::Result<()> {
    let settings = args.settings()?;
    run_daemon(global, settings, None)
}

pub fn join(global: &GlobalArgs, args: &JoinArgs) -> anyhow::Result<()> {
    let settings = args.daemon.settings()?;
    // Reject a malformed multiaddr before touching the data dir.
    if args.bootstrap.trim().starts_with('/') {
        args.bootstrap
            .trim()
            .parse::<Multiaddr>()
            .map_err(|e| anyhow!("malformed bootstrap multiaddr {:?}: {e}", args.bootstrap))?;
    }
    run_daemon(global, settings, Some(args.bootstrap.clone()))
}

/// A small runtime: one thread is plenty for the control plane and keeps the idle footprint low.
fn tokio_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the tokio runtime")
}

fn run_daemon(global: &GlobalArgs, settings: Settings, bootstrap: Option<String>) -> anyhow::Result<()> {
    tokio_runtime()?.block_on(daemon_main(&global.data_dir, settings, bootstrap))
}

async fn daemon_main(data_dir: &Path, settings: Settings, bootstrap: Option<String>) -> anyhow::Result<()> {
    persist::prepare_data_dir(data_dir)?;
    // Binding the API socket first is also the lock against a second agent on this data dir.
    let api_listener = api::server::bind(&api::socket_path(data_dir)).await?;
    let keypair = persist::load_or_create_identity(data_dir)?;
    let local = keypair.public().to_peer_id();
    let (network_key, key_source) =
        persist::load_network_key(data_dir, settings.network_key_file.as_deref(), bootstrap.is_none())?;
    let mode = match &bootstrap {
        Some(text) => Mode::Join { bootstrap: resolve_bootstrap(text).await?, label: text.clone() },
        None => Mode::Start,
    };
    tracing::info!(peer_id = %local, data_dir = %data_dir.display(), "canopy agent starting");
    // Routes come from the tree unless a static table was given (`--subnet`) or the data plane is off.
    let tree_mode = settings.dataplane && settings.subnet.is_none();
    // Bound before anything else opens sockets, for the data plane to take once the tree grants a subnet.
    let tunnel_socket = match tree_mode {
        true => ReservedSocket::new(bind_tunnel_port(settings.tunnel_port)?),
        false => ReservedSocket::default(),
    };

    let swarm = build_swarm(keypair, SwarmOptions { mdns: settings.mdns, request_timeout: Duration::from_secs(10) })?;
    let metrics = Arc::new(Metrics::default());
    let (requests_tx, requests_rx) = tokio::sync::mpsc::channel(64);
    let (route_events, tree_inbox) = match tree_mode {
        true => {
            let (sink, pending) = crate::tree_routes::channel();
            (Some(sink), Some(pending))
        }
        false => (None, None),
    };
    let capacity_source = crate::capacity::CapacitySource::new(settings.capacity_file.clone())?;
    let capacity = capacity_source.current();
    let driver = Driver::new(
        swarm,
        DriverConfig {
            network_key: network_key.clone(),
            listen: settings.listen.clone(),
            mode: mode.clone(),
            position: settings.position,
            capacity,
            overlay: overlay_config(&settings),
            bootstrap_attempts: settings.bootstrap_attempts,
            state: StateStore::new(data_dir),
            metrics: metrics.clone(),
            route_events,
            // A restarted machine asks for the subnets it had, so its instances keep their namespace IPs.
            restore_subnets: match tree_mode {
                true => crate::tree_routes::saved_subnets(&StateStore::new(data_dir).load()?),
                false => Vec::new(),
            },
        },
        requests_rx,
    )
    .await?;
    for addr in driver.listen_addrs() {
        tracing::info!(%addr, "listening");
    }
    if matches!(mode, Mode::Start) {
        print_join_hint(&driver, data_dir, &network_key, &key_source);
    }

    if let Some(addr) = settings.metrics {
        metrics::serve(addr, metrics.clone()).await?;
        tracing::info!(%addr, "serving metrics at /metrics");
    }
    let dataplane = start_dataplane(&settings, &local.to_string(), data_dir).await?;

    let handle = Handle::new(requests_tx);
    let (capacity_changes, capacity_watch) = tokio::sync::watch::channel(capacity);
    let capacity_task =
        tokio::spawn(crate::capacity::monitor(capacity_source, handle.clone(), capacity, capacity_changes));
    let mut router = runtime::api::router(handle.clone());
    let mut services_task = None;
    let mut resolver = None;
    let mut tree_routes = None;
    if let Some(pending) = tree_inbox {
        let domain: ServiceDomain = crate::dns::DEFAULT_DOMAIN.parse().context("the default DNS domain")?;
        let config = TreeRoutesConfig {
            me: runtime::node_id(&local),
            tunnel_endpoints: settings
                .tunnel_endpoints
                .iter()
                .copied()
                .chain(crate::tree_routes::tunnel_endpoints(driver.listen_addrs(), settings.tunnel_port))
                .collect(),
            tunnel_port: settings.tunnel_port,
            tunnel_socket,
            position: settings.position,
            capacity: capacity_watch,
            tunnel_key: Some(crate::tree_routes::tunnel_key(&network_key.to_hex())),
            machine_prefix: settings.machine_prefix,
            cpu_latency_us: settings.cpu_latency_us,
            busy_poll: Duration::from_micros(settings.busy_poll_us.into()),
            domain: domain.clone(),
            state: StateStore::new(data_dir),
        };
        tracing::info!("routes come from the tree: the data plane starts when the parent grants a subnet");
        let routes = pending.spawn(config, handle.clone());
        router = router.merge(routes.router(domain));
        tree_routes = Some(routes);
    }
    if let Some(dataplane) = &dataplane {
        router = router.merge(dataplane.router());
        services_task = Some(tokio::spawn(keep_services(dataplane.clone(), StateStore::new(data_dir))));
        // Instances' resolv.conf points at the bridge gateway: serve names there (from the static route table).
        match crate::dns::serve_for(dataplane).await {
            Ok((running, dns_router)) => {
                router = router.merge(dns_router);
                resolver = Some(running);
            }
            Err(err) => tracing::warn!("no DNS resolver for the instances: {err:#}"),
        }
    }
    let (stop_api, api_stopped) = tokio::sync::oneshot::channel::<()>();
    let api_task = tokio::spawn(api::server::serve(api_listener, router, async {
        let _ = api_stopped.await;
    }));

    let result = driver.run(shutdown_signal()).await;
    let _ = stop_api.send(());
    capacity_task.abort();
    if let Some(task) = services_task {
        task.abort();
    }
    if let Ok(Err(err)) = api_task.await {
        tracing::warn!("{err:#}");
    }
    if let Some(resolver) = resolver {
        resolver.shutdown().await;
    }
    if let Some(routes) = tree_routes {
        routes.shutdown().await;
    }
    if let Some(dataplane) = dataplane
        && let Err(err) = dataplane.shutdown().await
    {
        tracing::warn!("stopping the data plane: {err:#}");
    }
    result
}

/// Binds the tunnel's UDP port on every address, or says which port is taken and how to choose another.
fn bind_tunnel_port(port: u16) -> anyhow::Result<std::net::UdpSocket> {
    std::net::UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], port))).with_context(|| {
        format!(
            "cannot bind the tunnel's UDP port {port} (another agent on this machine?): choose another with \
             --tunnel-port, or run with --no-dataplane"
        )
    })
}

/// Until the routes issue brings subnet grants from the tree, the data plane starts from `--subnet` (and an optional
/// static `--routes` table); without `--subnet`, or with `--no-dataplane`, the agent runs the control plane only.
async fn start_dataplane(settings: &Settings, node_name: &str, data_dir: &Path) -> anyhow::Result<Option<DataPlane>> {
    let Some(subnet) = settings.subnet.filter(|_| settings.dataplane) else {
        tracing::info!("control plane only (no --subnet)");
        return Ok(None);
    };
    let table = match &settings.routes {
        Some(path) => Some(RouteTable::load(path)?),
        None => None,
    };
    let mut config = DataPlaneConfig::new(node_name, subnet);
    config.listen = SocketAddr::from(([0, 0, 0, 0], settings.tunnel_port));
    config.netns_prefix = netns_prefix(node_name);
    config.keep_netns = adopted_netns(&restorable(&StateStore::new(data_dir).load()?.services));
    config.cpu_latency_us = settings.cpu_latency_us;
    config.busy_poll = Duration::from_micros(settings.busy_poll_us.into());
    let dataplane =
        DataPlane::start(config).await.context("starting the data plane (it needs root or CAP_NET_ADMIN)")?;
    if let Some(table) = table
        && let Err(err) = dataplane.set_routes(table).await
    {
        let _ = dataplane.shutdown().await;
        return Err(err.context("installing the route table"));
    }
    tracing::info!(%subnet, tunnel_port = settings.tunnel_port, "data plane running");
    Ok(Some(dataplane))
}

/// The overlay's tunables: defaults, with the fan-out from the settings.
fn overlay_config(settings: &Settings) -> canopy_overlay::Config {
    let mut config = canopy_overlay::Config::default();
    if let Some(n) = settings.max_children {
        config.max_children = usize::from(n);
    }
    config.routes.machine_prefix = settings.machine_prefix;
    config
}

/// Start of the names of the service namespaces this agent creates: `CANOPY_NETNS_PREFIX` (the testbeds set it),
/// else `cnp-` and a short tag of this agent's peer id, so agents sharing a host never take each other's namespaces
/// for leftovers.
pub(crate) fn netns_prefix(node_name: &str) -> String {
    match std::env::var("CANOPY_NETNS_PREFIX") {
        Ok(prefix) if !prefix.is_empty() && !prefix.contains('/') => prefix,
        _ => {
            let tag = blake3::hash(node_name.as_bytes()).to_hex();
            format!("{}-{}-", crate::dataplane::DEFAULT_PREFIX, &tag[..6])
        }
    }
}

/// What the state file keeps of an attached service: enough to attach it again.
pub(crate) fn saved_services(attachments: &[Attachment]) -> Vec<serde_json::Value> {
    attachments
        .iter()
        .filter_map(|a| {
            let target = match (&a.target, &a.netns_name) {
                // A namespace the agent created outlives a crash of the agent: find it again by name.
                (AttachTarget::Create { owner_pid } | AttachTarget::Adopt { owner_pid, .. }, Some(name)) => {
                    serde_json::json!({"create": {"owner_pid": owner_pid, "netns": name}})
                }
                (target, _) => serde_json::to_value(target).ok()?,
            };
            Some(serde_json::json!({
                "service": a.service, "instance": a.instance, "target": target, "namespace_ip": a.namespace_ip
            }))
        })
        .collect()
}

/// The saved services that can still be attached: their process or namespace still exists.
pub(crate) fn restorable(saved: &[serde_json::Value]) -> Vec<AttachRequest> {
    let process_alive = |pid: u64| Path::new(&format!("/proc/{pid}")).exists();
    let netns_exists = |name: &str| Path::new("/run/netns").join(name).exists();
    saved
        .iter()
        .filter_map(|entry| {
            let service = entry["service"].as_str()?.to_string();
            let instance = u32::try_from(entry["instance"].as_u64()?).ok()?;
            let target = &entry["target"];
            let target = if let Some(created) = target.get("create") {
                let name = created["netns"].as_str()?;
                let owner_pid = u32::try_from(created["owner_pid"].as_u64()?).ok()?;
                (process_alive(owner_pid.into()) && netns_exists(name))
                    .then(|| AttachTarget::Adopt { owner_pid, netns: name.to_string() })?
            } else {
                match serde_json::from_value::<AttachTarget>(target.clone()).ok()? {
                    AttachTarget::Pid(pid) if process_alive(pid.into()) => AttachTarget::Pid(pid),
                    AttachTarget::Netns(name) if netns_exists(&name) => AttachTarget::Netns(name),
                    _ => return None,
                }
            };
            let namespace_ip = entry["namespace_ip"].as_str().and_then(|ip| ip.parse().ok());
            Some(AttachRequest { service, instance, target, addresses: None, namespace_ip })
        })
        .collect()
}

/// The namespaces of restorable services that an earlier run created: the data plane must not remove them.
pub(crate) fn adopted_netns(requests: &[AttachRequest]) -> Vec<String> {
    requests
        .iter()
        .filter_map(|r| match &r.target {
            AttachTarget::Adopt { netns, .. } => Some(netns.clone()),
            _ => None,
        })
        .collect()
}

/// Re-attaches the services of the previous run, then keeps the state file's service list in step with the data
/// plane (checked every few seconds), so a restart after a crash finds them again.
async fn keep_services(dataplane: DataPlane, store: StateStore) {
    let saved = store.load().map(|s| s.services).unwrap_or_default();
    for request in restorable(&saved) {
        let name = format!("{} instance {}", request.service, request.instance);
        match dataplane.attach(request).await {
            Ok(_) => tracing::info!("re-attached {name}"),
            Err(err) => tracing::warn!("cannot re-attach {name}: {err:#}"),
        }
    }
    let mut tick = tokio::time::interval(Duration::from_secs(3));
    loop {
        tick.tick().await;
        let services = saved_services(&dataplane.attachments().await);
        let changed = store.update(|state| {
            let changed = state.services != services;
            state.services = services;
            changed
        });
        if let Err(err) = changed {
            tracing::warn!("cannot save attached services: {err:#}");
        }
    }
}

fn print_join_hint(driver: &Driver, data_dir: &Path, key: &crate::runtime::admission::NetworkKey, source: &KeySource) {
    let peer = driver.local_peer_id();
    let addr = driver
        .listen_addrs()
        .iter()
        .find(|a| !a.iter().any(|p| matches!(p, Protocol::Ip4(ip) if ip.is_loopback())))
        .or_else(|| driver.listen_addrs().first())
        .map(|a| a.clone().with(Protocol::P2p(peer)).to_string())
        .unwrap_or_else(|| "<this node's address>".to_string());
    let key_file = match source {
        KeySource::File(path) => path.display().to_string(),
        KeySource::DataDir(path) | KeySource::Generated(path) => path.display().to_string(),
    };
    if let KeySource::Generated(_) = source {
        println!("generated a new network key: {}", key.to_hex());
    }
    println!("peer id: {peer}");
    println!("to join this overlay from another machine (copy the key file {key_file} there first):");
    println!("  agent join {addr} --network-key-file {key_file}");
    let _ = data_dir;
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_parse_and_reject() {
        assert_eq!(parse_position("48.1, 11.5").unwrap(), Position::new(48.1, 11.5));
        assert!(parse_position("48.1").unwrap_err().contains("LAT,LON"));
        assert!(parse_position("x,1").unwrap_err().contains("not a number"));
        assert!(parse_position("91,0").unwrap_err().contains("out of range"));
    }

    #[tokio::test]
    async fn bootstrap_forms() {
        let addrs = resolve_bootstrap("/ip4/127.0.0.1/tcp/4001").await.unwrap();
        assert_eq!(addrs.len(), 1);
        let addrs = resolve_bootstrap("127.0.0.1:4001").await.unwrap();
        assert!(addrs.contains(&"/ip4/127.0.0.1/udp/4001/quic-v1".parse().unwrap()));
        assert!(addrs.contains(&"/ip4/127.0.0.1/tcp/4001".parse().unwrap()));
        let err = resolve_bootstrap("/ip4/300.0.0.1/tcp/1").await.unwrap_err();
        assert!(err.to_string().contains("malformed bootstrap multiaddr"), "{err}");
        let err = resolve_bootstrap("nonsense").await.unwrap_err();
        assert!(err.to_string().contains("neither a multiaddr"), "{err}");
        let err = resolve_bootstrap("host:port").await.unwrap_err();
        assert!(err.to_string().contains("not a number"), "{err}");
    }

    #[test]
    fn services_are_saved_and_restored_only_while_their_namespace_lives() {
        let attachment = |target: AttachTarget, netns_name: Option<&str>| Attachment {
            service: "app.ns.web.ns".into(),
            instance: 1,
            namespace_ip: [10, 16, 0, 2].into(),
            instance_ip: [10, 30, 0, 9].into(),
            gateway: [10, 16, 0, 1].into(),
            mtu: 1400,
            netns_path: "/proc/1/ns/net".into(),
            netns_name: netns_name.map(str::to_string),
            resolv_conf: None,
            host_interface: "cnph0".into(),
            target,
        };
        let me = std::process::id();
        let saved = saved_services(&[
            attachment(AttachTarget::Pid(me), None),
            attachment(AttachTarget::Pid(u32::MAX - 1), None),
            attachment(AttachTarget::Netns("canopy-test-no-such-ns".into()), None),
            attachment(AttachTarget::Create { owner_pid: me }, Some("canopy-test-no-such-ns")),
        ]);
        assert_eq!(saved.len(), 4);
        assert_eq!(saved[3]["target"]["create"]["netns"], "canopy-test-no-such-ns");
        // Only the living process comes back; the dead one and the missing namespaces do not.
        let back = restorable(&saved);
        assert_eq!(
            back,
            vec![AttachRequest {
                service: "app.ns.web.ns".into(),
                instance: 1,
                target: AttachTarget::Pid(me),
                addresses: None,
                namespace_ip: Some([10, 16, 0, 2].into()),
            }]
        );
        assert!(restorable(&[serde_json::json!({"service": 3})]).is_empty());
    }

    #[test]
    fn flags_override_config_file() {
        let dir = std::env::temp_dir().join(format!("canopy-daemon-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("agent.toml");
        std::fs::write(
            &file,
            "position = \"10,20\"\nlisten = [\"/ip4/127.0.0.1/tcp/5000\"]\nmdns = false\ntunnel_port = 6000\n",
        )
        .unwrap();
        let args = DaemonArgs { config: Some(file.clone()), tunnel_port: Some(7000), ..Default::default() };
        let settings = args.settings().unwrap();
        assert_eq!(settings.position, Position::new(10.0, 20.0));
        assert_eq!(settings.listen, vec!["/ip4/127.0.0.1/tcp/5000".parse::<Multiaddr>().unwrap()]);
        assert!(!settings.mdns);
        assert_eq!(settings.tunnel_port, 7000);
        std::fs::write(&file, "positon = \"1,2\"\n").unwrap();
        let err = args.settings().unwrap_err();
        assert!(format!("{err:#}").contains("unknown field"), "{err:#}");
        std::fs::remove_dir_all(&dir).unwrap();
        let defaults = DaemonArgs::default().settings().unwrap();
        assert_eq!(defaults.listen.len(), 2);
        assert!(defaults.mdns);
    }
}
