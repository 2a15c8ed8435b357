//! End-to-end data plane test (root only): two "machines" (network namespaces joined by a veth underlay), each
//! running `agent dataplane` with the same static route table, services started with `agent run`.
//!
//! Shows: HTTP and a 1 MB transfer through a ServiceIP across machines; UDP echo whose reply comes from the
//! ServiceIP; ICMP echo to a ServiceIP; round-robin alternation between instances on two machines; a stopped
//! instance answered with route-not-found and later connections going to the remaining instance; and that
//! stopping the agents removes everything they installed. A second scenario gives each machine only part of the
//! table (as routes from the tree do): the server's machine does not list the client's, and replies still arrive.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod netns_common;
use netns_common::{ip, refs, run_with_timeout, skip_reason, terminate, wait_for};

const AGENT: &str = env!("CARGO_BIN_EXE_agent");
const CLIENT: &str = "demo.default.client.default";
const WEB: &str = "demo.default.web.default";
const FILES: &str = "demo.default.files.default";
const ECHO: &str = "demo.default.echo.default";
const WEB_SERVICE_IP: &str = "10.30.0.2";
const FILES_SERVICE_IP: &str = "10.30.0.4";
const ECHO_SERVICE_IP: &str = "10.30.0.5";
const BIG_FILE_LEN: usize = 1 << 20;

struct Machine {
    netns: String,
    prefix: String,
    data_dir: PathBuf,
    underlay_ip: &'static str,
}

/// Owns every namespace and process of the test; tears all down even when the test fails.
struct Testbed {
    dir: PathBuf,
    machines: Vec<Machine>,
    agents: Vec<Child>,
    services: Vec<(String, Child)>,
    /// Encrypt the tunnels (a `tunnel_key` in the route table).
    sealed: bool,
    /// Flags added to every `agent dataplane`.
    agent_flags: Vec<&'static str>,
}

