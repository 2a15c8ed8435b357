//! CLI commands of the data plane: `agent dataplane` (standalone daemon with a static route table), and the
//! clients `agent run`, `agent attach`, `agent detach`.

use super::routes::RouteTable;
use super::{AttachRequest, AttachTarget, Attachment, DataPlane, DataPlaneConfig};
use crate::api::{self, client::Client};
use crate::cli::GlobalArgs;
use crate::netns;
use anyhow::{Context, bail};
use canopy_overlay::routes::{AddressRequest, PolicyKind};
use ipnet::Ipv4Net;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use tokio::signal::unix::{SignalKind, signal};

/// Run the data plane alone (no control plane) with a route table from a file; serves the local API.
#[derive(Debug, clap::Args)]
pub struct DataplaneArgs {
    /// This machine's name in the route table.
    #[arg(long)]
    pub node: String,
    /// This machine's instance subnet, e.g. 10.16.0.0/26 (the bridge gets .1).
    #[arg(long)]
    pub subnet: Ipv4Net,
    /// Route table file (JSON if it ends in .json, TOML otherwise). Replace it later with PUT /v1/dataplane/routes.
    #[arg(long)]
    pub routes: Option<PathBuf>,
    /// Tunnel socket address.
    #[arg(long, default_value = "0.0.0.0:50103")]
    pub listen: SocketAddr,
    /// MTU of the underlay network; service interfaces get it minus the tunnel overhead.
    #[arg(long, default_value_t = 1500)]
    pub underlay_mtu: u16,
    /// Prefix of the kernel objects this agent creates (several agents on one kernel need distinct prefixes).
    #[arg(long, default_value = super::DEFAULT_PREFIX)]
    pub prefix: String,
    /// Range of ServiceIPs and InstanceIPs.
    #[arg(long, default_value = super::DEFAULT_SERVICE_RANGE)]
    pub service_range: Ipv4Net,
    /// Bound CPU wake-up latency while the data plane runs (0 = idle CPUs poll); needs /dev/cpu_dma_latency.
    #[arg(long, value_name = "MICROSECONDS")]
    pub cpu_latency_us: Option<u32>,
    /// Keep reading this long after packet work before sleeping (fewer wake-ups; costs CPU while it waits).
    #[arg(long, value_name = "MICROSECONDS", default_value_t = 0)]
    pub busy_poll_us: u32,
}

impl DataplaneArgs {
    pub fn config(&self) -> DataPlaneConfig {
        let mut config = DataPlaneConfig::new(self.node.clone(), self.subnet);
        config.listen = self.listen;
        config.underlay_mtu = self.underlay_mtu;
        config.prefix = self.prefix.clone();
        config.netns_prefix = format!("{}-", self.prefix);
        config.service_range = self.service_range;
        config.cpu_latency_us = self.cpu_latency_us;
        config.busy_poll = std::time::Duration::from_micros(self.busy_poll_us.into());
        config
    }
}

/// Run a command in a new network namespace attached as an instance of a service.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Service name: app.appns.service.servicens
    #[arg(long)]
    pub service: String,
    #[arg(long, default_value_t = 0)]
    pub instance: u32,
    #[command(flatten)]
    pub addresses: FixedAddressArgs,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// Attach an existing network namespace (a container's PID or a named namespace) as an instance.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("namespace").required(true).args(["pid", "netns"])))]
pub struct AttachArgs {
    #[arg(long)]
    pub service: String,
    #[arg(long, default_value_t = 0)]
    pub instance: u32,
    /// PID of a process in the namespace (e.g. a container's).
    #[arg(long)]
    pub pid: Option<u32>,
    /// Name of a namespace under /run/netns.
    #[arg(long)]
    pub netns: Option<String>,
    #[command(flatten)]
    pub addresses: FixedAddressArgs,
}

/// Addresses a deployment may fix instead of letting the root pick them (seed 002 section 3.6.3). All must be
/// free: an address another service holds fails the deployment with a message naming it.
#[derive(Debug, Default, clap::Args)]
pub struct FixedAddressArgs {
    /// A fixed ServiceIP for one routing policy (rr, closest, hc, closest-hc, latency), e.g. rr=10.30.25.3
    /// (repeatable).
    #[arg(long = "service-ip", value_name = "POLICY=IP", value_parser = parse_service_ip)]
    pub service_ips: Vec<(PolicyKind, Ipv4Addr)>,
    /// InstanceIPs by rule: instances FROM up to (not including) TO get consecutive addresses from BASE, e.g.
    /// 0..10=10.30.25.5.
    #[arg(long = "instance-ips", value_name = "FROM..TO=BASE", value_parser = parse_instance_ips)]
    pub instance_ips: Option<(u32, u32, Ipv4Addr)>,
}

