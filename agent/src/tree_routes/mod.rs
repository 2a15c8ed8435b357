//! Routes from the tree: the agent's link between the overlay's routes protocol and the data plane.
//!
//! One task owns what this machine knows of services ([`table::Known`]), the data plane and the resolver:
//! - the machine subnet granted by the parent starts the data plane (bridge, TUN, tunnel) and the DNS resolver on
//!   its gateway; a renumbered subnet restarts them;
//! - `agent run` / `agent attach` deploy the service (the root allocates its ServiceIPs and InstanceIPs), give the
//!   instance a namespace IP in the machine subnet, attach it and register its record with the tree; detach, or the
//!   instance's process exiting, unregisters it;
//! - a name the resolver does not know, or a packet to an unknown overlay address, becomes a table query up the
//!   tree; answers and pushed changes rebuild the data plane's route table;
//! - routes in use are kept alive (`RouteUsed`); a machine's "route not found" makes the tree query again.
//!
//! The driver forwards the overlay's `RouteEvent`s through an [`EventSink`]; this task sends `RouteCommand`s through
//! the runtime [`Handle`].

pub mod api;
pub mod command;
mod lookup;
pub mod table;

use crate::dataplane::routes::RouteTable;
use crate::dataplane::{AttachRequest, Attachment, DataPlane, DataPlaneConfig, Notice, ReservedSocket};
use crate::dns::{self, DnsConfig, RunningResolver};
use crate::persist::StateStore;
use crate::runtime::{Handle, node_name};
use anyhow::{anyhow, bail};
use canopy_overlay::routes::{AddressRequest, InstanceRecord, QueryKey, ServiceAddresses, ServiceDomain, ServiceName};
use canopy_overlay::routing::{RouteCommand, RouteEvent};
use canopy_overlay::{Capacity, NodeId, Position};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use table::{Known, Machine, ServiceRoutes, Skipped};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// How long a deployment may take (a round trip to the root, which may be failing over).
const DEPLOY_TIMEOUT: Duration = Duration::from_secs(20);
/// Waiters for a table query or deployment are dropped after this (the resolver gives up sooner).
const WAITER_TIMEOUT: Duration = Duration::from_secs(15);
/// How often routes in use are renewed with the tree (well inside the overlay's interest lifetime).
const RENEW_INTERVAL: Duration = Duration::from_secs(20);
/// A route counts as in use this long after its last lookup or new connection.
const USE_WINDOW: Duration = Duration::from_secs(60);
/// Routes nobody used for this long leave the table (their connections were idle that long too).
const FORGET_AFTER: Duration = Duration::from_secs(600);
const TICK: Duration = Duration::from_secs(1);
/// Re-attaching the instances of the previous run: attempts, and the pause between them.
const RESTORE_ATTEMPTS: u32 = 10;
const RESTORE_PAUSE: Duration = Duration::from_secs(3);
/// Free namespace IPs left when another subnet is asked for (Oakestra's ceiling was one subnet per machine).
const SPARE_ADDRESSES: usize = 4;

pub struct TreeRoutesConfig {
    pub me: NodeId,
    /// Where this machine's tunnel can be reached, best first.
    pub tunnel_endpoints: Vec<SocketAddr>,
    pub tunnel_port: u16,
    /// The tunnel port, bound when the agent started (the data plane takes it when it starts).
    pub tunnel_socket: ReservedSocket,
    pub position: Position,
    /// This machine's free capacity, as measured (or overridden) now: the records of hosted instances carry it.
    pub capacity: tokio::sync::watch::Receiver<Capacity>,
    /// Hex key for the data plane's sealed tunnels (derived from the network key: every member has it).
    pub tunnel_key: Option<String>,
    pub machine_prefix: u8,
    /// See `DataPlaneConfig::cpu_latency_us`.
    pub cpu_latency_us: Option<u32>,
    /// See `DataPlaneConfig::busy_poll`.
    pub busy_poll: Duration,
    pub domain: ServiceDomain,
    pub state: StateStore,
}

/// What the task is asked or told.
enum Inbox {
    Event(RouteEvent),
    Notice(Notice),
    Deploy {
        name: ServiceName,
        instance: u32,
        request: AddressRequest,
        reply: oneshot::Sender<Result<(ServiceAddresses, Ipv4Addr), String>>,
    },
    Attach {
        request: AttachRequest,
        addresses: ServiceAddresses,
        instance_ip: Ipv4Addr,
        reply: Reply<Attachment>,
    },
    Detach {
        service: ServiceName,
        number: u32,
        reply: Reply<Attachment>,
    },
    Lookup {
        key: QueryKey,
        reply: oneshot::Sender<Option<ServiceRoutes>>,
    },
    Services(oneshot::Sender<Vec<ServiceReport>>),
    Instances(oneshot::Sender<Vec<Attachment>>),
    Table(oneshot::Sender<Option<TableReport>>),
    DataPlane(oneshot::Sender<Option<DataPlane>>),
    DnsStatus(oneshot::Sender<Option<dns::DnsStatus>>),
    Shutdown(oneshot::Sender<()>),
}