impl Testbed {
    /// `tag` keeps the names of tests running in parallel apart.
    fn new(tag: char, sealed: bool) -> Self {
        let id = std::process::id() % 100_000;
        let dir = std::env::temp_dir().join(format!("canopy-dp-test-{id}{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let machines = [("a", "172.31.250.1"), ("b", "172.31.250.2")]
            .into_iter()
            .map(|(name, underlay_ip)| Machine {
                netns: format!("cdt{id}{tag}{name}"),
                prefix: format!("t{tag}{name}{}", id % 1000),
                data_dir: dir.join(name),
                underlay_ip,
            })
            .collect();
        Testbed { dir, machines, agents: Vec::new(), services: Vec::new(), sealed, agent_flags: Vec::new() }
    }

    fn service_netns(&self, machine: usize, service: &str, instance: u32) -> String {
        format!("{}-{service}-{instance}", self.machines[machine].prefix)
    }

    fn build_underlay(&self) {
        let (a, b) = (&self.machines[0], &self.machines[1]);
        ip(&["netns", "add", &a.netns]);
        ip(&["netns", "add", &b.netns]);
        let (veth_a, veth_b) = (format!("{}u", a.netns), format!("{}u", b.netns));
        ip(&["link", "add", &veth_a, "netns", &a.netns, "type", "veth", "peer", "name", &veth_b, "netns", &b.netns]);
        for (machine, veth) in [(a, &veth_a), (b, &veth_b)] {
            ip(&["-n", &machine.netns, "addr", "add", &format!("{}/24", machine.underlay_ip), "dev", veth]);
            ip(&["-n", &machine.netns, "link", "set", veth, "up"]);
            ip(&["-n", &machine.netns, "link", "set", "lo", "up"]);
        }
    }

    fn write_routes(&self) -> PathBuf {
        let mut table = serde_json::json!({
            "nodes": [
                {"name": "a", "subnet": "10.16.0.0/26", "endpoint": "172.31.250.1:50103"},
                {"name": "b", "subnet": "10.16.0.64/26", "endpoint": "172.31.250.2:50103"},
            ],
            "services": [
                {"name": CLIENT, "service_ip": "10.30.0.1", "instances": [
                    {"number": 0, "instance_ip": "10.30.1.1", "namespace_ip": "10.16.0.2", "node": "a"}]},
                {"name": WEB, "service_ip": WEB_SERVICE_IP, "policy": "rr", "instances": [
                    {"number": 0, "instance_ip": "10.30.2.1", "namespace_ip": "10.16.0.3", "node": "a"},
                    {"number": 1, "instance_ip": "10.30.2.2", "namespace_ip": "10.16.0.66", "node": "b"}]},
                {"name": FILES, "service_ip": FILES_SERVICE_IP, "instances": [
                    {"number": 0, "instance_ip": "10.30.4.1", "namespace_ip": "10.16.0.67", "node": "b"}]},
                {"name": ECHO, "service_ip": ECHO_SERVICE_IP, "instances": [
                    {"number": 0, "instance_ip": "10.30.5.1", "namespace_ip": "10.16.0.68", "node": "b"}]},
            ],
        });
        if self.sealed {
            table["tunnel_key"] = serde_json::Value::String("5a".repeat(32));
        }
        let path = self.dir.join("routes.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&table).unwrap()).unwrap();
        path
    }

    /// Machine a lists b and the services it calls; machine b lists only itself and its own instances (nobody
    /// told it about a or the client), as with routes from the tree.
    fn write_partial_routes(&self) -> [PathBuf; 2] {
        let b_node = serde_json::json!({"name": "b", "subnet": "10.16.0.64/26", "endpoint": "172.31.250.2:50103"});
        let files = serde_json::json!({"name": FILES, "service_ip": FILES_SERVICE_IP, "instances": [
            {"number": 0, "instance_ip": "10.30.4.1", "namespace_ip": "10.16.0.67", "node": "b"}]});
        let echo = serde_json::json!({"name": ECHO, "service_ip": ECHO_SERVICE_IP, "instances": [
            {"number": 0, "instance_ip": "10.30.5.1", "namespace_ip": "10.16.0.68", "node": "b"}]});
        let client = serde_json::json!({"name": CLIENT, "service_ip": "10.30.0.1", "instances": [
            {"number": 0, "instance_ip": "10.30.1.1", "namespace_ip": "10.16.0.2", "node": "a"}]});
        let key = "5a".repeat(32);
        let a = serde_json::json!({
            "tunnel_key": key,
            "nodes": [{"name": "a", "subnet": "10.16.0.0/26", "endpoint": "172.31.250.1:50103"}, b_node],
            "services": [client, files, echo],
        });
        let b = serde_json::json!({"tunnel_key": key, "nodes": [b_node], "services": [files, echo]});
        [("routes-a.json", a), ("routes-b.json", b)].map(|(name, table)| {
            let path = self.dir.join(name);
            std::fs::write(&path, serde_json::to_vec_pretty(&table).unwrap()).unwrap();
            path
        })
    }

    /// Starts `agent dataplane` on each machine with its route table.
    fn start_agents(&mut self, routes: &[PathBuf; 2]) {
        for (index, machine) in self.machines.iter().enumerate() {
            let netns = std::fs::File::open(format!("/run/netns/{}", machine.netns)).unwrap();
            let log = std::fs::File::create(self.dir.join(format!("agent-{index}.log"))).unwrap();
            let mut command = Command::new(AGENT);
            command
                .arg("--data-dir")
                .arg(&machine.data_dir)
                .args(["dataplane", "--node", if index == 0 { "a" } else { "b" }])
                .args(["--subnet", if index == 0 { "10.16.0.0/26" } else { "10.16.0.64/26" }])
                .arg("--routes")
                .arg(&routes[index])
                .args(["--listen", &format!("{}:50103", machine.underlay_ip), "--prefix", &machine.prefix])
                .args(&self.agent_flags)
                .stdout(log.try_clone().unwrap())
                .stderr(log);
            // Only the network namespace changes: the agent must share our mount namespace so the service
            // namespaces it creates under /run/netns are visible to us.
            unsafe {
                command.pre_exec(move || {
                    nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
                });
            }
            self.agents.push(command.spawn().expect("starting agent dataplane"));
        }
        for machine in &self.machines {
            wait_for(Duration::from_secs(20), "the agent's API socket", || {
                machine.data_dir.join("agent.sock").exists()
            });
        }
    }

    fn run_service(&mut self, machine: usize, service: &str, instance: u32, command: &[&str]) {
        let started =
            netns_common::run_service(&self.machines[machine].data_dir, &self.dir, service, instance, command);
        self.services.push(started);
    }

    fn stop_service(&mut self, service: &str, instance: u32) {
        netns_common::stop_service(&mut self.services, service, instance);
    }

    /// UDP echo through the echo ServiceIP; the reply comes from the ServiceIP the client called.
    fn assert_udp_echo_from_service_ip(&self) {
        let udp = self.client_python(
            &format!(
                "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.settimeout(3)\n\
             for attempt in range(5):\n    s.sendto(b'canopy', ('{ECHO_SERVICE_IP}', 7))\n    try:\n        \
             data, peer = s.recvfrom(100)\n        break\n    except socket.timeout:\n        pass\n\
             print(data.decode(), peer[0], peer[1])"
            ),
            Duration::from_secs(20),
        );
        assert!(udp.status.success(), "UDP echo failed: {}", String::from_utf8_lossy(&udp.stderr));
        assert_eq!(String::from_utf8_lossy(&udp.stdout).trim(), format!("canopy {ECHO_SERVICE_IP} 7"));
    }

    /// ICMP echo to the files ServiceIP (on the other machine), answered from the ServiceIP.
    fn assert_ping_from_service_ip(&self) {
        let ping = run_with_timeout(
            Command::new("ip")
                .args(["netns", "exec", &self.service_netns(0, CLIENT, 0), "ping", "-c", "2", "-W", "2"])
                .arg(FILES_SERVICE_IP),
            Duration::from_secs(10),
        );
        let ping_output = String::from_utf8_lossy(&ping.stdout);
        assert!(ping.status.success(), "ping failed: {ping_output}");
        assert!(ping_output.contains(&format!("from {FILES_SERVICE_IP}")), "{ping_output}");
    }

    /// Runs a python snippet inside the client's namespace.
    fn client_python(&self, script: &str, timeout: Duration) -> Output {
        let netns = self.service_netns(0, CLIENT, 0);
        run_with_timeout(Command::new("ip").args(["netns", "exec", &netns, "python3", "-c", script]), timeout)
    }

    fn http_get(&self, url: &str) -> Result<Vec<u8>, String> {
        let script = format!(
            "import sys, urllib.request\nsys.stdout.buffer.write(urllib.request.urlopen('{url}', timeout=5).read())"
        );
        let output = self.client_python(&script, Duration::from_secs(10));
        if output.status.success() { Ok(output.stdout) } else { Err(String::from_utf8_lossy(&output.stderr).into()) }
    }

    fn status(&self, machine: usize) -> serde_json::Value {
        let mut stream = UnixStream::connect(self.machines[machine].data_dir.join("agent.sock")).unwrap();
        stream.write_all(b"GET /v1/dataplane HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let (_, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
        serde_json::from_str(body).expect("status JSON")
    }

    /// Replaces a machine's route table (PUT /v1/dataplane/routes).
    fn put_routes(&self, machine: usize, table: &[u8]) {
        let mut stream = UnixStream::connect(self.machines[machine].data_dir.join("agent.sock")).unwrap();
        let head = format!(
            "PUT /v1/dataplane/routes HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            table.len()
        );
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(table).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "PUT routes: {response}");
    }

    fn stop_everything(&mut self) {
        for (_, mut child) in self.services.drain(..).rev() {
            terminate(&mut child);
        }
        for mut agent in self.agents.drain(..) {
            terminate(&mut agent);
        }
    }

    fn logs(&self) -> String {
        let mut all = String::new();
        for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            if entry.path().extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                all.push_str(&format!("==== {}\n{text}\n", entry.path().display()));
            }
        }
        all
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        self.stop_everything();
        for machine in &self.machines {
            for entry in std::fs::read_dir("/run/netns").into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(&format!("{}-", machine.prefix)) {
                    let _ = Command::new("ip").args(["netns", "del", &name]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", &machine.netns]).stderr(Stdio::null()).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn big_file() -> Vec<u8> {
    (0..BIG_FILE_LEN).map(|i| (i % 251) as u8).collect()
}

/// These tests also ping a ServiceIP, which a fresh machine may lack before `testbeds/prerequisites` ran.
fn skip_reason_with_ping() -> Option<&'static str> {
    skip_reason().or_else(|| {
        let ping_missing = Command::new("ping").arg("-V").output().is_err();
        ping_missing.then_some("needs ping (testbeds/prerequisites installs it)")
    })
}

#[test]
fn services_talk_through_service_ips_across_machines() {
    scenario('p', false);
}

#[test]
fn services_talk_through_encrypted_tunnels() {
    scenario('s', true);
}

fn scenario(tag: char, sealed: bool) {
    if let Some(reason) = skip_reason_with_ping() {
        eprintln!("skipping dataplane_netns: {reason}");
        return;
    }
    let mut bed = Testbed::new(tag, sealed);
    if sealed {
        // The sealed run also exercises the busy-polling read path (the plain one the readiness path).
        bed.agent_flags = vec!["--busy-poll-us", "200"];
    }
    bed.build_underlay();
    let routes = bed.write_routes();
    bed.start_agents(&[routes.clone(), routes]);

    for (name, content) in [("w0", b"web0".to_vec()), ("w1", b"web1".to_vec()), ("files", b"files".to_vec())] {
        let dir = bed.dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("id.txt"), content).unwrap();
    }
    std::fs::write(bed.dir.join("files").join("big.bin"), big_file()).unwrap();
    let serve = |name: &str| -> Vec<String> {
        let dir = bed.dir.join(name).to_string_lossy().into_owned();
        ["python3", "-m", "http.server", "8000", "--directory", &dir].map(String::from).to_vec()
    };
    let (w0, w1, files) = (serve("w0"), serve("w1"), serve("files"));
    let echo = "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.bind(('0.0.0.0', 7))\n\
                while True:\n    data, peer = s.recvfrom(2048)\n    s.sendto(data, peer)";
    bed.run_service(0, CLIENT, 0, &["sleep", "600"]);
    bed.run_service(0, WEB, 0, &refs(&w0));
    bed.run_service(1, WEB, 1, &refs(&w1));
    bed.run_service(1, FILES, 0, &refs(&files));
    bed.run_service(1, ECHO, 0, &["python3", "-c", echo]);
    let client_netns = format!("/run/netns/{}", bed.service_netns(0, CLIENT, 0));
    wait_for(Duration::from_secs(20), "the client namespace", || Path::new(&client_netns).exists());
    wait_for(Duration::from_secs(30), "the files service", || {
        bed.http_get(&format!("http://{FILES_SERVICE_IP}:8000/id.txt")).is_ok()
    });

    // TCP across machines: an HTTP request and a 1 MB transfer through the ServiceIP.
    assert_eq!(bed.http_get(&format!("http://{FILES_SERVICE_IP}:8000/id.txt")).unwrap(), b"files");
    let big = bed.http_get(&format!("http://{FILES_SERVICE_IP}:8000/big.bin")).unwrap();
    assert_eq!(big.len(), BIG_FILE_LEN);
    assert!(big == big_file(), "the 1 MB transfer arrived intact");

    // UDP echo across machines; the reply comes from the ServiceIP the client called.
    bed.assert_udp_echo_from_service_ip();

    // ICMP echo to a ServiceIP (on the other machine), answered from the ServiceIP.
    bed.assert_ping_from_service_ip();

    // Two instances on two machines: successive new connections alternate.
    wait_for(Duration::from_secs(30), "both web instances", || {
        let answers: Vec<_> =
            (0..2).filter_map(|_| bed.http_get(&format!("http://{WEB_SERVICE_IP}:8000/id.txt")).ok()).collect();
        answers.len() == 2 && answers[0] != answers[1]
    });
    let answers: Vec<String> = (0..6)
        .map(|_| String::from_utf8(bed.http_get(&format!("http://{WEB_SERVICE_IP}:8000/id.txt")).unwrap()).unwrap())
        .collect();
    for pair in answers.windows(2) {
        assert_ne!(pair[0], pair[1], "round-robin alternates: {answers:?}");
    }
    assert!(answers.contains(&"web0".to_string()) && answers.contains(&"web1".to_string()));

    // Stop web#1 on machine b: its machine answers route-not-found and every later connection goes to web#0.
    bed.stop_service(WEB, 1);
    let web1_netns = format!("/run/netns/{}", bed.service_netns(1, WEB, 1));
    wait_for(Duration::from_secs(10), "web#1 to be detached", || !Path::new(&web1_netns).exists());
    for _ in 0..4 {
        let answer =
            bed.http_get(&format!("http://{WEB_SERVICE_IP}:8000/id.txt")).expect("the remaining instance answers");
        assert_eq!(answer, b"web0");
    }
    let a = bed.status(0);
    assert!(a["counters"]["route_not_found_received"].as_u64().unwrap() >= 1, "{a}");
    assert!(bed.status(1)["counters"]["route_not_found_sent"].as_u64().unwrap() >= 1);
    assert_eq!(a["counters"]["drop_malformed"], 0, "{a}");
    assert_eq!(a["counters"]["drop_unauthenticated"], 0, "{a}");
    assert_eq!(a["routes"]["tunnel_key"].is_string(), sealed);

    // Stopping the agents removes everything they installed.
    bed.stop_everything();
    for machine in &bed.machines {
        let links =
            run_with_timeout(Command::new("ip").args(["-n", &machine.netns, "-o", "link"]), Duration::from_secs(5));
        let links = String::from_utf8_lossy(&links.stdout);
        assert!(!links.contains(&machine.prefix), "links left behind: {links}");
        let leftovers: Vec<_> = std::fs::read_dir("/run/netns")
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&format!("{}-", machine.prefix)))
            .collect();
        assert!(leftovers.is_empty(), "namespaces left behind: {leftovers:?}");
    }
}

/// Routes from the tree are partial: machine b does not know machine a or the client calling its services. With
/// sealed tunnels b accepts a's authentic datagrams and learns the client's InstanceIP from them, so TCP, UDP and
/// ICMP replies find their way back; an address nobody knows becomes a notice (a table query, for the agent).
#[test]
fn server_machine_answers_clients_its_table_does_not_list() {
    if let Some(reason) = skip_reason_with_ping() {
        eprintln!("skipping dataplane_netns: {reason}");
        return;
    }
    let mut bed = Testbed::new('l', true);
    bed.build_underlay();
    let routes = bed.write_partial_routes();
    bed.start_agents(&routes);
    let dir = bed.dir.join("files");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("id.txt"), b"files").unwrap();
    std::fs::write(dir.join("big.bin"), big_file()).unwrap();
    let serve: Vec<String> =
        ["python3", "-m", "http.server", "8000", "--directory", &dir.to_string_lossy()].map(String::from).to_vec();
    let echo = "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.bind(('0.0.0.0', 7))\n\
                while True:\n    data, peer = s.recvfrom(2048)\n    s.sendto(data, peer)";
    bed.run_service(0, CLIENT, 0, &["sleep", "600"]);
    bed.run_service(1, FILES, 0, &refs(&serve));
    bed.run_service(1, ECHO, 0, &["python3", "-c", echo]);
    let client_netns = format!("/run/netns/{}", bed.service_netns(0, CLIENT, 0));
    wait_for(Duration::from_secs(20), "the client namespace", || Path::new(&client_netns).exists());
    wait_for(Duration::from_secs(30), "the files service", || {
        bed.http_get(&format!("http://{FILES_SERVICE_IP}:8000/id.txt")).is_ok()
    });