impl FixedAddressArgs {
    fn request(&self) -> anyhow::Result<Option<AddressRequest>> {
        if self.service_ips.is_empty() && self.instance_ips.is_none() {
            return Ok(None);
        }
        let mut service_ips = std::collections::BTreeMap::new();
        for &(policy, ip) in &self.service_ips {
            if service_ips.insert(policy, ip).is_some() {
                bail!("--service-ip gives policy {policy} twice");
            }
        }
        Ok(Some(AddressRequest { service_ips, instances: self.instance_ips }))
    }
}

fn parse_service_ip(text: &str) -> Result<(PolicyKind, Ipv4Addr), String> {
    let (policy, ip) = text.split_once('=').ok_or_else(|| format!("{text:?} is not POLICY=IP (e.g. rr=10.30.25.3)"))?;
    let policy: PolicyKind = policy
        .trim()
        .parse()
        .map_err(|_| format!("unknown policy {policy:?} (one of rr, closest, hc, closest-hc, latency)"))?;
    let ip = ip.trim().parse().map_err(|_| format!("{ip:?} is not an IPv4 address"))?;
    Ok((policy, ip))
}

fn parse_instance_ips(text: &str) -> Result<(u32, u32, Ipv4Addr), String> {
    let usage = || format!("{text:?} is not FROM..TO=BASE (e.g. 0..10=10.30.25.5)");
    let (range, base) = text.split_once('=').ok_or_else(usage)?;
    let (from, to) = range.split_once("..").ok_or_else(usage)?;
    let (from, to): (u32, u32) = (from.trim().parse().map_err(|_| usage())?, to.trim().parse().map_err(|_| usage())?);
    if to <= from {
        return Err(format!("instance range {from}..{to} is empty (TO is not included)"));
    }
    let base = base.trim().parse().map_err(|_| format!("{base:?} is not an IPv4 address"))?;
    Ok((from, to, base))
}

/// Detach an instance: remove its interface (and the namespace, if the agent created it).
#[derive(Debug, clap::Args)]
pub struct DetachArgs {
    #[arg(long)]
    pub service: String,
    #[arg(long, default_value_t = 0)]
    pub instance: u32,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new().context("starting the async runtime")
}

fn instance_path(service: &str, instance: u32) -> String {
    format!("/v1/instances/{service}/{instance}")
}

pub fn dataplane(global: &GlobalArgs, args: &DataplaneArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        std::fs::create_dir_all(&global.data_dir)
            .with_context(|| format!("creating data dir {}", global.data_dir.display()))?;
        let table = match &args.routes {
            Some(path) => Some(RouteTable::load(path)?),
            None => None,
        };
        let listener = api::server::bind(&api::socket_path(&global.data_dir)).await?;
        let dataplane = DataPlane::start(args.config()).await?;
        if let Some(table) = table
            && let Err(err) = dataplane.set_routes(table).await
        {
            let _ = dataplane.shutdown().await;
            return Err(err.context("installing the route table"));
        }
        // No control plane here to act on notices (table queries etc.): they are logged.
        if let Some(mut notices) = dataplane.take_notices() {
            tokio::spawn(async move {
                while let Some(notice) = notices.recv().await {
                    tracing::info!(?notice, "data-plane notice");
                }
            });
        }
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        tokio::spawn(async move {
            tokio::select! {
                _ = interrupt.recv() => {},
                _ = terminate.recv() => {},
            }
            let _ = stop.send(());
        });
        let mut router = dataplane.router();
        let resolver = match crate::dns::serve_for(&dataplane).await {
            Ok((running, dns_router)) => {
                router = router.merge(dns_router);
                Some(running)
            }
            Err(err) => {
                tracing::warn!("no DNS resolver for the instances: {err:#}");
                None
            }
        };
        tracing::info!("data plane ready; API on {}", api::socket_path(&global.data_dir).display());
        let served = api::server::serve(listener, router, async {
            let _ = stopped.await;
        })
        .await;
        if let Some(resolver) = resolver {
            resolver.shutdown().await;
        }
        let stopped = dataplane.shutdown().await;
        served.and(stopped)
    })
}

pub fn run(global: &GlobalArgs, args: &RunArgs) -> anyhow::Result<()> {
    let code = runtime()?.block_on(async {
        let client = Client::new(&global.data_dir);
        let request = AttachRequest {
            service: args.service.clone(),
            instance: args.instance,
            target: AttachTarget::Create { owner_pid: std::process::id() },
            addresses: args.addresses.request()?,
            namespace_ip: None,
        };
        let attachment: Attachment = client.post("/v1/instances", &request).await?;
        tracing::info!(
            "running as {} instance {} with namespace IP {} and InstanceIP {}",
            attachment.service,
            attachment.instance,
            attachment.namespace_ip,
            attachment.instance_ip
        );
        let outcome = run_inside(&attachment, &args.command).await;
        let detached = client.delete::<Attachment>(&instance_path(&args.service, args.instance)).await;
        let code = outcome?;
        detached.context("detaching the instance")?;
        anyhow::Ok(code)
    })?;
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}

