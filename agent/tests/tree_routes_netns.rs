//! Routes from the tree, end to end (root only): four "machines" (network namespaces on one underlay bridge) run
//! real agents joined with `agent join`, with no `--subnet` and no route table. Each gets its subnet from the tree;
//! services started with `agent run` are deployed and registered with the tree, and clients reach them by name and
//! by ServiceIP across machines.
//!
//! Shows: subnets granted without conflicts; rr by name and by ServiceIP across machines; a new instance becomes
//! reachable and a removed one stops receiving new connections without restarting anything; after the coordinator
//! of the client's cluster (the root here) is killed, an established connection keeps flowing, new connections
//! still resolve, and a service deployed afterwards is reachable (the tree recovered).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod netns_common;
use netns_common::{ip, refs, run_with_timeout, skip_reason, terminate, wait_for};

const AGENT: &str = env!("CARGO_BIN_EXE_agent");
const CLIENT: &str = "demo.default.client.default";
const WEB: &str = "demo.default.web.default";
const ECHO: &str = "demo.default.echo.default";
const LATE: &str = "demo.default.late.default";
const WEB_NAME: &str = "demo.default.web.default.any.rr";
const NAMES: [&str; 4] = ["a", "b", "c", "d"];

struct Machine {
    netns: String,
    data_dir: PathBuf,
    underlay_ip: String,
    /// Start of the names of the service namespaces its agent creates.
    netns_prefix: String,
    agent: Option<Child>,
}

/// Owns every namespace and process of the test; tears all down even when the test fails.
struct Testbed {
    dir: PathBuf,
    underlay: String,
    machines: Vec<Machine>,
    services: Vec<(String, Child)>,
    agent_runs: usize,
}