    // TCP through the ServiceIP: an HTTP request and a 1 MB transfer.
    assert_eq!(bed.http_get(&format!("http://{FILES_SERVICE_IP}:8000/id.txt")).unwrap(), b"files");
    let big = bed.http_get(&format!("http://{FILES_SERVICE_IP}:8000/big.bin")).unwrap();
    assert!(big == big_file(), "the 1 MB transfer arrived intact ({} bytes)", big.len());

    // UDP echo: the reply comes from the ServiceIP the client called.
    bed.assert_udp_echo_from_service_ip();

    // ICMP echo to the ServiceIP.
    bed.assert_ping_from_service_ip();

    // b learned the client's InstanceIP from authentic traffic of a machine its table does not list.
    let b = bed.status(1);
    assert!(b["counters"]["reply_routes_learned"].as_u64().unwrap() >= 1, "{b}");
    assert!(b["reply_routes"].as_u64().unwrap() >= 1, "{b}");
    assert_eq!(b["counters"]["drop_unknown_sender"], 0, "{b}");
    assert_eq!(b["counters"]["drop_unauthenticated"], 0, "{b}");
    assert_eq!(b["counters"]["drop_no_route"], 0, "{b}");

    // An overlay address nobody knows: dropped, counted, and the agent is told (once per second at most).
    let nowhere = bed.client_python(
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         for _ in range(3):\n    s.sendto(b'x', ('10.30.99.99', 9))",
        Duration::from_secs(10),
    );
    assert!(nowhere.status.success(), "{}", String::from_utf8_lossy(&nowhere.stderr));
    wait_for(Duration::from_secs(5), "the unknown-address notice", || {
        let a = bed.status(0);
        a["counters"]["drop_no_route"].as_u64().unwrap() >= 3 && a["counters"]["notices_sent"].as_u64().unwrap() >= 1
    });
    let log = std::fs::read_to_string(bed.dir.join("agent-0.log")).unwrap();
    assert!(log.contains("UnknownAddress(10.30.99.99)"), "the standalone agent logs its notices");
    assert_eq!(log.matches("UnknownAddress(10.30.99.99)").count(), 1, "three packets, one notice");
}