type Reply<T> = oneshot::Sender<anyhow::Result<T>>;

/// The driver's way to hand the overlay's route events to this task.
#[derive(Clone)]
pub struct EventSink(mpsc::UnboundedSender<Inbox>);

impl EventSink {
    pub fn send(&self, event: RouteEvent) {
        let _ = self.0.send(Inbox::Event(event));
    }
}

/// A cloneable handle to the task.
#[derive(Clone)]
pub struct TreeRoutes {
    inbox: mpsc::UnboundedSender<Inbox>,
}

/// A service as `agent services` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceReport {
    pub name: String,
    /// ServiceIP per policy name.
    pub service_ips: BTreeMap<String, Ipv4Addr>,
    pub instances: Vec<InstanceReport>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceReport {
    pub number: u32,
    pub instance_ip: Ipv4Addr,
    pub namespace_ip: Ipv4Addr,
    /// Peer id of the hosting machine.
    pub host: String,
    /// Hosted on this machine.
    pub local: bool,
}

/// The route table in force and what was left out of it.
#[derive(Debug, Clone, Serialize)]
pub struct TableReport {
    pub table: RouteTable,
    pub skipped: Skipped,
}

/// Creates the task's inbox; the sink goes to the driver before the task starts (it needs the driver's listen
/// addresses).
pub fn channel() -> (EventSink, Pending) {
    let (tx, rx) = mpsc::unbounded_channel();
    (EventSink(tx.clone()), Pending { tx, rx })
}

/// The task's inbox before it runs.
pub struct Pending {
    tx: mpsc::UnboundedSender<Inbox>,
    rx: mpsc::UnboundedReceiver<Inbox>,
}

impl Pending {
    /// Starts the task; `runtime` sends route commands to the overlay.
    pub fn spawn(self, config: TreeRoutesConfig, runtime: Handle) -> TreeRoutes {
        let handle = TreeRoutes { inbox: self.tx };
        let saved_services = config.state.load().map(|s| s.services).unwrap_or_default();
        let task = Task {
            config,
            runtime,
            me: handle.clone(),
            known: Known::default(),
            subnets: Vec::new(),
            subnet_requested: false,
            dataplane: None,
            resolver: None,
            deploys: HashMap::new(),
            queries: HashMap::new(),
            last_used: HashMap::new(),
            dirty: false,
            installed: None,
            skipped: Skipped::default(),
            saved_services,
            restoring_until: None,
            next_renew: Instant::now() + RENEW_INTERVAL,
        };
        tokio::spawn(task.run(self.rx));
        handle
    }
}

impl TreeRoutes {
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Inbox) -> anyhow::Result<T> {
        let (reply, answer) = oneshot::channel();
        self.inbox.send(make(reply)).map_err(|_| anyhow!("the agent is shutting down"))?;
        answer.await.map_err(|_| anyhow!("the agent is shutting down"))
    }

    /// Attaches an instance: deploys its service with the tree (the root allocates the addresses), then gives it a
    /// namespace IP, attaches it and registers it.
    pub async fn attach(&self, mut request: AttachRequest) -> anyhow::Result<Attachment> {
        let name: ServiceName = request
            .service
            .parse()
            .map_err(|e| anyhow!("{:?} is not a service name (APP.APPNS.SVC.SVCNS): {e}", request.service))?;
        request.service = name.to_string();
        let instance = request.instance;
        let fixed = request.addresses.take().unwrap_or_default();
        let deployed = self.ask(|reply| Inbox::Deploy { name: name.clone(), instance, request: fixed, reply });
        let (addresses, instance_ip) = tokio::time::timeout(DEPLOY_TIMEOUT, deployed)
            .await
            .map_err(|_| {
                anyhow!("deploying {name} timed out after {DEPLOY_TIMEOUT:?}: the tree's root did not answer")
            })??
            .map_err(|reason| anyhow!("deploying {name}: {reason}"))?;
        self.ask(|reply| Inbox::Attach { request, addresses, instance_ip, reply }).await?
    }

    pub async fn detach(&self, service: &str, number: u32) -> anyhow::Result<Attachment> {
        let service: ServiceName =
            service.parse().map_err(|e| anyhow!("{service:?} is not a service name (APP.APPNS.SVC.SVCNS): {e}"))?;
        self.ask(|reply| Inbox::Detach { service, number, reply }).await?
    }

    /// What the tree says about a service (by name, ServiceIP or InstanceIP): from what this machine knows, or from
    /// a table query up the tree. `None`: the tree does not know it.
    pub async fn lookup(&self, key: QueryKey) -> anyhow::Result<Option<ServiceRoutes>> {
        self.ask(|reply| Inbox::Lookup { key, reply }).await
    }

    pub async fn services(&self) -> anyhow::Result<Vec<ServiceReport>> {
        self.ask(Inbox::Services).await
    }

    pub async fn instances(&self) -> anyhow::Result<Vec<Attachment>> {
        self.ask(Inbox::Instances).await
    }

    pub async fn table(&self) -> anyhow::Result<Option<TableReport>> {
        self.ask(Inbox::Table).await
    }

    /// The data plane, once the machine has a subnet and it started.
    pub async fn dataplane(&self) -> anyhow::Result<Option<DataPlane>> {
        self.ask(Inbox::DataPlane).await
    }

    /// The resolver on the bridge gateway, once the data plane runs.
    pub async fn dns_status(&self) -> anyhow::Result<Option<dns::DnsStatus>> {
        self.ask(Inbox::DnsStatus).await
    }

    /// Stops the resolver and the data plane (removing everything it installed).
    pub async fn shutdown(&self) {
        let _ = self.ask(Inbox::Shutdown).await;
    }
}