impl Testbed {
    fn new() -> Self {
        let id = std::process::id() % 100_000;
        let dir = std::env::temp_dir().join(format!("canopy-tree-test-{id}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let machines = NAMES
            .iter()
            .enumerate()
            .map(|(i, name)| Machine {
                netns: format!("ctr{id}{name}"),
                data_dir: dir.join(name),
                underlay_ip: format!("172.31.251.{}", i + 1),
                netns_prefix: format!("ctr{id}{name}-"),
                agent: None,
            })
            .collect();
        Testbed { dir, underlay: format!("ctr{id}u"), machines, services: Vec::new(), agent_runs: 0 }
    }

    fn build_underlay(&self) {
        ip(&["netns", "add", &self.underlay]);
        ip(&["-n", &self.underlay, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &self.underlay, "link", "set", "br0", "up"]);
        for (i, machine) in self.machines.iter().enumerate() {
            ip(&["netns", "add", &machine.netns]);
            let port = format!("p{i}");
            ip(&[
                "link",
                "add",
                "eth0",
                "netns",
                &machine.netns,
                "type",
                "veth",
                "peer",
                "name",
                &port,
                "netns",
                &self.underlay,
            ]);
            ip(&["-n", &self.underlay, "link", "set", &port, "master", "br0", "up"]);
            ip(&["-n", &machine.netns, "addr", "add", &format!("{}/24", machine.underlay_ip), "dev", "eth0"]);
            ip(&["-n", &machine.netns, "link", "set", "eth0", "up"]);
            ip(&["-n", &machine.netns, "link", "set", "lo", "up"]);
        }
    }

    fn start_agent(&mut self, index: usize, args: &[String]) {
        let machine = &self.machines[index];
        let netns = std::fs::File::open(format!("/run/netns/{}", machine.netns)).unwrap();
        self.agent_runs += 1;
        let log =
            std::fs::File::create(self.dir.join(format!("agent-{}-{}.log", NAMES[index], self.agent_runs))).unwrap();
        let listen = [
            format!("/ip4/{}/udp/4001/quic-v1", machine.underlay_ip),
            format!("/ip4/{}/tcp/4001", machine.underlay_ip),
        ];
        let mut command = Command::new(AGENT);
        command
            .arg("--data-dir")
            .arg(&machine.data_dir)
            .args(args)
            .args(["--no-mdns", "--position", &format!("48.{},11.{}", index * 3, index * 5)])
            .args(["--listen", &listen[0], "--listen", &listen[1]])
            .env("CANOPY_NETNS_PREFIX", &machine.netns_prefix)
            .env("RUST_LOG", "info,agent=debug,libp2p=warn")
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // Only the network namespace changes: the agent shares our mount namespace, so the service namespaces it
        // creates under /run/netns are visible to us.
        unsafe {
            command.pre_exec(move || {
                nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
            });
        }
        self.machines[index].agent = Some(command.spawn().expect("starting the agent"));
    }

    fn kill_agent(&mut self, index: usize) {
        if let Some(mut agent) = self.machines[index].agent.take() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
    }

    fn cli(&self, index: usize, args: &[&str]) -> Output {
        run_with_timeout(
            Command::new(AGENT).arg("--data-dir").arg(&self.machines[index].data_dir).args(args),
            Duration::from_secs(20),
        )
    }

    fn status(&self, index: usize) -> Option<serde_json::Value> {
        let output = self.cli(index, &["status", "--json"]);
        output.status.success().then(|| serde_json::from_slice(&output.stdout).ok()).flatten()
    }

    fn run_service(&mut self, machine: usize, service: &str, instance: u32, command: &[&str]) {
        let started =
            netns_common::run_service(&self.machines[machine].data_dir, &self.dir, service, instance, command);
        self.services.push(started);
    }

    fn stop_service(&mut self, service: &str, instance: u32) {
        netns_common::stop_service(&mut self.services, service, instance);
    }

    fn service_netns(&self, machine: usize, service: &str, instance: u32) -> String {
        format!("{}{service}-{instance}", self.machines[machine].netns_prefix)
    }

    /// Runs a python snippet inside the client instance on machine d.
    fn client_python(&self, script: &str, timeout: Duration) -> Output {
        let netns = self.service_netns(3, CLIENT, 0);
        run_with_timeout(Command::new("ip").args(["netns", "exec", &netns, "python3", "-c", script]), timeout)
    }

    fn http_get(&self, host: &str) -> Result<String, String> {
        let script = format!(
            "import sys, urllib.request\nsys.stdout.write(urllib.request.urlopen('http://{host}:8000/id.txt', \
             timeout=4).read().decode())"
        );
        let output = self.client_python(&script, Duration::from_secs(10));
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        }
    }

    fn logs(&self) -> String {
        let mut all = String::new();
        let mut entries: Vec<_> = std::fs::read_dir(&self.dir).into_iter().flatten().flatten().collect();
        entries.sort_by_key(|e| e.path());
        for entry in entries {
            if entry.path().extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(60).collect();
                all.push_str(&format!("==== {}\n", entry.path().display()));
                for line in tail.into_iter().rev() {
                    all.push_str(line);
                    all.push('\n');
                }
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
        for (_, mut child) in self.services.drain(..).rev() {
            terminate(&mut child);
        }
        for machine in &mut self.machines {
            if let Some(mut agent) = machine.agent.take() {
                terminate(&mut agent);
            }
        }
        for machine in &self.machines {
            for entry in std::fs::read_dir("/run/netns").into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(&machine.netns_prefix) {
                    let _ = Command::new("ip").args(["netns", "del", &name]).status();
                    let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&name));
                }
            }
            let _ = Command::new("ip").args(["netns", "del", &machine.netns]).stderr(Stdio::null()).status();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.underlay]).stderr(Stdio::null()).status();
        if std::env::var_os("CANOPY_KEEP_TEST_LOGS").is_some() {
            eprintln!("logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn web_server(bed: &Testbed, id: &str) -> Vec<String> {
    let dir = bed.dir.join(id);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("id.txt"), id).unwrap();
    ["python3", "-m", "http.server", "8000", "--directory", &dir.to_string_lossy()].map(String::from).to_vec()
}

