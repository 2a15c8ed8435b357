//! Real `agent` processes on 127.0.0.1 forming one overlay: join, root crash and failover, restart as a leaf,
//! graceful leave, admission with a wrong network key, and bad input. No root privileges needed.
//!
//! Every agent has its own temporary data dir; all child processes are killed (and their dirs removed) on drop,
//! also when an assertion fails.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const AGENT: &str = env!("CARGO_BIN_EXE_agent");

/// The binary under test: `CANOPY_AGENT_BIN` (e.g. a release build, for the footprint measurement) or this build's.
fn agent_bin() -> String {
    std::env::var("CANOPY_AGENT_BIN").unwrap_or_else(|_| AGENT.to_string())
}
const LISTEN: [&str; 4] = ["--listen", "/ip4/127.0.0.1/tcp/0", "--listen", "/ip4/127.0.0.1/udp/0/quic-v1"];

fn unique_dir(tag: &str) -> PathBuf {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    let dir = std::env::temp_dir().join(format!(
        "canopy-cluster-{tag}-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// One agent process and its data dir.
struct Agent {
    name: String,
    data_dir: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl Agent {
    fn new(name: &str, base: &Path) -> Self {
        Self { name: name.to_string(), data_dir: base.join(name), child: None, starts: 0 }
    }

    fn spawn(&mut self, args: &[&str]) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        std::fs::create_dir_all(&self.data_dir).unwrap();
        self.starts += 1;
        let log = |kind: &str| std::fs::File::create(self.log_path(kind)).unwrap();
        let child = Command::new(agent_bin())
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(args)
            // Several agents share this host's network namespace: only one could own the data plane's devices.
            .args(["--no-mdns", "--no-dataplane"])
            .args(LISTEN)
            .env("RUST_LOG", "info,libp2p=warn")
            .stdin(Stdio::null())
            .stdout(log("out"))
            .stderr(log("err"))
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn log_path(&self, kind: &str) -> PathBuf {
        self.data_dir.with_extension(format!("{}.{kind}", self.starts))
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // SIGKILL: a crash, not a clean stop.
            let _ = child.wait();
        }
    }

    /// `agent status --json`, or `None` while the agent is not answering yet.
    fn status(&self) -> Option<Value> {
        let out = cli(&self.data_dir, &["status", "--json"]);
        out.status.success().then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    fn logs(&self) -> String {
        (1..=self.starts)
            .map(|n| {
                let path = self.data_dir.with_extension(format!("{n}.err"));
                format!("--- {} run {n} ---\n{}", self.name, std::fs::read_to_string(path).unwrap_or_default())
            })
            .collect()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

fn cli(data_dir: &Path, args: &[&str]) -> Output {
    Command::new(AGENT).arg("--data-dir").arg(data_dir).args(args).output().unwrap()
}

/// Agents plus their shared temporary directory, removed on drop.
struct Cluster {
    base: PathBuf,
    agents: Vec<Agent>,
}

impl Cluster {
    fn new(tag: &str) -> Self {
        Self { base: unique_dir(tag), agents: Vec::new() }
    }

    fn add(&mut self, name: &str) -> usize {
        self.agents.push(Agent::new(name, &self.base));
        self.agents.len() - 1
    }

    fn statuses(&self) -> Vec<Option<Value>> {
        self.agents.iter().filter(|a| a.child.is_some()).map(Agent::status).collect()
    }

    fn logs(&self) -> String {
        self.agents.iter().map(Agent::logs).collect()
    }

    /// Polls until `check` holds for the statuses of all running agents; panics with their logs otherwise.
    fn wait_for(&self, what: &str, timeout: Duration, check: impl Fn(&[Value]) -> bool) -> Duration {
        let start = Instant::now();
        let mut last = Vec::new();
        while start.elapsed() < timeout {
            let statuses = self.statuses();
            if statuses.iter().all(Option::is_some) {
                last = statuses.into_iter().flatten().collect::<Vec<_>>();
                if check(&last) {
                    return start.elapsed();
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let summary: Vec<String> = last.iter().map(short).collect();
        panic!(
            "timed out after {timeout:?} waiting for {what}; last statuses:\n{}\n{}",
            summary.join("\n"),
            self.logs()
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for agent in &mut self.agents {
            agent.kill();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.base);
        } else {
            eprintln!("agent logs kept in {}", self.base.display());
        }
    }
}

fn short(s: &Value) -> String {
    format!(
        "{} role={} term={} parent={} children={} subtree={} phase={}",
        s["peer_id"],
        s["role"],
        s["term"],
        s["parent"],
        s["children"].as_array().map_or(0, Vec::len),
        s["subtree_size"],
        s["phase"]
    )
}

fn roots(statuses: &[Value]) -> usize {
    statuses.iter().filter(|s| s["role"] == "root").count()
}

/// One tree: exactly one root whose subtree holds everyone, and every other node attached under a parent.
fn one_tree(statuses: &[Value], size: u64) -> bool {
    roots(statuses) == 1
        && statuses.iter().all(|s| s["phase"] == "member")
        && statuses.iter().filter(|s| s["role"] != "root").all(|s| !s["parent"].is_null())
        && statuses.iter().any(|s| s["role"] == "root" && s["subtree_size"].as_u64() == Some(size))
}

fn dial_addr(status: &Value) -> String {
    let addr =
        status["addresses"].as_array().unwrap().iter().find(|a| a.as_str().unwrap().contains("/quic-v1")).unwrap();
    format!("{}/p2p/{}", addr.as_str().unwrap(), status["peer_id"].as_str().unwrap())
}

/// The time the overlay needs to notice a dead root and settle on its successor, with room for process
/// scheduling on a loaded 2-core CI machine.
fn failover_bound() -> Duration {
    let config = canopy_overlay::Config::default();
    config.detection_timeout() + config.join_timeout * 2 + config.attach_timeout * 2 + Duration::from_secs(3)
}

#[test]
fn five_agents_form_one_tree_survive_root_crash_and_restart_as_leaf() {
    let mut cluster = Cluster::new("tree");
    let root = cluster.add("a");
    cluster.agents[root].spawn(&["start"]);
    cluster.wait_for("the first agent to become root", Duration::from_secs(20), |s| roots(s) == 1);
    let root_status = cluster.agents[root].status().unwrap();
    let root_peer = root_status["peer_id"].as_str().unwrap().to_string();
    let key_file = cluster.agents[root].data_dir.join("network.key");
    let key = key_file.to_str().unwrap().to_string();
    // Joins through a multiaddr and, for one node, through host:port (the root's TCP port).
    let tcp_port = root_status["addresses"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|a| a.as_str().unwrap().strip_prefix("/ip4/127.0.0.1/tcp/").map(str::to_string))
        .unwrap();
    let via_multiaddr = dial_addr(&root_status);
    let via_host_port = format!("127.0.0.1:{tcp_port}");
    for (i, name) in ["b", "c", "d", "e"].into_iter().enumerate() {
        let via = if i == 0 { via_host_port.as_str() } else { via_multiaddr.as_str() };
        let idx = cluster.add(name);
        cluster.agents[idx].spawn(&["join", via, "--network-key-file", &key]);
    }
    cluster.wait_for("five agents in one tree", Duration::from_secs(30), |s| s.len() == 5 && one_tree(s, 5));

    // `agent tree` on the root draws everyone; `agent peers` lists its children.
    let tree = cli(&cluster.agents[root].data_dir, &["tree"]);
    let tree = String::from_utf8(tree.stdout).unwrap();
    assert_eq!(tree.lines().count(), 5, "{tree}");
    assert!(tree.lines().next().unwrap().starts_with(&root_peer), "{tree}");
    let peers = String::from_utf8(cli(&cluster.agents[root].data_dir, &["peers"]).stdout).unwrap();
    assert!(peers.lines().filter(|l| l.contains(" child ")).count() == 4, "{peers}");

    // Crash the root: the others settle on exactly one new root within the failover bound.
    cluster.agents[root].kill();
    let bound = failover_bound();
    let took = cluster.wait_for("one root after the root crashed", bound, |s| s.len() == 4 && one_tree(s, 4));
    eprintln!("root failover settled in {took:?} (bound {bound:?})");
    let successor = cluster.statuses().into_iter().flatten().find(|s| s["role"] == "root").unwrap();
    assert_ne!(successor["peer_id"], root_peer.as_str());
    assert!(successor["term"].as_u64().unwrap() > root_status["term"].as_u64().unwrap());

    // Restart the crashed agent with its old data dir and the same command: same peer id, back as a leaf.
    cluster.agents[root].spawn(&["start"]);
    cluster.wait_for("the old root back as a leaf", Duration::from_secs(30), |s| s.len() == 5 && one_tree(s, 5));
    let back = cluster.agents[root].status().unwrap();
    assert_eq!(back["peer_id"], root_peer.as_str(), "the restarted agent kept its identity");
    assert_eq!(back["role"], "leaf", "{}", short(&back));
    let statuses: Vec<Value> = cluster.statuses().into_iter().flatten().collect();
    assert_eq!(roots(&statuses), 1, "{statuses:?}");

    // A graceful leave: the agent exits 0 and the tree shrinks.
    let leaver = cluster.agents.iter().position(|a| a.status().is_some_and(|s| s["role"] == "leaf")).unwrap();
    let out = cli(&cluster.agents[leaver].data_dir, &["leave"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut child = cluster.agents[leaver].child.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Some(code) = child.try_wait().unwrap() {
            break code;
        }
        assert!(Instant::now() < deadline, "the agent did not stop after `agent leave`");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(code.success(), "agent leave: exit {code}");
    cluster.wait_for("the tree without the leaver", Duration::from_secs(15), |s| s.len() == 4 && one_tree(s, 4));
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).unwrap();
    body
}

#[test]
fn wrong_network_key_is_refused() {
    let mut cluster = Cluster::new("key");
    let root = cluster.add("a");
    let metrics = format!("127.0.0.1:{}", free_tcp_port());
    cluster.agents[root].spawn(&["start", "--metrics", &metrics]);
    cluster.wait_for("the root", Duration::from_secs(20), |s| roots(s) == 1);
    let via = dial_addr(&cluster.agents[root].status().unwrap());

    let wrong = cluster.base.join("wrong.key");
    std::fs::write(&wrong, format!("{}\n", "ab".repeat(32))).unwrap();
    let started = Instant::now();
    let out = Command::new(AGENT)
        .arg("--data-dir")
        .arg(cluster.base.join("intruder"))
        .args(["join", &via, "--network-key-file", wrong.to_str().unwrap(), "--no-mdns", "--no-dataplane"])
        .args(LISTEN)
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a joiner with the wrong key must fail: {stderr}");
    assert!(stderr.contains("refused our network key (wrong --network-key-file?)"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(15), "refusal took {:?}", started.elapsed());
    // The member kept its tree to itself.
    let status = cluster.agents[root].status().unwrap();
    assert_eq!(status["children"].as_array().unwrap().len(), 0, "{}", short(&status));
    assert_eq!(status["counters"]["admitted_peers"], 0);
    // ...and counted the refusal.
    let text = http_get(&metrics, "/metrics");
    assert!(text.contains("canopy_admissions_total{result=\"refused\"} 1"), "{text}");
    assert!(text.contains("canopy_overlay_role 3"), "{text}");
}

#[test]
fn bad_input_gives_one_clear_error_line() {
    let mut cluster = Cluster::new("bad");
    let run = |args: &[&str]| {
        let started = Instant::now();
        let out =
            Command::new(AGENT).args(args).args(["--no-mdns"]).args(LISTEN).env("RUST_LOG", "off").output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(!stderr.contains("panicked"), "{stderr}");
        (stderr, started.elapsed())
    };
    let dir = cluster.base.join("x");
    let dir = dir.to_str().unwrap();

    let (err, _) = run(&["--data-dir", dir, "join", "/ip4/1.2.3/tcp/1"]);
    assert!(err.contains("malformed bootstrap multiaddr"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    let (err, _) = run(&["--data-dir", dir, "start", "--position", "100,0"]);
    assert!(err.contains("out of range"), "{err}");

    let (err, _) = run(&["--data-dir", "/proc/canopy-no-such-dir", "start"]);
    assert!(err.contains("cannot create the data dir"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    let key = cluster.base.join("k.key");
    std::fs::write(&key, "cd".repeat(32)).unwrap();
    let (err, took) = run(&[
        "--data-dir",
        dir,
        "join",
        "/ip4/127.0.0.1/tcp/1",
        "--network-key-file",
        key.to_str().unwrap(),
        "--bootstrap-attempts",
        "2",
    ]);
    assert!(err.contains("could not reach the bootstrap peer /ip4/127.0.0.1/tcp/1 after 2 attempts"), "{err}");
    assert!(took < Duration::from_secs(30), "gave up after {took:?}");

    // A tunnel port in use: said at the start, not when the tree grants a subnet.
    let taken = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let (err, _) = run(&["--data-dir", dir, "start", "--tunnel-port", &port]);
    assert!(err.contains(&format!("cannot bind the tunnel's UDP port {port}")), "{err}");
    assert!(err.contains("--tunnel-port"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    drop(taken);

    // A second agent on a data dir in use.
    let first = cluster.add("a");
    cluster.agents[first].spawn(&["start"]);
    cluster.wait_for("the root", Duration::from_secs(20), |s| roots(s) == 1);
    let (err, _) = run(&["--data-dir", cluster.agents[first].data_dir.to_str().unwrap(), "start"]);
    assert!(err.contains("another agent is already running with this data dir"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    // A client command without an agent.
    let out = cli(&cluster.base.join("nobody"), &["status"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no agent is running"));
}

fn status_kb(status: &str, field: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Resident memory (kB) and CPU time (seconds) of a process, from /proc.
fn rss_and_cpu(pid: u32) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kb = status_kb(&status, "VmRSS:");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start at field 3; utime and stime are 14 and 15.
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (rss_kb, ticks as f64 / hz)
}

/// Idle footprint of the root and a leaf in a 5-node overlay. Run on a release build:
/// `cargo build --release -p canopy-agent && CANOPY_AGENT_BIN=target/release/agent \
///  cargo test -p canopy-agent --test cluster_loopback -- --ignored idle_footprint --nocapture`
#[test]
#[ignore = "a measurement (about 90 s); run it on a release build"]
fn idle_footprint() {
    let settle = Duration::from_secs(20);
    let window = Duration::from_secs(60);
    let mut cluster = Cluster::new("footprint");
    let root = cluster.add("a");
    cluster.agents[root].spawn(&["start"]);
    cluster.wait_for("the root", Duration::from_secs(20), |s| roots(s) == 1);
    let via = dial_addr(&cluster.agents[root].status().unwrap());
    let key = cluster.agents[root].data_dir.join("network.key");
    for name in ["b", "c", "d", "e"] {
        let idx = cluster.add(name);
        cluster.agents[idx].spawn(&["join", &via, "--network-key-file", key.to_str().unwrap()]);
    }
    cluster.wait_for("five agents in one tree", Duration::from_secs(30), |s| s.len() == 5 && one_tree(s, 5));
    std::thread::sleep(settle);
    let leaf = 1;
    let pids = [cluster.agents[root].child.as_ref().unwrap().id(), cluster.agents[leaf].child.as_ref().unwrap().id()];
    let before: Vec<(u64, f64)> = pids.iter().map(|p| rss_and_cpu(*p)).collect();
    std::thread::sleep(window);
    let after: Vec<(u64, f64)> = pids.iter().map(|p| rss_and_cpu(*p)).collect();
    let mut report = Vec::new();
    for (i, name) in ["root", "leaf"].iter().enumerate() {
        let cpu_percent = (after[i].1 - before[i].1) / window.as_secs_f64() * 100.0;
        let rss_mb = after[i].0 as f64 / 1024.0;
        // RSS splits into private memory (heap, stacks) and pages of the mapped binary (clean, shared, reclaimable).
        let status = std::fs::read_to_string(format!("/proc/{}/status", pids[i])).unwrap();
        let anon_mb = status_kb(&status, "RssAnon:") as f64 / 1024.0;
        let file_mb = status_kb(&status, "RssFile:") as f64 / 1024.0;
        eprintln!(
            "{name}: RSS {rss_mb:.1} MB (anonymous {anon_mb:.1} MB, binary/file pages {file_mb:.1} MB), \
             CPU {cpu_percent:.3}% over {window:?} idle ({})",
            agent_bin()
        );
        report.push((rss_mb, cpu_percent));
    }
    // Still one tree after the idle minute.
    cluster.wait_for("the same tree", Duration::from_secs(5), |s| s.len() == 5 && one_tree(s, 5));
    for (rss_mb, cpu_percent) in report {
        assert!(rss_mb <= 15.0, "RSS {rss_mb:.1} MB exceeds 15 MB");
        assert!(cpu_percent <= 0.5, "idle CPU {cpu_percent:.3}% exceeds 0.5%");
    }
}