struct Task {
    config: TreeRoutesConfig,
    runtime: Handle,
    me: TreeRoutes,
    known: Known,
    /// This machine's instance subnets, the one the data plane started with first.
    subnets: Vec<Ipv4Net>,
    /// Another subnet was asked for (the free addresses ran low) and not granted yet.
    subnet_requested: bool,
    dataplane: Option<DataPlane>,
    resolver: Option<RunningResolver>,
    deploys: HashMap<ServiceName, Vec<DeployWaiter>>,
    queries: HashMap<QueryKey, Vec<QueryWaiter>>,
    last_used: HashMap<ServiceName, Instant>,
    dirty: bool,
    installed: Option<RouteTable>,
    skipped: Skipped,
    /// The previous run's services not attached again yet; kept in the state file until `restoring_until`.
    saved_services: Vec<serde_json::Value>,
    restoring_until: Option<Instant>,
    next_renew: Instant,
}

/// A lookup waiting for the tree's answer, and since when.
type QueryWaiter = (Instant, oneshot::Sender<Option<ServiceRoutes>>);

struct DeployWaiter {
    since: Instant,
    instance: u32,
    reply: oneshot::Sender<Result<(ServiceAddresses, Ipv4Addr), String>>,
}

impl Task {
    async fn run(mut self, mut inbox: mpsc::UnboundedReceiver<Inbox>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut capacity = self.config.capacity.clone();
        loop {
            tokio::select! {
                Ok(()) = capacity.changed() => {
                    let free = *capacity.borrow_and_update();
                    self.republish_hosted(free).await;
                }
                message = inbox.recv() => {
                    let Some(message) = message else { break };
                    if self.on_message(message).await.is_break() {
                        return;
                    }
                    // Take everything already queued before rebuilding the table once.
                    while let Ok(message) = inbox.try_recv() {
                        if self.on_message(message).await.is_break() {
                            return;
                        }
                    }
                }
                _ = tick.tick() => self.on_tick().await,
            }
            if self.dirty {
                self.install_table().await;
            }
        }
        self.stop_dataplane(true).await;
    }

    async fn on_message(&mut self, message: Inbox) -> std::ops::ControlFlow<()> {
        match message {
            Inbox::Event(event) => self.on_event(event).await,
            Inbox::Notice(notice) => self.on_notice(notice).await,
            Inbox::Deploy { name, instance, request, reply } => {
                self.deploys.entry(name.clone()).or_default().push(DeployWaiter {
                    since: Instant::now(),
                    instance,
                    reply,
                });
                self.command(RouteCommand::DeployService { name, request, instances: instance + 1 }).await;
            }
            Inbox::Attach { request, addresses, instance_ip, reply } => {
                let result = self.attach(request, addresses, instance_ip).await;
                let _ = reply.send(result);
            }
            Inbox::Detach { service, number, reply } => {
                let result = self.detach(&service, number).await;
                let _ = reply.send(result);
            }
            Inbox::Lookup { key, reply } => self.lookup(key, reply).await,
            Inbox::Services(reply) => {
                let _ = reply.send(self.service_reports());
            }
            Inbox::Instances(reply) => {
                let attachments = match &self.dataplane {
                    Some(dataplane) => dataplane.attachments().await,
                    None => Vec::new(),
                };
                let _ = reply.send(attachments);
            }
            Inbox::Table(reply) => {
                let report = self.installed.clone().map(|table| TableReport { table, skipped: self.skipped.clone() });
                let _ = reply.send(report);
            }
            Inbox::DataPlane(reply) => {
                let _ = reply.send(self.dataplane.clone());
            }
            Inbox::DnsStatus(reply) => {
                let _ = reply.send(self.resolver.as_ref().map(RunningResolver::status));
            }
            Inbox::Shutdown(reply) => {
                // Instances started with `agent run` outlive the agent: their namespaces stay (and the state file
                // lists them), so the next start adopts them, as after a crash (an upgrade loses no instance).
                self.stop_dataplane(true).await;
                let _ = reply.send(());
                return std::ops::ControlFlow::Break(());
            }
        }
        std::ops::ControlFlow::Continue(())
    }

