"""Drive Canopy agents on emulated hosts that offer a `popen(argv, **kwargs)` (Mininet and containernet hosts).

Shared by `mininet/run.py` and `containernet/run.py`: start the first agent, join the others with the command it
prints, wait for one tree, run a service and check that a client reaches it through its ServiceIP.
The namespace testbed (`netns/canopy_netns.py`) has the same steps built in; the parsing and tree checks are shared.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent / "netns"))

from canopy_netns import DEFAULT_P2P_PORT, GiveUp, TestbedError, check_disjoint_subnets, check_one_tree, parse_join_command, terminate  # noqa: E402
from canopy_netns import Testbed, tree_view  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from web_programs import HTTP_PORT, WEB_CLIENT, WEB_SERVER, client_plan, parse_client_output  # noqa: E402

wait_for = Testbed.wait_for


@dataclass
class EmulatedHost:
    name: str
    handle: Any  # a Mininet/containernet host: has popen(argv, stdout=..., stderr=...)
    ip: str
    position: tuple[float, float] | None


class OverlayDriver:
    """Agents on a set of hosts. `agent` and `data_root` are paths as seen from inside the hosts."""

    def __init__(self, agent: str, data_root: str, log_dir: Path, daemon_env: dict[str, str] | None = None):
        self.agent = agent
        # Extra environment for the agent daemons (Mininet: CANOPY_NETNS_PREFIX per host, as the hosts share the
        # mount namespace and so the names of the service namespaces the agents create).
        self.daemon_env = daemon_env
        self.data_root = data_root.rstrip("/")
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.daemons: dict[str, tuple[subprocess.Popen, Path]] = {}
        self.background: list[subprocess.Popen] = []

    def data_dir(self, host: EmulatedHost) -> str:
        return f"{self.data_root}/{host.name}"

    def _popen(self, host: EmulatedHost, argv: Sequence[str], log_name: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
        log_path = self.log_dir / f"{log_name}.log"
        extra = {"env": {**os.environ, **env}} if env else {}
        with open(log_path, "ab") as log:
            proc = host.handle.popen(list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **extra)
        return proc, log_path

    def call(self, host: EmulatedHost, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """An agent client command on a host (status, resolve, ...), waited for."""
        argv = [self.agent, *args, "--data-dir", self.data_dir(host)]
        proc = host.handle.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            terminate(proc, 0)
            raise TestbedError(f"`agent {' '.join(args)}` on {host.name} did not finish within {timeout}s")
        out_text = out.decode(errors="replace") if isinstance(out, bytes) else out
        err_text = err.decode(errors="replace") if isinstance(err, bytes) else err
        return subprocess.CompletedProcess(argv, proc.returncode, out_text, err_text)

    def _daemon_argv(self, host: EmulatedHost, subcommand: list[str]) -> list[str]:
        argv = [self.agent, *subcommand, "--data-dir", self.data_dir(host)]
        if host.position is not None:
            argv += ["--position", f"{host.position[0]},{host.position[1]}"]
        return argv + ["--listen", f"/ip4/{host.ip}/udp/{DEFAULT_P2P_PORT}/quic-v1", "--listen", f"/ip4/{host.ip}/tcp/{DEFAULT_P2P_PORT}"]

    def _env(self, host: EmulatedHost) -> dict[str, str] | None:
        if not self.daemon_env:
            return None
        return {key: value.replace("{host}", host.name) for key, value in self.daemon_env.items()}

    def start_overlay(self, hosts: Sequence[EmulatedHost], join_timeout: float = 30, stagger: float = 0.0) -> None:
        """`agent start` on the first host, `agent join` with its printed join command on the rest, `stagger`
        seconds apart."""
        first = hosts[0]
        self.daemons[first.name] = self._popen(first, self._daemon_argv(first, ["start"]), f"agent-{first.name}", self._env(first))
        proc, log_path = self.daemons[first.name]

        def join_args():
            if proc.poll() is not None:
                raise GiveUp(f"the first agent exited with code {proc.returncode}; see {log_path}")
            return parse_join_command(log_path.read_text(errors="replace"))

        args = wait_for(join_args, join_timeout, f"the join command in {log_path}")
        for host in hosts[1:]:
            self.daemons[host.name] = self._popen(host, self._daemon_argv(host, ["join", *args]), f"agent-{host.name}", self._env(host))
            if stagger:
                time.sleep(stagger)

    def wait_one_tree(self, hosts: Sequence[EmulatedHost], timeout: float) -> dict[str, dict]:
        def check():
            statuses = {}
            for host in hosts:
                result = self.call(host, "status", "--json")
                if result.returncode != 0:
                    raise TestbedError(f"status on {host.name}: {result.stderr.strip()}")
                statuses[host.name] = json.loads(result.stdout)
            check_one_tree(statuses)
            return statuses

        return wait_for(check, timeout, f"one tree over {len(hosts)} agents", interval=1.0)

    def wait_subnets(self, hosts: Sequence[EmulatedHost], timeout: float) -> dict[str, str]:
        """Wait until every agent reports the machine subnet the tree granted it, no two overlapping; the subnets by
        host name."""

        def check():
            subnets = {}
            for host in hosts:
                result = self.call(host, "status", "--json")
                subnet = json.loads(result.stdout).get("subnet") if result.returncode == 0 else None
                if not subnet:
                    raise TestbedError(f"{host.name} has no subnet yet")
                subnets[host.name] = subnet
            check_disjoint_subnets(subnets)
            return subnets

        return wait_for(check, timeout, f"subnet grants on {len(hosts)} agents", interval=1.0)

    def run_service(self, host: EmulatedHost, service: str, cmd: Sequence[str], instance: int | None = None) -> subprocess.Popen:
        """`agent run --service SERVICE [--instance N] -- CMD` in the background on a host."""
        argv = [self.agent, "run", "--data-dir", self.data_dir(host), "--service", service]
        if instance is not None:
            argv += ["--instance", str(instance)]
        proc, _ = self._popen(host, [*argv, "--", *cmd], f"service-{host.name}-{service}-{instance}")
        self.background.append(proc)
        return proc

    def resolve(self, host: EmulatedHost, name: str) -> str:
        """The first IPv4 address `agent resolve NAME` prints."""
        result = self.call(host, "resolve", name)
        match = re.search(r"\b(\d{1,3}(?:\.\d{1,3}){3})\b", result.stdout)
        if result.returncode != 0 or not match:
            raise TestbedError(f"resolve {name} on {host.name}: {result.stderr.strip() or result.stdout.strip()}")
        return match.group(1)

    def fetch(self, client: EmulatedHost, client_service: str, warm_urls: list[str], fetches: list[tuple[str, str, int]], timeout: float) -> dict:
        """Run WEB_CLIENT as `client_service` on `client` (names resolve through the agent's DNS); its parsed reply."""
        plan = client_plan(warm_urls, fetches, warmup=timeout)
        argv = [self.agent, "run", "--data-dir", self.data_dir(client), "--service", client_service, "--", "python3", "-c", WEB_CLIENT, plan]
        proc = client.handle.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            out, _ = proc.communicate(timeout=timeout + 60)
        except subprocess.TimeoutExpired:
            terminate(proc, 0)
            raise TestbedError(f"the client on {client.name} did not finish within {timeout + 60}s")
        text = out.decode(errors="replace") if isinstance(out, bytes) else out
        try:
            reply = parse_client_output(text)
        except ValueError as err:
            raise TestbedError(f"the client on {client.name}: {err}") from err
        if "error" in reply:
            raise TestbedError(f"the client on {client.name} could not fetch: {reply['error']}")
        return reply

    def total_rss_kib(self) -> tuple[int, int]:
        """Sum and maximum of VmRSS (KiB) over the running agent daemons (Mininet's popen execs the agent in
        place, so the process id is the agent's)."""
        sizes = []
        for proc, _ in self.daemons.values():
            rss = process_rss_kib(proc.pid)
            if rss is not None:
                sizes.append(rss)
        if len(sizes) != len(self.daemons):
            raise TestbedError(f"only {len(sizes)} of {len(self.daemons)} agents are running")
        return sum(sizes), max(sizes)

    def stop_all(self) -> None:
        """Stop services, then agents (SIGTERM, then SIGKILL)."""
        for proc in self.background:
            terminate(proc, 2.0)
        for proc, _ in self.daemons.values():
            terminate(proc, 5.0)

    def dump_logs(self, lines: int = 30) -> None:
        for log in sorted(self.log_dir.glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            print(f"----- {log.name} -----", file=sys.stderr)
            print("\n".join(tail), file=sys.stderr)


def process_rss_kib(pid: int) -> int | None:
    """VmRSS of a process in KiB, or None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def far_apart(hosts: Sequence[EmulatedHost]) -> tuple[list[EmulatedHost], EmulatedHost]:
    """Two servers and a client spread over the host list (topologies list hosts root-side first, leaves last):
    the last host, the one in the middle, and the first as client. With fewer than 3 hosts one server."""
    if len(hosts) < 3:
        return [hosts[-1]], hosts[0]
    return [hosts[-1], hosts[len(hosts) // 2]], hosts[0]


def run_checks(net, topo, workdir: Path, agent: str, data_dir: str, args, ping_only: bool = False, daemon_env: dict[str, str] | None = None) -> int:
    """The steps Mininet and containernet runs share: start the network, ping all, start agents on every host, wait
    for one tree (timed) and for every machine's subnet grant, measure the agents' memory, run a web service with
    instances on two far-apart hosts and fetch it from a third by name (rr, each instance) and by ServiceIP. Stops
    agents and network and removes `workdir` whatever happens. SIGTERM/SIGHUP unwind like Ctrl-C so the cleanup
    runs. Prints a `figures {json}` line with what it measured. Returns the process exit code."""
    import shutil
    import signal

    def unwind(signum, _frame):
        raise SystemExit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, unwind)

    driver = None
    ok = False
    figures: dict[str, object] = {"topology": topo.name, "agents": len(topo.hosts)}
    try:
        net.start()
        loss = net.pingAll(timeout=2)
        if loss > 0:
            raise TestbedError(f"underlay ping loss {loss}%")
        print(f"underlay: all {len(topo.hosts)} hosts reach each other", flush=True)
        if ping_only:
            ok = True
            return 0
        hosts = [EmulatedHost(h.name, net.get(h.name), net.get(h.name).IP(), h.position) for h in topo.hosts]
        driver = OverlayDriver(agent, data_dir, workdir / "logs", daemon_env=daemon_env)
        started = time.monotonic()
        driver.start_overlay(hosts, stagger=getattr(args, "stagger", 0.0))
        driver.wait_one_tree(hosts, args.timeout)
        figures["tree_formed_s"] = round(time.monotonic() - started, 1)
        print(f"overlay: one tree over {len(hosts)} agents {figures['tree_formed_s']} s after the first agent started", flush=True)
        # A snapshot could catch a tree that is still rearranging: it must still be one tree a little later.
        time.sleep(5)
        statuses = driver.wait_one_tree(hosts, args.timeout)
        figures["tree_stable_s"] = round(time.monotonic() - started, 1)
        roles = [tree_view(s)["role"] for s in statuses.values()]
        figures["coordinators"] = roles.count("coordinator")
        print(f"overlay: still one tree 5 s later (root, {figures['coordinators']} coordinators, {roles.count('leaf')} leaves)", flush=True)
        total, biggest = driver.total_rss_kib()
        figures["rss_total_mib"] = round(total / 1024, 1)
        figures["rss_max_mib"] = round(biggest / 1024, 1)
        print(f"memory: the {len(hosts)} agents use {figures['rss_total_mib']} MiB RSS in total (largest {figures['rss_max_mib']} MiB)", flush=True)

        subnets = driver.wait_subnets(hosts, args.timeout)
        figures["subnets_granted_s"] = round(time.monotonic() - started, 1)
        print(f"addresses: every machine holds a subnet from the tree {figures['subnets_granted_s']} s after the start", flush=True)
        # Grants may still move (overlaps found and renumbered): wait until they stay put for 5 s.
        renumbered = set()
        while True:
            time.sleep(5)
            latest = driver.wait_subnets(hosts, args.timeout)
            if latest == subnets:
                break
            renumbered |= {name for name in latest if latest[name] != subnets.get(name)}
            subnets = latest
            if time.monotonic() - started > 3 * args.timeout:
                raise TestbedError(f"subnets still moving after {3 * args.timeout:.0f}s (renumbered: {sorted(renumbered)})")
        figures["subnets_stable_s"] = round(time.monotonic() - started - 5, 1)
        figures["renumbered_machines"] = len(renumbered)
        print(f"addresses: stable {figures['subnets_stable_s']} s after the start ({len(renumbered)} machines renumbered meanwhile)", flush=True)

        servers, client = far_apart(hosts)
        service = args.service
        app, appns, _svc, svcns = service.split(".")
        client_service = f"{app}.{appns}.client.{svcns}"
        # The first instance deploys the service; the others start once its host resolves it (`agent run` of a
        # service the tree does not know yet, on two machines at once, left the service without ServiceIPs).
        for number, server in enumerate(servers):
            driver.run_service(server, service, ["python3", "-c", WEB_SERVER, server.name], instance=number)
            if number == 0:
                wait_for(lambda: driver.resolve(server, f"{service}.any.rr"), args.timeout, f"{service} deployed from {server.name}")
        print(f"service: {service} instances on {', '.join(s.name for s in servers)}; client on {client.name}", flush=True)
        traffic_started = time.monotonic()
        service_ip = wait_for(lambda: driver.resolve(client, f"{service}.any.rr"), args.timeout, f"{service}.any.rr to resolve on {client.name}")
        rr_url = f"http://{service}.any.rr:{HTTP_PORT}/"
        reply = driver.fetch(
            client,
            client_service,
            [f"http://{service}.{n}.none:{HTTP_PORT}/" for n in range(len(servers))] + [rr_url],
            [("rr", rr_url, 2 * len(servers)), ("ServiceIP", f"http://{service_ip}:{HTTP_PORT}/", len(servers))],
            args.timeout,
        )
        figures["service_reachable_s"] = round(time.monotonic() - traffic_started, 1)
        results = reply["results"]
        for r in results:
            print(f"  {client.name} {r['label']:<9} {r['url']:<46} -> {r['answer']} ({r['ms']} ms)", flush=True)
        failed = [r for r in results if r["ms"] is None]
        if failed:
            raise TestbedError(f"{len(failed)} of {len(results)} fetches failed: {failed[0]['answer']}")
        answered = {r["answer"] for r in results if r["label"] == "rr"}
        expected = {f"hello from {s.name}" for s in servers}
        if answered != expected:
            raise TestbedError(f"rr reached {sorted(answered)}, expected every instance {sorted(expected)}")
        latencies = sorted(r["ms"] for r in results)
        figures["fetch_ms_median"] = latencies[len(latencies) // 2]
        print(f"service: rr reached every instance; by name and by ServiceIP {service_ip}; reachable "
              f"{figures['service_reachable_s']} s after the instances started", flush=True)
        total, biggest = driver.total_rss_kib()
        figures["rss_total_after_traffic_mib"] = round(total / 1024, 1)
        print(f"memory after traffic: {figures['rss_total_after_traffic_mib']} MiB RSS in total", flush=True)
        ok = True
        return 0
    except TestbedError as err:
        print(f"FAILED: {err}", file=sys.stderr)
        if driver:
            driver.dump_logs()
        return 1
    finally:
        print(f"figures {json.dumps(figures)}", flush=True)
        if driver:
            driver.stop_all()
        net.stop()
        # CANOPY_TESTBED_KEEP=1 keeps the agents' logs and data dirs for debugging, as in the netns testbeds.
        if os.environ.get("CANOPY_TESTBED_KEEP") == "1":
            print(f"kept {workdir} (CANOPY_TESTBED_KEEP=1)", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        print("PASS" if ok else "FAIL", flush=True)
