//! CLI commands of the data plane: `agent dataplane` (standalone daemon with a static route table), and the
//! clients `agent run`, `agent attach`, `agent detach`.

use super::routes::RouteTable;
use super::{AttachRequest, AttachTarget, Attachment, DataPlane, DataPlaneConfig};
use crate::api::{self, client::Client};
use crate::cli::GlobalArgs;
use crate::netns;
use anyhow::{Context, bail};
use ipnet::Ipv4Net;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::net::SocketAddr;
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
}

impl DataplaneArgs {
    pub fn config(&self) -> DataPlaneConfig {
        let mut config = DataPlaneConfig::new(self.node.clone(), self.subnet);
        config.listen = self.listen;
        config.underlay_mtu = self.underlay_mtu;
        config.prefix = self.prefix.clone();
        config.netns_prefix = format!("{}-", self.prefix);
        config.service_range = self.service_range;
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
        let request = AttachRequest { service: args.service.clone(), instance: args.instance, target };
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