/// Runs `command` inside the attachment's namespace in the foreground, forwarding signals; returns its exit code
/// (128 + signal number when killed by a signal, like a shell).
async fn run_inside(attachment: &Attachment, command: &[String]) -> anyhow::Result<i32> {
    use std::os::unix::process::ExitStatusExt;
    let Some((program, arguments)) = command.split_first() else { bail!("no command given") };
    let netns_file = std::fs::File::open(&attachment.netns_path)
        .with_context(|| format!("opening network namespace {}", attachment.netns_path.display()))?;
    let resolv_conf = attachment.resolv_conf.clone().filter(|p| p.exists());
    let mut child = tokio::process::Command::new(program);
    child.args(arguments);
    // SAFETY: the closure only makes system calls (setns, unshare, mount) on data prepared before the fork.
    unsafe {
        child.pre_exec(move || netns::enter_for_exec(&netns_file, resolv_conf.as_deref()));
    }
    let mut child = child.spawn().with_context(|| format!("starting {program}"))?;
    let pid = child.id().map(|id| Pid::from_raw(id as i32));
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let status = loop {
        let forward = tokio::select! {
            status = child.wait() => break status?,
            _ = interrupt.recv() => Signal::SIGINT,
            _ = terminate.recv() => Signal::SIGTERM,
            _ = hangup.recv() => Signal::SIGHUP,
        };
        if let Some(pid) = pid {
            let _ = kill(pid, forward);
        }
    };
    Ok(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

pub fn attach(global: &GlobalArgs, args: &AttachArgs) -> anyhow::Result<()> {
    let target = match (args.pid, &args.netns) {
        (Some(pid), None) => AttachTarget::Pid(pid),
        (None, Some(name)) => AttachTarget::Netns(name.clone()),
        _ => bail!("give exactly one of --pid and --netns"),
    };
    runtime()?.block_on(async {
        let request = AttachRequest {
            service: args.service.clone(),
            instance: args.instance,
            target,
            addresses: args.addresses.request()?,
            namespace_ip: None,
        };
        let attachment: Attachment = Client::new(&global.data_dir).post("/v1/instances", &request).await?;
        println!("{}", serde_json::to_string_pretty(&attachment)?);
        Ok(())
    })
}

pub fn detach(global: &GlobalArgs, args: &DetachArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let attachment: Attachment =
            Client::new(&global.data_dir).delete(&instance_path(&args.service, args.instance)).await?;
        println!("detached {} instance {} ({})", attachment.service, attachment.instance, attachment.namespace_ip);
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_address_flags_parse_or_say_what_is_wrong() {
        assert_eq!(parse_service_ip("rr=10.30.25.3"), Ok((PolicyKind::Rr, "10.30.25.3".parse().unwrap())));
        assert_eq!(parse_service_ip("closest-hc = 10.30.1.1").unwrap().0, PolicyKind::ClosestHc);
        assert!(parse_service_ip("fastest=10.30.1.1").unwrap_err().contains("unknown policy"));
        assert!(parse_service_ip("rr").unwrap_err().contains("POLICY=IP"));
        assert!(parse_service_ip("rr=10.30.300.1").unwrap_err().contains("not an IPv4 address"));

        assert_eq!(parse_instance_ips("0..10=10.30.25.5"), Ok((0, 10, "10.30.25.5".parse().unwrap())));
        assert!(parse_instance_ips("5..5=10.30.25.5").unwrap_err().contains("empty"));
        assert!(parse_instance_ips("0-10=10.30.25.5").unwrap_err().contains("FROM..TO=BASE"));
        assert!(parse_instance_ips("0..10=nowhere").unwrap_err().contains("not an IPv4 address"));

        let none = FixedAddressArgs::default();
        assert_eq!(none.request().unwrap(), None, "no flags: the root picks every address");
        let twice = FixedAddressArgs {
            service_ips: vec![parse_service_ip("rr=10.30.0.1").unwrap(), parse_service_ip("rr=10.30.0.2").unwrap()],
            instance_ips: None,
        };
        assert!(twice.request().unwrap_err().to_string().contains("twice"));
        let both = FixedAddressArgs {
            service_ips: vec![parse_service_ip("hc=10.30.0.1").unwrap()],
            instance_ips: Some(parse_instance_ips("0..4=10.30.25.5").unwrap()),
        };
        let request = both.request().unwrap().unwrap();
        assert_eq!(request.service_ips[&PolicyKind::Hc], "10.30.0.1".parse::<Ipv4Addr>().unwrap());
        assert_eq!(request.instances, Some((0, 4, "10.30.25.5".parse().unwrap())));
    }
}
