"""Drive Canopy agents on emulated hosts that offer a `popen(argv, **kwargs)` (Mininet and containernet hosts).

Shared by `mininet/run.py` and `containernet/run.py`: start the first agent, join the others with the command it
prints, wait for one tree, run a service and check that a client reaches it through its ServiceIP.
The namespace testbed (`netns/canopy_netns.py`) has the same steps built in; the parsing and tree checks are shared.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent / "netns"))

from canopy_netns import DEFAULT_P2P_PORT, GiveUp, TestbedError, check_one_tree, parse_join_command, terminate  # noqa: E402
from canopy_netns import Testbed  # noqa: E402

wait_for = Testbed.wait_for


@dataclass
class EmulatedHost:
    name: str
    handle: Any  # a Mininet/containernet host: has popen(argv, stdout=..., stderr=...)
    ip: str
    position: tuple[float, float] | None


class OverlayDriver:
    """Agents on a set of hosts. `agent` and `data_root` are paths as seen from inside the hosts."""

    def __init__(self, agent: str, data_root: str, log_dir: Path):
        self.agent = agent
        self.data_root = data_root.rstrip("/")
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.daemons: dict[str, tuple[subprocess.Popen, Path]] = {}
        self.background: list[subprocess.Popen] = []

    def data_dir(self, host: EmulatedHost) -> str:
        return f"{self.data_root}/{host.name}"

    def _popen(self, host: EmulatedHost, argv: Sequence[str], log_name: str) -> tuple[subprocess.Popen, Path]:
        log_path = self.log_dir / f"{log_name}.log"
        with open(log_path, "ab") as log:
            proc = host.handle.popen(list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
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

    def start_overlay(self, hosts: Sequence[EmulatedHost], join_timeout: float = 30) -> None:
        """`agent start` on the first host, `agent join` with its printed join command on the rest."""
        first = hosts[0]
        self.daemons[first.name] = self._popen(first, self._daemon_argv(first, ["start"]), f"agent-{first.name}")
        proc, log_path = self.daemons[first.name]

        def join_args():
            if proc.poll() is not None:
                raise GiveUp(f"the first agent exited with code {proc.returncode}; see {log_path}")
            return parse_join_command(log_path.read_text(errors="replace"))

        args = wait_for(join_args, join_timeout, f"the join command in {log_path}")
        for host in hosts[1:]:
            self.daemons[host.name] = self._popen(host, self._daemon_argv(host, ["join", *args]), f"agent-{host.name}")

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

    def run_service(self, host: EmulatedHost, service: str, cmd: Sequence[str]) -> subprocess.Popen:
        argv = [self.agent, "run", "--data-dir", self.data_dir(host), "--service", service, "--", *cmd]
        proc, _ = self._popen(host, argv, f"service-{host.name}-{service}")
        self.background.append(proc)
        return proc

    def resolve(self, host: EmulatedHost, name: str) -> str:
        """The first IPv4 address `agent resolve NAME` prints."""
        result = self.call(host, "resolve", name)
        match = re.search(r"\b(\d{1,3}(?:\.\d{1,3}){3})\b", result.stdout)
        if result.returncode != 0 or not match:
            raise TestbedError(f"resolve {name} on {host.name}: {result.stderr.strip() or result.stdout.strip()}")
        return match.group(1)

    def check_http_through_overlay(self, server: EmulatedHost, client: EmulatedHost, service: str, resolve_name: str, timeout: float = 60) -> str:
        """Run a web server as `service` on `server`, then fetch it from a client service on `client` through the
        ServiceIP; returns what the client printed. Raises TestbedError when no reply arrives within `timeout`."""
        self.run_service(server, service, ["python3", "-m", "http.server", "8080"])
        service_ip = wait_for(lambda: self.resolve(client, resolve_name), timeout, f"{resolve_name} to resolve")
        fetch = (
            "import urllib.request; "
            f"print('HTTP', urllib.request.urlopen('http://{service_ip}:8080/', timeout=5).status)"
        )
        app, appns, _svc, svcns = service.split(".")
        client_service = f"{app}.{appns}.client.{svcns}"

        def fetched():
            argv = [self.agent, "run", "--data-dir", self.data_dir(client), "--service", client_service, "--", "python3", "-c", fetch]
            proc = client.handle.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            out, _ = proc.communicate(timeout=30)
            text = out.decode(errors="replace") if isinstance(out, bytes) else out
            if "HTTP 200" not in text:
                raise TestbedError(f"client output: {text.strip()[-300:]}")
            return text

        return wait_for(fetched, timeout, f"an HTTP reply from {service} ({service_ip}) to {client.name}", interval=2.0)

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


def run_checks(net, topo, workdir: Path, agent: str, data_dir: str, args, ping_only: bool = False) -> int:
    """The steps Mininet and containernet runs share: start the network, ping all, start agents on every host, wait
    for one tree, fetch a service through the overlay; stop agents and network and remove `workdir` whatever
    happens. SIGTERM/SIGHUP unwind like Ctrl-C so the cleanup runs. Returns the process exit code."""
    import shutil
    import signal

    def unwind(signum, _frame):
        raise SystemExit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, unwind)

    driver = None
    ok = False
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
        driver = OverlayDriver(agent, data_dir, workdir / "logs")
        driver.start_overlay(hosts)
        driver.wait_one_tree(hosts, args.timeout)
        print("overlay: one tree", flush=True)
        resolve_name = args.resolve_name or f"{args.service}.any.rr"
        reply = driver.check_http_through_overlay(hosts[-1], hosts[0], args.service, resolve_name, args.timeout)
        print(f"service: {hosts[0].name} reached {args.service} on {hosts[-1].name}: {reply.strip()}", flush=True)
        ok = True
        return 0
    except TestbedError as err:
        print(f"FAILED: {err}", file=sys.stderr)
        if driver:
            driver.dump_logs()
        return 1
    finally:
        if driver:
            driver.stop_all()
        net.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        print("PASS" if ok else "FAIL", flush=True)