    async fn command(&self, command: RouteCommand) {
        if let Err(err) = self.runtime.route(command).await {
            tracing::debug!("route command not delivered: {err:#}");
        }
    }

    // ---- events from the tree ----

    async fn on_event(&mut self, event: RouteEvent) {
        match event {
            RouteEvent::SubnetGranted { block } if self.subnets.contains(&block) => {}
            RouteEvent::SubnetGranted { block } => {
                self.subnet_requested = false;
                if self.subnets.is_empty() {
                    tracing::info!(subnet = %block, "the tree granted this machine's subnet");
                    self.start_dataplane(vec![block]).await;
                } else if let Some(dataplane) = self.dataplane.clone() {
                    match dataplane.add_subnet(block).await {
                        Ok(()) => {
                            tracing::info!(subnet = %block, "the tree granted this machine another subnet");
                            self.subnets.push(block);
                            self.save_grants();
                            self.dirty = true;
                        }
                        Err(err) => tracing::warn!(subnet = %block, "cannot use the granted subnet: {err:#}"),
                    }
                }
            }
            RouteEvent::SubnetChanged { old, new } if self.subnets.contains(&old) => {
                tracing::warn!(%old, %new, "this machine's subnet was renumbered; restarting the data plane");
                let subnets: Vec<Ipv4Net> = self.subnets.iter().map(|&s| if s == old { new } else { s }).collect();
                // The instances' namespaces stay; the new data plane adopts them with new namespace IPs.
                self.saved_services = self.stop_dataplane(true).await;
                self.start_dataplane(subnets).await;
            }
            RouteEvent::SubnetRevoked { block } if self.subnets.contains(&block) => {
                let rest: Vec<Ipv4Net> = self.subnets.iter().copied().filter(|&s| s != block).collect();
                if rest.is_empty() {
                    tracing::error!(subnet = %block, "the tree revoked this machine's subnet; instances here are detached");
                    self.stop_dataplane(false).await;
                    // The next grant starts the data plane again.
                    self.subnets.clear();
                    self.save_grants();
                    self.command(RouteCommand::RequestSubnet).await;
                } else {
                    tracing::warn!(subnet = %block, "the tree revoked one of this machine's subnets; restarting the data plane");
                    self.saved_services = self.stop_dataplane(true).await;
                    self.start_dataplane(rest).await;
                }
            }
            RouteEvent::SubnetChanged { .. } | RouteEvent::SubnetRevoked { .. } => {}
            RouteEvent::ServiceDeployed { addresses, instance_ips } => {
                self.dirty |= self.known.set_addresses(addresses.clone());
                // Each deployment answers for the instance numbers it asked for; waiters for higher numbers (a
                // concurrent `agent run` of the same service) keep waiting for their own answer.
                let waiters = self.deploys.remove(&addresses.name).unwrap_or_default();
                let (answered, waiting): (Vec<_>, Vec<_>) =
                    waiters.into_iter().partition(|w| instance_ips.iter().any(|(number, _)| *number == w.instance));
                for waiter in answered {
                    if let Some(&(_, ip)) = instance_ips.iter().find(|(number, _)| *number == waiter.instance) {
                        let _ = waiter.reply.send(Ok((addresses.clone(), ip)));
                    }
                }
                if !waiting.is_empty() {
                    self.deploys.insert(addresses.name.clone(), waiting);
                }
            }
            RouteEvent::DeployFailed { name, reason } => {
                for waiter in self.deploys.remove(&name).unwrap_or_default() {
                    let _ = waiter.reply.send(Err(reason.clone()));
                }
            }
            RouteEvent::AllocationFailed { reason } => tracing::warn!("the tree refused an allocation: {reason}"),
            RouteEvent::RouteAnswer { key, answer } => {
                let service = answer.service.clone();
                self.dirty |= self.known.apply_answer(&key, answer);
                self.last_used.entry(service.clone()).or_insert_with(Instant::now);
                let routes = self.known.service(&service).cloned();
                for k in [key, QueryKey::Name(service)] {
                    for (_, reply) in self.queries.remove(&k).unwrap_or_default() {
                        let _ = reply.send(routes.clone());
                    }
                }
            }
            RouteEvent::RouteNotFound { key } => {
                for (_, reply) in self.queries.remove(&key).unwrap_or_default() {
                    let _ = reply.send(None);
                }
            }
            RouteEvent::RouteChanged { change } => {
                self.dirty |= self.known.apply_change(change);
            }
        }
    }

    // ---- what the data plane noticed ----