#[test]
fn services_reach_each_other_with_routes_from_the_tree() {
    if let Some(reason) = skip_reason() {
        eprintln!("skipping tree_routes_netns: {reason}");
        return;
    }
    let mut bed = Testbed::new();
    bed.build_underlay();
    bed.start_agent(0, &["start".into()]);
    wait_for(Duration::from_secs(20), "the first agent", || bed.status(0).is_some());
    let key = bed.machines[0].data_dir.join("network.key").to_string_lossy().into_owned();
    let bootstrap = format!("{}:4001", bed.machines[0].underlay_ip);
    for index in 1..4 {
        bed.start_agent(index, &["join".into(), bootstrap.clone(), "--network-key-file".into(), key.clone()]);
    }

    // One tree; every machine has a subnet from it, no two overlap.
    let formed = wait_for(Duration::from_secs(60), "one tree with a subnet on every machine", || {
        let statuses: Vec<_> = (0..4).filter_map(|i| bed.status(i)).collect();
        statuses.len() == 4
            && statuses.iter().filter(|s| s["role"] == "root").count() == 1
            && statuses.iter().all(|s| s["role"] != "detached" && s["subnet"].is_string())
    });
    let subnets: Vec<ipnet::Ipv4Net> =
        (0..4).map(|i| bed.status(i).unwrap()["subnet"].as_str().unwrap().parse().unwrap()).collect();
    for (i, x) in subnets.iter().enumerate() {
        for y in &subnets[i + 1..] {
            assert!(!x.contains(&y.network()) && !y.contains(&x.network()), "overlapping subnets {subnets:?}");
        }
    }
    eprintln!("tree with subnets formed in {formed:?}: {subnets:?}");
    // The data planes start on the grants.
    wait_for(Duration::from_secs(20), "every data plane", || {
        (0..4).all(|i| bed.cli(i, &["status", "--json"]).status.success())
            && (0..4).all(|i| {
                let out = bed.cli(i, &["services", "--json"]);
                out.status.success()
            })
    });

    // web#0 on b, web#1 on c, an echo service on c, a client on d.
    let (web0, web1) = (web_server(&bed, "web0"), web_server(&bed, "web1"));
    let echo = "import socketserver\nclass H(socketserver.StreamRequestHandler):\n    def handle(self):\n        \
                for line in self.rfile:\n            self.wfile.write(line)\n\
                socketserver.ThreadingTCPServer.allow_reuse_address = True\n\
                socketserver.ThreadingTCPServer(('0.0.0.0', 7000), H).serve_forever()";
    bed.run_service(1, WEB, 0, &refs(&web0));
    bed.run_service(2, WEB, 1, &refs(&web1));
    bed.run_service(2, ECHO, 0, &["python3", "-c", echo]);
    bed.run_service(3, CLIENT, 0, &["sleep", "900"]);
    let client_netns = format!("/run/netns/{}", bed.service_netns(3, CLIENT, 0));
    wait_for(Duration::from_secs(40), "the client namespace", || Path::new(&client_netns).exists());

    // By name, across machines, round-robin over both instances.
    let cold = Instant::now();
    wait_for(Duration::from_secs(40), "the web service by name", || bed.http_get(WEB_NAME).is_ok());
    eprintln!("first fetch by name after {:?}", cold.elapsed());
    let mut seen = std::collections::BTreeSet::new();
    wait_for(Duration::from_secs(30), "both web instances by name", || {
        if let Ok(id) = bed.http_get(WEB_NAME) {
            seen.insert(id);
        }
        seen.len() == 2
    });

    // By ServiceIP: the same service, as `agent services` on the client's machine shows it.
    let services: serde_json::Value =
        serde_json::from_slice(&bed.cli(3, &["services", "--json"]).stdout).expect("agent services --json");
    let web = services.as_array().unwrap().iter().find(|s| s["name"] == WEB).expect("d knows the web service");
    let service_ip = web["service_ips"]["rr"].as_str().unwrap().to_string();
    assert_eq!(web["instances"].as_array().unwrap().len(), 2, "{web}");
    let resolved = bed.cli(3, &["resolve", WEB_NAME]);
    assert_eq!(String::from_utf8_lossy(&resolved.stdout).trim(), service_ip);
    let answers: Vec<String> = (0..4).map(|_| bed.http_get(&service_ip).expect("fetch by ServiceIP")).collect();
    assert!(answers.contains(&"web0".into()) && answers.contains(&"web1".into()), "rr by ServiceIP: {answers:?}");

    // A new instance (web#2 on d itself) becomes reachable without restarting anything.
    let web2 = web_server(&bed, "web2");
    bed.run_service(3, WEB, 2, &refs(&web2));
    let added = wait_for(Duration::from_secs(30), "the new instance", || {
        bed.http_get(&service_ip).is_ok_and(|id| id == "web2")
    });
    eprintln!("new instance reachable after {added:?}");

    // A removed instance (web#0 on b) stops receiving new connections.
    bed.stop_service(WEB, 0);
    let removed = wait_for(Duration::from_secs(30), "web#0 to leave the rotation", || {
        let answers: Vec<String> = (0..4).filter_map(|_| bed.http_get(&service_ip).ok()).collect();
        answers.len() == 4 && !answers.contains(&"web0".into())
    });
    eprintln!("removed instance out of the rotation after {removed:?}");

    // An established connection from d to the echo service on c, while d's coordinator (the root, a) is killed.
    let parent = bed.status(3).unwrap()["parent"].as_str().map(str::to_string);
    let coordinator = (0..4)
        .find(|&i| bed.status(i).is_some_and(|s| Some(s["peer_id"].as_str().unwrap().to_string()) == parent))
        .expect("d's parent is one of the machines");
    assert_ne!(coordinator, 3);
    let echo_name = format!("{ECHO}.any.rr");
    let stream = format!(
        "import socket, sys, time\ns = socket.create_connection(('{echo_name}', 7000), timeout=5)\n\
         f = s.makefile('rwb')\nok = 0\nfor i in range(100):\n    f.write(b'line %d\\n' % i); f.flush()\n    \
         if f.readline() == b'line %d\\n' % i: ok += 1\n    time.sleep(0.1)\nprint(ok)"
    );
    let netns = bed.service_netns(3, CLIENT, 0);
    let streamer = Command::new("ip")
        .args(["netns", "exec", &netns, "python3", "-c", &stream])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let killed_at = Instant::now();
    bed.kill_agent(coordinator);
    let streamed = streamer.wait_with_output().unwrap();
    assert!(streamed.status.success(), "stream failed: {}", String::from_utf8_lossy(&streamed.stderr));
    assert_eq!(String::from_utf8_lossy(&streamed.stdout).trim(), "100", "every line echoed across the failover");

    // New connections still resolve and connect while and after the tree heals.
    let answer = bed.http_get(WEB_NAME).expect("a new connection by name after the coordinator died");
    assert!(answer == "web1" || answer == "web2", "{answer}");
    let survivors: Vec<usize> = (0..4).filter(|&i| i != coordinator).collect();
    let healed = wait_for(Duration::from_secs(30), "the tree to heal", || {
        let statuses: Vec<_> = survivors.iter().filter_map(|&i| bed.status(i)).collect();
        statuses.len() == 3
            && statuses.iter().filter(|s| s["role"] == "root").count() == 1
            && statuses.iter().all(|s| s["role"] != "detached")
    });
    eprintln!("tree whole again {healed:?} after the kill ({:?} since)", killed_at.elapsed());
    // A service deployed after the failover is reachable: the new root allocates, routes flow again.
    let late_host = *survivors.iter().find(|&&i| i != 3).unwrap();
    let late = web_server(&bed, "late");
    bed.run_service(late_host, LATE, 0, &refs(&late));
    let late_name = format!("{LATE}.any.rr");
    let recovered = wait_for(Duration::from_secs(40), "a service deployed after the failover", || {
        bed.http_get(&late_name).is_ok_and(|id| id == "late")
    });
    eprintln!("new service reachable {recovered:?} after the tree healed");

    // kill -9 the agent hosting web#1 (c) and restart it: same peer id, same subnet, web#1 reachable again at the
    // same InstanceIP (its process kept running).
    let before = bed.status(2).unwrap();
    // Web#1's InstanceIP, or its namespace IP, as agent `i` knows it.
    let web1_address = |bed: &Testbed, i: usize, field: &str| -> Option<String> {
        let services: serde_json::Value = serde_json::from_slice(&bed.cli(i, &["services", "--json"]).stdout).ok()?;
        let web = services.as_array()?.iter().find(|s| s["name"] == WEB)?.clone();
        let one = web["instances"].as_array()?.iter().find(|i| i["number"] == 1)?.clone();
        one[field].as_str().map(str::to_string)
    };
    let web1_ip = web1_address(&bed, 3, "instance_ip").expect("d knows web#1");
    let web1_namespace_ip = web1_address(&bed, 2, "namespace_ip").expect("c hosts web#1");
    bed.kill_agent(2);
    let restarted_at = Instant::now();
    bed.start_agent(2, &["join".into(), bootstrap.clone(), "--network-key-file".into(), key.clone()]);
    wait_for(Duration::from_secs(60), "the restarted agent back in the tree", || {
        bed.status(2).is_some_and(|s| s["role"] != "detached" && s["subnet"].is_string())
    });
    let after = bed.status(2).unwrap();
    assert_eq!(after["peer_id"], before["peer_id"]);
    assert_eq!(after["subnet"], before["subnet"], "the restarted machine keeps its subnet");
    let back = wait_for(Duration::from_secs(60), "web#1 at its InstanceIP again", || {
        bed.http_get(&web1_ip).is_ok_and(|id| id == "web1")
    });
    eprintln!("web#1 reachable at {web1_ip} {back:?} after the restart ({:?} since the kill)", restarted_at.elapsed());
    // Adopted back at its old namespace IP (restores run in parallel; first-free addresses would swap instances
    // and the routes other machines hold would lead to the wrong one).
    assert_eq!(web1_address(&bed, 2, "namespace_ip"), Some(web1_namespace_ip));
}