/// Routes from the tree arrive lazily: the client's machine learns the files service only after the client's
/// first SYN to its ServiceIP (here 300 ms later, by hand). The SYN waits for the table instead of being dropped,
/// so the connection is up well before TCP's 1 s retransmission. Then machine b dies silently (SIGKILL): a probes
/// it, declares it unreachable within a few seconds while the client keeps trying, and tells the agent.
#[test]
fn first_packets_wait_for_the_route_and_a_silent_machine_becomes_unreachable() {
    if let Some(reason) = skip_reason() {
        eprintln!("skipping dataplane_netns: {reason}");
        return;
    }
    let mut bed = Testbed::new('h', true);
    bed.build_underlay();
    let routes = bed.write_partial_routes();
    let full_a = std::fs::read(&routes[0]).unwrap();
    let mut early_a: serde_json::Value = serde_json::from_slice(&full_a).unwrap();
    early_a["services"].as_array_mut().unwrap().retain(|s| s["name"] != FILES);
    std::fs::write(&routes[0], serde_json::to_vec(&early_a).unwrap()).unwrap();
    bed.start_agents(&routes);
    let dir = bed.dir.join("files");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("id.txt"), b"files").unwrap();
    let serve: Vec<String> =
        ["python3", "-m", "http.server", "8000", "--directory", &dir.to_string_lossy()].map(String::from).to_vec();
    bed.run_service(0, CLIENT, 0, &["sleep", "600"]);
    bed.run_service(1, FILES, 0, &refs(&serve));
    let client_netns = bed.service_netns(0, CLIENT, 0);
    let files_netns = bed.service_netns(1, FILES, 0);
    wait_for(Duration::from_secs(20), "the client namespace", || {
        Path::new(&format!("/run/netns/{client_netns}")).exists()
    });
    wait_for(Duration::from_secs(30), "the files service listening", || {
        let probe = "import socket\nsocket.create_connection(('127.0.0.1', 8000), timeout=1).close()";
        Path::new(&format!("/run/netns/{files_netns}")).exists()
            && run_with_timeout(
                Command::new("ip").args(["netns", "exec", &files_netns, "python3", "-c", probe]),
                Duration::from_secs(5),
            )
            .status
            .success()
    });

    // The client connects to a ServiceIP its machine does not know yet; the table follows 300 ms later.
    let connect = format!(
        "import socket, time, sys\nsys.stdout.write('ready\\n'); sys.stdout.flush()\nstart = time.monotonic()\n\
         s = socket.create_connection(('{FILES_SERVICE_IP}', 8000), timeout=5)\n\
         elapsed = time.monotonic() - start\n\
         s.sendall(b'GET /id.txt HTTP/1.0\\r\\n\\r\\n')\nreply = b''\nwhile True:\n    chunk = s.recv(4096)\n    \
         if not chunk:\n        break\n    reply += chunk\nprint(f'{{elapsed:.3f}}', reply.split(b'\\r\\n\\r\\n', 1)[1].decode())"
    );
    let mut client = Command::new("ip")
        .args(["netns", "exec", &client_netns, "python3", "-c", &connect])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = client.stdout.take().unwrap();
    let mut ready = [0u8; 6];
    stdout.read_exact(&mut ready).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let held = bed.status(0);
    bed.put_routes(0, &full_a);
    let mut output = String::new();
    let reader = std::thread::spawn(move || {
        stdout.read_to_string(&mut output).unwrap();
        output
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = client.kill();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = reader.join().unwrap();
    let (elapsed, body) = output.trim().split_once(' ').unwrap_or_else(|| panic!("client output: {output:?}"));
    let elapsed: f64 = elapsed.parse().unwrap();
    eprintln!("first connection to a ServiceIP learned 300 ms after the SYN: {elapsed:.3} s");
    assert_eq!(body, "files");
    assert!(elapsed >= 0.25, "the SYN waited for the table: {elapsed} s");
    assert!(elapsed < 0.9, "no SYN retransmission (1 s) needed: {elapsed} s");
    assert!(held["held_packets"].as_u64().unwrap() >= 1, "{held}");
    let a = bed.status(0);
    assert!(a["counters"]["held_released"].as_u64().unwrap() >= 1, "{a}");
    assert_eq!(a["held_packets"], 0, "{a}");
    assert_eq!(a["counters"]["held_expired"], 0, "{a}");
    assert_eq!(a["counters"]["peers_unreachable"], 0, "{a}");

    // Machine b dies without a word. The client keeps trying; a probes b, gives up and stops choosing its instance.
    let mut b = bed.agents.remove(1);
    let killed = Instant::now();
    let _ = b.kill();
    let _ = b.wait();
    let retry = format!(
        "import socket\ntry:\n    socket.create_connection(('{FILES_SERVICE_IP}', 8000), timeout=9)\nexcept OSError:\n    pass"
    );
    let mut retrying = Command::new("ip")
        .args(["netns", "exec", &client_netns, "python3", "-c", &retry])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut declared = None;
    let deadline = Instant::now() + Duration::from_secs(9);
    while Instant::now() < deadline {
        if bed.status(0)["counters"]["peers_unreachable"].as_u64().unwrap() >= 1 {
            declared = Some(killed.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    terminate(&mut retrying);
    let declared = declared.expect("a declares the silent machine unreachable");
    eprintln!("silent machine declared unreachable {:.2} s after it was killed", declared.as_secs_f64());
    let a = bed.status(0);
    assert!(a["counters"]["probes_sent"].as_u64().unwrap() >= 3, "{a}");
    assert_eq!(a["unreachable_peers"], 1, "{a}");
    wait_for(Duration::from_secs(5), "the notice in the log", || {
        let log = std::fs::read_to_string(bed.dir.join("agent-0.log")).unwrap();
        log.contains(&format!("InstanceUnreachable {{ service: \"{FILES}\", instance: 0 }}"))
    });
    // New connections find no instance instead of trying the dead machine.
    let before = a["counters"]["drop_no_instance"].as_u64().unwrap();
    let _ = bed.client_python(
        &format!("import socket\ntry:\n    socket.create_connection(('{FILES_SERVICE_IP}', 8000), timeout=1)\nexcept OSError:\n    pass"),
        Duration::from_secs(5),
    );
    assert!(bed.status(0)["counters"]["drop_no_instance"].as_u64().unwrap() > before);
}