    async fn on_notice(&mut self, notice: Notice) {
        match notice {
            Notice::UnknownAddress(address) => {
                tracing::debug!(%address, "packet to an unknown overlay address; asking the tree");
                self.command(RouteCommand::QueryRoute(QueryKey::Address(address))).await;
            }
            Notice::InstanceUnreachable { service, instance } => {
                let Ok(name) = service.parse::<ServiceName>() else { return };
                self.dirty |= self.known.forget_instance(&name, instance);
                self.command(RouteCommand::InstanceUnreachable { service: name, number: instance }).await;
            }
            Notice::ServiceUsed(service) => {
                if let Ok(name) = service.parse::<ServiceName>() {
                    self.last_used.insert(name, Instant::now());
                }
            }
        }
    }

    // ---- lookups ----

    async fn lookup(&mut self, key: QueryKey, reply: oneshot::Sender<Option<ServiceRoutes>>) {
        let known = match &key {
            QueryKey::Name(name) => Some(name.clone()),
            QueryKey::Address(ip) => self.known.service_of(*ip).cloned(),
        };
        if let Some(name) = known
            && let Some(routes) = self.known.service(&name).filter(|r| r.addresses.is_some())
        {
            self.last_used.insert(name, Instant::now());
            let _ = reply.send(Some(routes.clone()));
            return;
        }
        let waiters = self.queries.entry(key.clone()).or_default();
        let first = waiters.is_empty();
        waiters.push((Instant::now(), reply));
        if first {
            self.command(RouteCommand::QueryRoute(key)).await;
        }
    }

    fn service_reports(&self) -> Vec<ServiceReport> {
        self.known
            .services()
            .map(|(name, routes)| ServiceReport {
                name: name.to_string(),
                service_ips: routes
                    .addresses
                    .iter()
                    .flat_map(|a| a.service_ips.iter().map(|(p, ip)| (p.as_str().to_string(), *ip)))
                    .collect(),
                instances: routes
                    .instances
                    .values()
                    .map(|r| InstanceReport {
                        number: r.number,
                        instance_ip: r.instance_ip,
                        namespace_ip: r.namespace_ip,
                        host: node_name(&r.host),
                        local: r.host == self.config.me,
                    })
                    .collect(),
            })
            .collect()
    }

    // ---- instances here ----

