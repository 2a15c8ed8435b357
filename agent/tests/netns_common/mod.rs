//! Helpers shared by the root-only integration tests that build machines out of network namespaces.

#![allow(dead_code)] // each test binary uses its own subset

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Why these tests cannot run here, if they cannot.
pub fn skip_reason() -> Option<&'static str> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root (network namespaces, TUN, netlink)");
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("needs /dev/net/tun");
    }
    if Command::new("ip").arg("-V").output().is_err() || Command::new("python3").arg("-V").output().is_err() {
        return Some("needs the ip tool and python3");
    }
    None
}

/// Runs a command to completion, killing it after `limit`. Output is read while it runs (large outputs would
/// otherwise fill the pipe and stall the command).
pub fn run_with_timeout(command: &mut Command, limit: Duration) -> Output {
    let child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawning a command");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let done = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let done = done.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + limit;
            while !done.load(Ordering::SeqCst) {
                if Instant::now() > deadline {
                    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let output = child.wait_with_output().expect("collecting output");
    done.store(true, Ordering::SeqCst);
    let _ = watchdog.join();
    output
}

/// `ip ARGS...`, which must succeed.
pub fn ip(args: &[&str]) {
    let output = run_with_timeout(Command::new("ip").args(args), Duration::from_secs(10));
    assert!(output.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

/// SIGTERM, then SIGKILL if the process has not exited after 5 s.
pub fn terminate(child: &mut Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Polls `condition` until it holds, failing the test after `limit`; returns how long it took.
pub fn wait_for(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !condition() {
        assert!(started.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
    started.elapsed()
}

pub fn refs(strings: &[String]) -> Vec<&str> {
    strings.iter().map(String::as_str).collect()
}

/// `agent run --service SERVICE --instance N -- COMMAND` against the agent of `data_dir`, logging to
/// `log_dir/<service>-<n>.log`; the child is labelled `service/n` for [`stop_service`].
pub fn run_service(data_dir: &Path, log_dir: &Path, service: &str, instance: u32, command: &[&str]) -> (String, Child) {
    let log = std::fs::File::create(log_dir.join(format!("{service}-{instance}.log"))).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_agent"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(["run", "--service", service, "--instance", &instance.to_string(), "--"])
        .args(command)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("starting agent run");
    (format!("{service}/{instance}"), child)
}

/// Stops the `agent run` started for `service/instance` (its instance is detached when it exits).
pub fn stop_service(services: &mut Vec<(String, Child)>, service: &str, instance: u32) {
    let label = format!("{service}/{instance}");
    let position = services.iter().position(|(l, _)| *l == label).expect("service was started");
    let (_, mut child) = services.remove(position);
    terminate(&mut child);
}