    async fn attach(
        &mut self,
        request: AttachRequest,
        addresses: ServiceAddresses,
        instance_ip: Ipv4Addr,
    ) -> anyhow::Result<Attachment> {
        let Some(dataplane) = self.dataplane.clone() else {
            bail!(
                "this machine has no data plane yet: it starts when the parent grants a subnet (`agent status` shows \
                 it) and needs root"
            );
        };
        let name: ServiceName = request.service.parse().map_err(|e| anyhow!("{e}"))?;
        if self.known.is_hosted(&name, request.instance) {
            bail!("instance {} of {} is already attached", request.instance, request.service);
        }
        let free = self.free_namespace_ips();
        let namespace_ip = match request.namespace_ip.filter(|ip| free.contains(ip)).or(free.first().copied()) {
            Some(ip) => ip,
            None => {
                self.request_subnet().await;
                bail!(
                    "this machine's subnets ({}) are full; another one was asked from the tree: try again in a moment",
                    self.subnets.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", ")
                );
            }
        };
        let record = InstanceRecord {
            service: name.clone(),
            number: request.instance,
            instance_ip,
            namespace_ip,
            host: self.config.me,
            tunnel: self.config.tunnel_endpoints.clone(),
            position: self.config.position,
            free: *self.config.capacity.borrow(),
            version: record_version(),
        };
        self.known.host(addresses, record.clone());
        self.install_table().await;
        match dataplane.attach(request).await {
            Ok(attachment) => {
                if self.free_namespace_ips().len() <= SPARE_ADDRESSES {
                    // Ask before the last address goes, so the next instances do not wait for the grant.
                    self.request_subnet().await;
                }
                self.last_used.insert(name, Instant::now());
                self.command(RouteCommand::RegisterInstance(record)).await;
                // Saved now, not at the next tick: an agent killed right after an attach must still adopt the
                // instance when it restarts.
                self.save_services(&dataplane.attachments().await);
                Ok(attachment)
            }
            Err(err) => {
                self.known.unhost(&name, record.number);
                self.dirty = true;
                Err(err)
            }
        }
    }

    /// The addresses of this machine's subnets, in order, that are neither a network, a gateway (`.1`), a
    /// broadcast, nor taken by an instance.
    fn free_namespace_ips(&self) -> Vec<Ipv4Addr> {
        let taken: HashSet<Ipv4Addr> = self
            .known
            .hosted()
            .filter_map(|(service, number)| self.known.service(service)?.instances.get(number))
            .map(|r| r.namespace_ip)
            .collect();
        self.subnets
            .iter()
            .flat_map(|&subnet| subnet.hosts().filter(move |ip| *ip != crate::dataplane::gateway_of(subnet)))
            .filter(|ip| !taken.contains(ip))
            .collect()
    }

    /// Asks the tree for one more machine subnet (once until it is granted).
    async fn request_subnet(&mut self) {
        if !self.subnet_requested {
            self.subnet_requested = true;
            tracing::info!("this machine's subnets are nearly full; asking the tree for another one");
            self.command(RouteCommand::RequestSubnet).await;
        }
    }

    async fn detach(&mut self, service: &ServiceName, number: u32) -> anyhow::Result<Attachment> {
        let Some(dataplane) = self.dataplane.clone() else {
            bail!("instance {number} of {service} is not attached (this machine has no data plane)");
        };
        let attachment = dataplane.detach(&service.to_string(), number).await?;
        self.unhost(service, number).await;
        self.save_services(&dataplane.attachments().await);
        Ok(attachment)
    }

    /// The free capacity changed: the records of instances hosted here go up again with it (a newer version), so
    /// capacity-aware policies elsewhere see it.
    async fn republish_hosted(&mut self, free: Capacity) {
        let hosted: Vec<(ServiceName, u32)> = self.known.hosted().cloned().collect();
        for (service, number) in hosted {
            let Some(routes) = self.known.service(&service) else { continue };
            let (Some(addresses), Some(record)) = (routes.addresses.clone(), routes.instances.get(&number)) else {
                continue;
            };
            let record = InstanceRecord { free, version: record_version().max(record.version + 1), ..record.clone() };
            self.known.host(addresses, record.clone());
            self.command(RouteCommand::RegisterInstance(record)).await;
        }
    }

    async fn unhost(&mut self, service: &ServiceName, number: u32) {
        if let Some(record) = self.known.unhost(service, number) {
            self.dirty = true;
            let command =
                RouteCommand::UnregisterInstance { service: service.clone(), number, version: record.version };
            self.command(command).await;
        }
    }

    // ---- the data plane ----

    /// Starts the data plane on `subnets` (the first one is the bridge's main address and the DNS resolver's).
    async fn start_dataplane(&mut self, subnets: Vec<Ipv4Net>) {
        let Some(&subnet) = subnets.first() else { return };
        self.subnets = subnets;
        self.save_grants();
        let mut config = DataPlaneConfig::new(node_name(&self.config.me), subnet);
        config.listen = SocketAddr::from(([0, 0, 0, 0], self.config.tunnel_port));
        config.netns_prefix = crate::daemon::netns_prefix(&config.node_name);
        let restore = crate::daemon::restorable(&self.saved_services);
        config.keep_netns = crate::daemon::adopted_netns(&restore);
        config.cpu_latency_us = self.config.cpu_latency_us;
        config.busy_poll = self.config.busy_poll;
        config.reserved_socket = self.config.tunnel_socket.clone();
        let dataplane = match DataPlane::start(config).await {
            Ok(dataplane) => dataplane,
            Err(err) => {
                tracing::error!(
                    "the data plane did not start ({err:#}); this machine stays in the tree but cannot host or reach \
                     services (it needs root or CAP_NET_ADMIN)"
                );
                return;
            }
        };
        for &extra in &self.subnets[1..] {
            if let Err(err) = dataplane.add_subnet(extra).await {
                tracing::warn!(subnet = %extra, "cannot use this machine's subnet: {err:#}");
            }
        }
        if let Some(mut notices) = dataplane.take_notices() {
            let inbox = self.me.inbox.clone();
            tokio::spawn(async move {
                while let Some(notice) = notices.recv().await {
                    if inbox.send(Inbox::Notice(notice)).is_err() {
                        return;
                    }
                }
            });
        }
        let gateway = Ipv4Addr::from(u32::from(subnet.network()) + 1);
        let lookup = Arc::new(lookup::TreeLookup::new(self.me.clone()));
        match DnsConfig::with_system_upstreams((gateway, dns::DNS_PORT).into(), self.config.domain.clone()) {
            Ok(config) => match dns::spawn(config, lookup).await {
                Ok(resolver) => {
                    tracing::info!(listen = %resolver.local_addr(), "DNS resolver running");
                    self.resolver = Some(resolver);
                }
                Err(err) => tracing::warn!("no DNS resolver for the instances: {err:#}"),
            },
            Err(err) => tracing::warn!("no DNS resolver for the instances: {err:#}"),
        }
        self.dataplane = Some(dataplane);
        self.installed = None;
        self.dirty = true;
        self.install_table().await;
        tracing::info!(%subnet, tunnel_port = self.config.tunnel_port, "data plane running");
        // Until they are attached again (or given up on), the saved entries stay in the state file: a second crash
        // during the restore must not forget them.
        self.saved_services.retain(|entry| restore.iter().any(|r| saved_entry_is(entry, &r.service, r.instance)));
        self.restoring_until = Some(Instant::now() + RESTORE_PAUSE * (RESTORE_ATTEMPTS + 1));
        self.restore_later(restore);
    }

    /// Stops the resolver and the data plane; returns what was attached, as state-file entries (to attach again
    /// after a renumbering, when `keep_namespaces` left the instances' namespaces in place).
    async fn stop_dataplane(&mut self, keep_namespaces: bool) -> Vec<serde_json::Value> {
        if let Some(resolver) = self.resolver.take() {
            resolver.shutdown().await;
        }
        let Some(dataplane) = self.dataplane.take() else { return Vec::new() };
        let attachments = dataplane.attachments().await;
        if keep_namespaces {
            // Whatever stops us next, the instances can be adopted again.
            self.save_services(&attachments);
        }
        let hosted: Vec<(ServiceName, u32)> = self.known.hosted().cloned().collect();
        for (service, number) in hosted {
            self.unhost(&service, number).await;
        }
        let stopped = match keep_namespaces {
            true => dataplane.shutdown_keeping_namespaces().await,
            false => dataplane.shutdown().await,
        };
        if let Err(err) = stopped {
            tracing::warn!("stopping the data plane: {err:#}");
        }
        self.installed = None;
        crate::daemon::saved_services(&attachments)
    }

    /// Attaches instances again in the background (their deployments need the tree, which may still be forming).
    fn restore_later(&self, requests: Vec<AttachRequest>) {
        for request in requests {
            let routes = self.me.clone();
            tokio::spawn(async move {
                let label = format!("{} instance {}", request.service, request.instance);
                for attempt in 1..=RESTORE_ATTEMPTS {
                    match routes.attach(request.clone()).await {
                        Ok(_) => {
                            tracing::info!("re-attached {label}");
                            return;
                        }
                        Err(err) if attempt == RESTORE_ATTEMPTS => {
                            tracing::warn!("cannot re-attach {label}: {err:#}")
                        }
                        Err(err) => {
                            tracing::debug!("re-attaching {label} (attempt {attempt}): {err:#}");
                            tokio::time::sleep(RESTORE_PAUSE).await;
                        }
                    }
                }
            });
        }
    }

    async fn install_table(&mut self) {
        self.dirty = false;
        let (Some(dataplane), Some(&subnet)) = (&self.dataplane, self.subnets.first()) else { return };
        let Some(&endpoint) = self.config.tunnel_endpoints.first() else { return };
        let machine = Machine {
            id: self.config.me,
            subnet,
            extra_subnets: self.subnets[1..].to_vec(),
            endpoint,
            position: self.config.position,
            tunnel_key: self.config.tunnel_key.clone(),
        };
        let (table, skipped) = self.known.route_table(&machine, self.config.machine_prefix);
        if skipped != self.skipped && skipped != Skipped::default() {
            tracing::warn!(?skipped, "route table entries left out (conflicting or incomplete records)");
        }
        self.skipped = skipped;
        if self.installed.as_ref() == Some(&table) {
            return;
        }
        match dataplane.set_routes(table.clone()).await {
            Ok(()) => {
                tracing::debug!(services = table.services.len(), machines = table.nodes.len(), "route table installed");
                self.installed = Some(table);
            }
            Err(err) => tracing::error!("the data plane refused the route table: {err:#}"),
        }
    }

    // ---- housekeeping ----

    async fn on_tick(&mut self) {
        let now = Instant::now();
        for waiters in self.queries.values_mut() {
            waiters.retain(|(since, _)| now.duration_since(*since) < WAITER_TIMEOUT);
        }
        self.queries.retain(|_, waiters| !waiters.is_empty());
        for waiters in self.deploys.values_mut() {
            waiters.retain(|w| now.duration_since(w.since) < WAITER_TIMEOUT + DEPLOY_TIMEOUT);
        }
        self.deploys.retain(|_, waiters| !waiters.is_empty());

        // Instances whose process or namespace went away were detached by the data plane: unregister them.
        if let Some(dataplane) = self.dataplane.clone() {
            let attached: Vec<(String, u32)> =
                dataplane.attachments().await.into_iter().map(|a| (a.service, a.instance)).collect();
            let gone: Vec<(ServiceName, u32)> = self
                .known
                .hosted()
                .filter(|(service, number)| !attached.iter().any(|(s, n)| *s == service.to_string() && n == number))
                .cloned()
                .collect();
            for (service, number) in gone {
                tracing::info!(%service, number, "instance gone; unregistering it from the tree");
                self.unhost(&service, number).await;
            }
            self.save_services(&dataplane.attachments().await);
        }

        if now >= self.next_renew {
            self.next_renew = now + RENEW_INTERVAL;
            let used: Vec<ServiceName> = self
                .last_used
                .iter()
                .filter(|(_, at)| now.duration_since(**at) < USE_WINDOW)
                .map(|(name, _)| name.clone())
                .collect();
            for name in used {
                self.command(RouteCommand::RouteUsed(name)).await;
            }
        }
        let stale: Vec<ServiceName> = self
            .last_used
            .iter()
            .filter(|(_, at)| now.duration_since(**at) > FORGET_AFTER)
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            if self.known.forget_service(&name) {
                tracing::debug!(service = %name, "route unused; dropped from the table");
                self.dirty = true;
            }
            self.last_used.remove(&name);
        }
    }

    fn save_grants(&self) {
        let grants: Vec<serde_json::Value> =
            self.subnets.iter().map(|s| serde_json::json!({"machine_subnet": s.to_string()})).collect();
        self.update_state(|state| {
            let changed = state.grants != grants;
            state.grants = grants.clone();
            changed
        });
    }

    fn save_services(&mut self, attachments: &[Attachment]) {
        let mut services = crate::daemon::saved_services(attachments);
        if self.restoring_until.is_some_and(|until| Instant::now() < until) {
            self.saved_services
                .retain(|entry| !attachments.iter().any(|a| saved_entry_is(entry, &a.service, a.instance)));
            services.extend(self.saved_services.iter().cloned());
        } else {
            self.restoring_until = None;
            self.saved_services.clear();
        }
        self.update_state(|state| {
            let changed = state.services != services;
            state.services = services.clone();
            changed
        });
    }

    fn update_state(&self, change: impl FnOnce(&mut crate::persist::State) -> bool) {
        if let Err(err) = self.config.state.update(change) {
            tracing::warn!("cannot save the state file: {err:#}");
        }
    }
}

/// Orders records of the same instance across restarts of this agent: milliseconds of the wall clock.
fn record_version() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_millis() as u64)
}

/// The subnets this machine held before it restarted (from the state file).
/// Whether a state-file service entry (see `daemon::saved_services`) is instance `instance` of `service`.
fn saved_entry_is(entry: &serde_json::Value, service: &str, instance: u32) -> bool {
    entry["service"].as_str() == Some(service) && entry["instance"].as_u64() == Some(u64::from(instance))
}

pub fn saved_subnets(state: &crate::persist::State) -> Vec<Ipv4Net> {
    state.grants.iter().filter_map(|g| g["machine_subnet"].as_str()?.parse().ok()).collect()
}

/// The tunnel key every member derives from the network key.
pub fn tunnel_key(network_key_hex: &str) -> String {
    let key = blake3::derive_key("canopy 2026 tunnel key v1", network_key_hex.as_bytes());
    key.iter().map(|b| format!("{b:02x}")).collect()
}

/// This machine's tunnel endpoints from its libp2p listen addresses: routable IPv4 first, then private ones; the
/// loopback address only when there is nothing else (agents on one host).
pub fn tunnel_endpoints(listen: &[libp2p::Multiaddr], port: u16) -> Vec<SocketAddr> {
    use libp2p::multiaddr::Protocol;
    let mut ips: Vec<Ipv4Addr> = listen
        .iter()
        .filter_map(|a| a.iter().find_map(|p| if let Protocol::Ip4(ip) = p { Some(ip) } else { None }))
        .filter(|ip| !ip.is_unspecified())
        .collect();
    ips.sort_by_key(|ip| (ip.is_loopback(), ip.is_private() || ip.is_link_local()));
    ips.dedup();
    if ips.iter().any(|ip| !ip.is_loopback()) {
        ips.retain(|ip| !ip.is_loopback());
    }
    if ips.is_empty() {
        ips.push(Ipv4Addr::LOCALHOST);
    }
    ips.into_iter().map(|ip| SocketAddr::from((ip, port))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnel_endpoints_prefer_routable_addresses_and_fall_back_to_loopback() {
        let addrs: Vec<libp2p::Multiaddr> = [
            "/ip4/127.0.0.1/udp/4001/quic-v1",
            "/ip4/10.0.0.5/tcp/4001",
            "/ip4/198.51.100.7/tcp/4001",
            "/ip4/10.0.0.5/udp/4001/quic-v1",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        assert_eq!(
            tunnel_endpoints(&addrs, 50103),
            vec!["198.51.100.7:50103".parse().unwrap(), "10.0.0.5:50103".parse().unwrap()]
        );
        let loopback: Vec<libp2p::Multiaddr> = vec!["/ip4/127.0.0.1/tcp/1".parse().unwrap()];
        assert_eq!(tunnel_endpoints(&loopback, 7), vec!["127.0.0.1:7".parse().unwrap()]);
    }

    #[test]
    fn every_member_derives_the_same_tunnel_key() {
        let key = tunnel_key("00ff");
        assert_eq!(key.len(), 64);
        assert_eq!(key, tunnel_key("00ff"));
        assert_ne!(key, tunnel_key("00fe"));
        let state = crate::persist::State {
            grants: vec![serde_json::json!({"machine_subnet": "10.16.0.64/26"}), serde_json::json!({"x": 1})],
            ..Default::default()
        };
        assert_eq!(saved_subnets(&state), vec!["10.16.0.64/26".parse::<Ipv4Net>().unwrap()]);
    }
}
