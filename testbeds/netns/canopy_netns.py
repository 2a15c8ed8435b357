"""Network-namespace testbeds for Canopy: emulated machines on one Linux host.

Every emulated machine ("host"), router and NAT router is a network namespace. Underlay segments are Linux
bridges that live in one extra "underlay" namespace, so nothing is created in the root namespace and tearing a
testbed down is: stop our processes, delete our namespaces, delete the temp dir. All names start with a prefix
that is unique per run (``cnp<pid>x<n>-``), so concurrent testbeds never collide and leftovers are easy to find.

Typical use (as root)::

    with Testbed() as tb:
        wan = tb.add_segment("wan")
        lan = tb.add_segment("lan", public=False)
        h1 = tb.add_host("h1", wan, position=(48.14, 11.58))
        h2 = tb.add_host("h2", lan, position=(48.20, 11.60))
        tb.add_nat_router("nat", wan=wan, lan=lan)
        tb.ping(h2, h1.ip)
        tb.start_overlay([h1, h2])
        tb.wait_one_tree([h1, h2], timeout=60)

Addressing: public segments get 198.18.<n>.0/24 (RFC 2544 benchmarking range), private (NAT LAN) segments
192.168.<n>.0/24. Public hosts get routes to every public segment (computed over the routers); hosts on a private
segment get a default route via their NAT router. There is no artificial delay (no netem on the CI kernel);
bandwidth limits use tc htb or tbf.

Only the Python 3 standard library is used. Requires root, ``ip`` (iproute2), ``nft`` for NAT and ``tc`` for
bandwidth limits.
"""

from __future__ import annotations

import atexit
import collections
import http.client
import ipaddress
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TUNNEL_PORT = 50103
DEFAULT_P2P_PORT = 4001
# Seconds an agent gets to shut down cleanly (leave the tree, remove its namespaces) before SIGKILL.
GRACEFUL_STOP_SECONDS = 5.0


class TestbedError(RuntimeError):
    """A testbed step failed; the message says which command and why."""


class GiveUp(TestbedError):
    """Raised by a `wait_for` condition when waiting longer cannot help (e.g. the process it waits on died)."""


def missing_privileges() -> str | None:
    """Why testbeds cannot run here, or None when they can (root and the needed tools present)."""
    if os.geteuid() != 0:
        return "network-namespace testbeds need root (run as root or with sudo)"
    for tool in ("ip", "nft", "tc"):
        if shutil.which(tool) is None:
            return f"the `{tool}` command is missing (install iproute2 and nftables)"
    return None


def run(cmd: Sequence[str], *, check: bool = True, timeout: float = 30, input: str | None = None) -> subprocess.CompletedProcess:
    """Run a command, capturing output; on failure raise TestbedError with the command and its stderr."""
    try:
        result = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, input=input)
    except subprocess.TimeoutExpired as err:
        raise TestbedError(f"`{shlex.join(cmd)}` did not finish within {timeout}s") from err
    except FileNotFoundError as err:
        raise TestbedError(f"`{cmd[0]}` is not installed") from err
    if check and result.returncode != 0:
        raise TestbedError(
            f"`{shlex.join(cmd)}` failed with exit code {result.returncode}: {result.stderr.strip() or result.stdout.strip()}"
        )
    return result


def list_netns() -> list[str]:
    """Names of all named network namespaces (those under /run/netns)."""
    out = run(["ip", "-json", "netns", "list"], check=False).stdout.strip()
    if not out:
        return []
    return [entry["name"] for entry in json.loads(out)]


def _netns_pids(netns: str) -> list[int]:
    out = run(["ip", "netns", "pids", netns], check=False).stdout
    return [int(tok) for tok in out.split() if tok.isdigit()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Segment:
    """An underlay L2 segment: a bridge in the underlay namespace with one subnet."""

    name: str
    bridge: str
    subnet: ipaddress.IPv4Network
    public: bool
    attachments: list["Attachment"] = field(default_factory=list)
    _next_host: int = 1

    def allocate(self) -> ipaddress.IPv4Address:
        if self._next_host >= self.subnet.num_addresses - 1:
            raise TestbedError(f"segment {self.name} ({self.subnet}) has no free addresses")
        address = self.subnet.network_address + self._next_host
        self._next_host += 1
        return address


@dataclass
class Attachment:
    """One interface of a node on a segment."""

    node: "Node"
    segment: Segment
    iface: str
    address: ipaddress.IPv4Address


@dataclass
class Node:
    """A namespace on the underlay: a host (runs an agent), a router or a NAT router."""

    name: str
    netns: str
    kind: str  # "host" | "router" | "nat"
    position: tuple[float, float] | None = None
    attachments: list[Attachment] = field(default_factory=list)

    @property
    def ip(self) -> str:
        """The address of the first interface (the one an agent listens on)."""
        if not self.attachments:
            raise TestbedError(f"{self.name} is not attached to any segment")
        return str(self.attachments[0].address)

    def address_on(self, segment: Segment) -> ipaddress.IPv4Address:
        for att in self.attachments:
            if att.segment is segment:
                return att.address
        raise TestbedError(f"{self.name} has no interface on segment {segment.name}")


@dataclass
class Agent:
    """A running `agent start` / `agent join` daemon inside a host."""

    host: Node
    data_dir: Path
    log_path: Path
    process: subprocess.Popen


# Testbeds alive in this process, torn down by atexit and the signal handlers if their owner could not.
_ACTIVE: list["Testbed"] = []
_ACTIVE_LOCK = threading.Lock()
_HANDLERS_INSTALLED = False
_INSTANCE_COUNTER = itertools.count()


def _teardown_all() -> None:
    with _ACTIVE_LOCK:
        active = list(_ACTIVE)
    for tb in active:
        tb.teardown()


def _on_signal(signum, _frame) -> None:
    # Unwind normally (context managers run); atexit is the fallback if something swallows SystemExit.
    raise SystemExit(128 + signum)


def _install_handlers() -> None:
    global _HANDLERS_INSTALLED
    if _HANDLERS_INSTALLED:
        return
    _HANDLERS_INSTALLED = True
    atexit.register(_teardown_all)
    if threading.current_thread() is not threading.main_thread():
        return
    # SIGINT already raises KeyboardInterrupt, which unwinds the `with` block.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) in (signal.SIG_DFL, None):
            signal.signal(signum, _on_signal)


class Testbed:
    """A set of namespaces, links and processes that is removed completely on exit, failure or signal."""

    def __init__(self, prefix: str | None = None, agent_binary: str | os.PathLike | None = None, keep: bool | None = None):
        self.prefix = prefix or f"cnp{os.getpid()}x{next(_INSTANCE_COUNTER)}"
        if not re.fullmatch(r"[a-z][a-z0-9]{1,15}", self.prefix):
            raise TestbedError(f"bad prefix {self.prefix!r}: use 2-16 lowercase letters/digits")
        self.underlay_netns = f"{self.prefix}-underlay"
        self.agent_binary = Path(agent_binary) if agent_binary else None
        # CANOPY_TESTBED_KEEP=1 keeps the temp dir (logs, data dirs) for debugging; namespaces always go.
        self.keep = keep if keep is not None else os.environ.get("CANOPY_TESTBED_KEEP") == "1"
        self.workdir: Path | None = None
        self.segments: dict[str, Segment] = {}
        self.nodes: dict[str, Node] = {}
        self.agents: dict[str, Agent] = {}
        self._agent_launches: dict[str, int] = {}
        self.processes: list[tuple[str, subprocess.Popen, Path | None]] = []
        self._netns_created: list[str] = []
        self._veth_counter = itertools.count()
        self._routes_dirty = False
        self._torn_down = False
        self._started = False

    # ----- lifecycle -------------------------------------------------------------------------------------------

    def __enter__(self) -> "Testbed":
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and issubclass(exc_type, Exception):  # not for Ctrl-C or SystemExit
            self.dump_logs()
        self.teardown()

    def start(self) -> None:
        reason = missing_privileges()
        if reason:
            raise TestbedError(reason)
        if self._started:
            return
        self._started = True
        _install_handlers()
        with _ACTIVE_LOCK:
            _ACTIVE.append(self)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        self._add_netns(self.underlay_netns)

    def teardown(self) -> list[str]:
        """Stop every process, delete every namespace (ours and any named with our prefix), remove the temp dir.

        Idempotent and best effort: each step runs even if an earlier one failed. Returns the problems seen.
        """
        if self._torn_down:
            return []
        self._torn_down = True
        problems: list[str] = []
        # Agents first and gently, so they can leave the tree and remove the service namespaces they made.
        for agent in self.agents.values():
            terminate(agent.process, GRACEFUL_STOP_SECONDS)
        for _, proc, _ in self.processes:
            terminate(proc, 1.0)
        ours = set(self._netns_created)
        ours.update(name for name in list_netns() if name.startswith(self.prefix + "-"))
        # Hosts before the underlay so their processes go before the links they use.
        for netns in sorted(ours, key=lambda n: n == self.underlay_netns):
            for pid in _netns_pids(netns):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            result = run(["ip", "netns", "delete", netns], check=False)
            if result.returncode != 0 and netns in list_netns():
                problems.append(f"could not delete netns {netns}: {result.stderr.strip()}")
        if self.workdir and self.workdir.exists():
            if self.keep:
                print(f"[testbed] kept {self.workdir} (CANOPY_TESTBED_KEEP=1)", file=sys.stderr)
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)
        with _ACTIVE_LOCK:
            if self in _ACTIVE:
                _ACTIVE.remove(self)
        for problem in problems:
            print(f"[testbed] teardown: {problem}", file=sys.stderr)
        return problems

    def leftovers(self) -> list[str]:
        """Namespaces and root-namespace links that still carry this testbed's prefix (empty after teardown)."""
        found = [f"netns {n}" for n in list_netns() if n.startswith(self.prefix + "-")]
        links = json.loads(run(["ip", "-json", "link", "show"], check=False).stdout or "[]")
        found += [f"link {link['ifname']}" for link in links if link.get("ifname", "").startswith(self.prefix)]
        if self.workdir and self.workdir.exists() and not self.keep:
            found.append(f"dir {self.workdir}")
        return found

    def dump_logs(self, lines: int = 40) -> None:
        """Print the tail of every log file, to explain a failure before the temp dir goes."""
        if not self.workdir or not self.workdir.exists():
            return
        for log in sorted(self.workdir.rglob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            print(f"----- {log.relative_to(self.workdir)} (last {len(text)} lines) -----", file=sys.stderr)
            for line in text:
                print(line, file=sys.stderr)

    # ----- topology --------------------------------------------------------------------------------------------

    def _add_netns(self, name: str) -> None:
        run(["ip", "netns", "add", name])
        self._netns_created.append(name)
        run(["ip", "-n", name, "link", "set", "lo", "up"])

    def add_segment(self, name: str, public: bool = True, subnet: str | None = None) -> Segment:
        """An underlay segment (a bridge). Public segments are routed between each other; private ones sit behind
        a NAT router."""
        self._require_started()
        if name in self.segments:
            raise TestbedError(f"segment {name} exists already")
        index = len(self.segments)
        if subnet is None:
            if index > 255:
                raise TestbedError("at most 256 segments with automatic subnets")
            subnet = f"198.18.{index}.0/24" if public else f"192.168.{index}.0/24"
        bridge = f"br{index}"
        run(["ip", "-n", self.underlay_netns, "link", "add", bridge, "type", "bridge"])
        run(["ip", "-n", self.underlay_netns, "link", "set", bridge, "up"])
        segment = Segment(name, bridge, ipaddress.ip_network(subnet), public)
        self.segments[name] = segment
        return segment

    def _add_node(self, name: str, kind: str, position: tuple[float, float] | None = None) -> Node:
        self._require_started()
        if not re.fullmatch(r"[A-Za-z0-9_]{1,32}", name):
            raise TestbedError(f"bad node name {name!r}: use up to 32 letters, digits or _")
        if name in self.nodes:
            raise TestbedError(f"node {name} exists already")
        node = Node(name, f"{self.prefix}-{name}", kind, position)
        self._add_netns(node.netns)
        self.nodes[name] = node
        return node

    def attach(self, node: Node, segment: Segment, address: str | None = None) -> Attachment:
        """Connect a node to a segment with a veth pair (ethN inside the node, a bridge port in the underlay)."""
        iface = f"eth{len(node.attachments)}"
        port = f"p{next(self._veth_counter)}"
        addr = ipaddress.ip_address(address) if address else segment.allocate()
        run(["ip", "link", "add", port, "netns", self.underlay_netns, "type", "veth", "peer", "name", iface, "netns", node.netns])
        run(["ip", "-n", self.underlay_netns, "link", "set", port, "master", segment.bridge, "up"])
        run(["ip", "-n", node.netns, "addr", "add", f"{addr}/{segment.subnet.prefixlen}", "dev", iface])
        run(["ip", "-n", node.netns, "link", "set", iface, "up"])
        att = Attachment(node, segment, iface, addr)
        node.attachments.append(att)
        segment.attachments.append(att)
        self._routes_dirty = True
        return att

    def add_host(self, name: str, segment: Segment, position: tuple[float, float] | None = None) -> Node:
        """An emulated machine on a segment; `position` (lat, lon) is passed to its agent."""
        node = self._add_node(name, "host", position)
        self.attach(node, segment)
        return node

    def add_router(self, name: str, segments: Iterable[Segment]) -> Node:
        """A plain IP router joining public segments."""
        node = self._add_node(name, "router")
        for segment in segments:
            if not segment.public:
                raise TestbedError(f"router {name}: segment {segment.name} is private; use add_nat_router")
            self.attach(node, segment)
        self._enable_forwarding(node)
        return node

    def add_nat_router(self, name: str, wan: Segment, lan: Segment) -> Node:
        """A NAT router: hosts on the private `lan` reach the public side masqueraded behind its `wan` address;
        nothing from outside reaches the LAN unless it answers a connection made from inside."""
        if not wan.public or lan.public:
            raise TestbedError(f"NAT router {name}: wan must be public and lan private")
        node = self._add_node(name, "nat")
        wan_iface = self.attach(node, wan).iface
        lan_iface = self.attach(node, lan).iface
        self._enable_forwarding(node)
        ruleset = f"""
table ip canopy_nat {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "{wan_iface}" masquerade
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "{lan_iface}" oifname "{wan_iface}" accept
    }}
}}
"""
        run(["ip", "netns", "exec", node.netns, "nft", "-f", "-"], input=ruleset)
        return node

    def forward_port(self, nat: Node, port: int, host: Node, proto: str = "udp") -> str:
        """Forward `proto` port `port` on the NAT router's public address to `host` behind it (the operator's port
        forward of seed 002 section 4.3.3). Returns the public `ip:port` to advertise."""
        if nat.kind != "nat" or len(nat.attachments) < 2:
            raise TestbedError(f"{nat.name} is not a NAT router")
        wan, lan = nat.attachments[0], nat.attachments[1]
        if proto not in ("udp", "tcp"):
            raise TestbedError(f"cannot forward protocol {proto!r}")
        rules = f"""
table ip canopy_nat {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname "{wan.iface}" {proto} dport {port} dnat to {host.ip}:{port}
    }}
    chain forward {{
        iifname "{wan.iface}" oifname "{lan.iface}" ip daddr {host.ip} {proto} dport {port} accept
    }}
}}
"""
        run(["ip", "netns", "exec", nat.netns, "nft", "-f", "-"], input=rules)
        return f"{wan.address}:{port}"

    def _enable_forwarding(self, node: Node) -> None:
        run(["ip", "netns", "exec", node.netns, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])

    def install_routes(self) -> None:
        """(Re)compute static routes: shortest router paths between public segments, NAT LANs default via NAT."""
        for node in self.nodes.values():
            for dest, via, dev in self._routes_for(node):
                cmd = ["ip", "-n", node.netns, "route", "replace", dest]
                cmd += ["via", str(via), "dev", dev] if via else ["dev", dev]
                run(cmd)
        self._routes_dirty = False

    def _routes_for(self, node: Node) -> list[tuple[str, ipaddress.IPv4Address | None, str]]:
        routes: list[tuple[str, ipaddress.IPv4Address | None, str]] = []
        public_atts = [a for a in node.attachments if a.segment.public]
        if node.kind == "host" and not public_atts:
            # Behind NAT: everything goes to the NAT router of the LAN.
            for att in node.attachments:
                nat = [a for a in att.segment.attachments if a.node.kind == "nat"]
                if nat:
                    routes.append(("default", nat[0].address, att.iface))
                    break
            return routes
        # Breadth-first search over public segments and the routers (plain or NAT, by their WAN side) joining them.
        first_hop: dict[str, tuple[ipaddress.IPv4Address, str]] = {}
        seen = {a.segment.name for a in public_atts}
        queue = collections.deque()
        for att in public_atts:
            for other in att.segment.attachments:
                if other.node is not node and other.node.kind == "router":
                    queue.append((other.node, (other.address, att.iface)))
        visited_routers = set()
        while queue:
            router, hop = queue.popleft()
            if router.name in visited_routers:
                continue
            visited_routers.add(router.name)
            for ratt in router.attachments:
                seg = ratt.segment
                if not seg.public or seg.name in seen:
                    continue
                seen.add(seg.name)
                first_hop[seg.name] = hop
                for other in seg.attachments:
                    if other.node.kind == "router" and other.node.name not in visited_routers:
                        queue.append((other.node, hop))
        for seg_name, (via, dev) in sorted(first_hop.items()):
            routes.append((str(self.segments[seg_name].subnet), via, dev))
        if node.kind == "host" and public_atts:
            # A default route lets programs find their outward address (connect a UDP socket anywhere).
            att = public_atts[0]
            routers = [a for a in att.segment.attachments if a.node.kind == "router"]
            routes.append(("default", routers[0].address if routers else None, att.iface))
        return routes

    def _ensure_routes(self) -> None:
        if self._routes_dirty:
            self.install_routes()

    def limit_bandwidth(self, node: Node, rate_mbit: float, iface: str = "eth0", qdisc: str = "htb", both_directions: bool = True) -> None:
        """Shape `iface` of `node` to `rate_mbit` with tc htb or tbf; with both_directions also the traffic towards it
        (on the underlay side of its veth). No netem: this kernel has no artificial delay or loss."""
        if rate_mbit <= 0:
            raise TestbedError(f"rate must be positive, got {rate_mbit}")
        att = next((a for a in node.attachments if a.iface == iface), None)
        if att is None:
            raise TestbedError(f"{node.name} has no interface {iface}")
        targets = [(node.netns, iface)]
        if both_directions:
            targets.append((self.underlay_netns, self._underlay_port(node.netns, iface)))
        rate = f"{rate_mbit}mbit"
        for netns, dev in targets:
            base = ["ip", "netns", "exec", netns, "tc"]
            if qdisc == "htb":
                run(base + ["qdisc", "replace", "dev", dev, "root", "handle", "1:", "htb", "default", "10"])
                run(base + ["class", "replace", "dev", dev, "parent", "1:", "classid", "1:10", "htb", "rate", rate, "ceil", rate])
            elif qdisc == "tbf":
                # Burst must hold at least one timer tick of traffic; 32 KiB is enough up to a few hundred Mbit/s.
                run(base + ["qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", "32kb", "latency", "100ms"])
            else:
                raise TestbedError(f"unknown qdisc {qdisc!r}: use htb or tbf")

    def clear_bandwidth(self, node: Node, iface: str = "eth0") -> None:
        for netns, dev in ((node.netns, iface), (self.underlay_netns, self._underlay_port(node.netns, iface))):
            run(["ip", "netns", "exec", netns, "tc", "qdisc", "del", "dev", dev, "root"], check=False)

    def _underlay_port(self, netns: str, iface: str) -> str:
        # The veth peer of iface: its peer ifindex, looked up among the underlay's links.
        info = json.loads(run(["ip", "-n", netns, "-json", "link", "show", iface]).stdout)[0]
        peer_index = info.get("link_index")
        for link in json.loads(run(["ip", "-n", self.underlay_netns, "-json", "link", "show"]).stdout):
            if link.get("ifindex") == peer_index:
                return link["ifname"]
        raise TestbedError(f"no underlay port found for {iface} in {netns}")

    def set_link(self, node: Node, up: bool, iface: str = "eth0") -> None:
        """Cut or restore a node's link (from the underlay side, so the node sees carrier loss as a real machine)."""
        port = self._underlay_port(node.netns, iface)
        run(["ip", "-n", self.underlay_netns, "link", "set", port, "up" if up else "down"])

    # ----- commands and processes ------------------------------------------------------------------------------

    def exec(self, node: Node, cmd: Sequence[str] | str, check: bool = True, timeout: float = 30, input: str | None = None) -> subprocess.CompletedProcess:
        """Run a command inside a node and wait for it."""
        self._ensure_routes()
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        return run(["ip", "netns", "exec", node.netns, *argv], check=check, timeout=timeout, input=input)

    def spawn(self, node: Node, cmd: Sequence[str], log_name: str | None = None, env: dict[str, str] | None = None, share_mounts: bool = False) -> subprocess.Popen:
        """Start a background process inside a node, output to a log file in the temp dir; stopped at teardown.

        `ip netns exec` gives the process a mount namespace of its own, so network namespaces it mounts under
        /run/netns are seen only by itself and its children. With `share_mounts` the process enters only the
        node's network namespace (nsenter) and stays in the machine's mount namespace, as a daemon on a real
        machine does: agents use it, so the service namespaces they create outlive them and a restarted agent
        (and `agent run`) finds them."""
        self._require_started()
        self._ensure_routes()
        log_path = self.workdir / "logs" / f"{log_name or node.name + '-' + Path(cmd[0]).name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "ab")
        enter = ["nsenter", f"--net=/run/netns/{node.netns}", "--"] if share_mounts else ["ip", "netns", "exec", node.netns]
        proc = subprocess.Popen(
            [*enter, *cmd],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # own process group: we stop it and its children together
            env={**os.environ, **(env or {})},
        )
        log.close()
        self.processes.append((node.name, proc, log_path))
        return proc

    def ping(self, src: Node, dst_ip: str, count: int = 1, timeout: float = 5, check: bool = True) -> bool:
        """Ping from a node; raise (or return False when check=False) if no reply arrives."""
        result = self.exec(src, ["ping", "-n", "-c", str(count), "-W", str(max(1, int(timeout))), dst_ip], check=False, timeout=timeout * count + 5)
        if check and result.returncode != 0:
            raise TestbedError(f"ping {src.name} -> {dst_ip} failed: {result.stdout.strip()[-300:]}")
        return result.returncode == 0

    @staticmethod
    def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.5) -> object:
        """Poll `condition` until it returns something truthy (returned) or `timeout` seconds pass (TestbedError).
        Exceptions raised by the condition count as "not yet" and the last one is reported on timeout."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while True:
            try:
                value = condition()
                if value:
                    return value
            except GiveUp:
                raise
            except Exception as err:  # noqa: BLE001 - any failure means "not yet"; reported on timeout
                last_error = err
            if time.monotonic() >= deadline:
                detail = f" (last error: {last_error})" if last_error else ""
                raise TestbedError(f"timed out after {timeout}s waiting for {what}{detail}")
            time.sleep(interval)

    # ----- agents ----------------------------------------------------------------------------------------------

    def find_agent_binary(self) -> Path:
        """$CANOPY_AGENT, else the workspace's target/{debug,release}/agent."""
        if self.agent_binary:
            candidates = [self.agent_binary]
        elif os.environ.get("CANOPY_AGENT"):
            candidates = [Path(os.environ["CANOPY_AGENT"])]
        else:
            candidates = [REPO_ROOT / "target" / "debug" / "agent", REPO_ROOT / "target" / "release" / "agent"]
        existing = [c for c in candidates if c.is_file() and os.access(c, os.X_OK)]
        if not existing:
            raise TestbedError(
                f"no agent binary at {', '.join(map(str, candidates))}: build it with `cargo build -p canopy-agent` "
                "or set CANOPY_AGENT"
            )
        # The newest build wins when both debug and release exist.
        return max(existing, key=lambda p: p.stat().st_mtime)

    def data_dir(self, host: Node) -> Path:
        return self.workdir / "agents" / host.name

    def _agent_argv(self, host: Node, subcommand: list[str], listen: Sequence[str] | None, extra_args: Sequence[str]) -> list[str]:
        argv = [str(self.find_agent_binary()), *subcommand, "--data-dir", str(self.data_dir(host))]
        if host.position is not None:
            argv += ["--position", f"{host.position[0]},{host.position[1]}"]
        for addr in listen if listen is not None else self.default_listen(host):
            argv += ["--listen", addr]
        return argv + list(extra_args)

    @staticmethod
    def default_listen(host: Node) -> list[str]:
        return [f"/ip4/{host.ip}/udp/{DEFAULT_P2P_PORT}/quic-v1", f"/ip4/{host.ip}/tcp/{DEFAULT_P2P_PORT}"]

    def _launch_agent(self, host: Node, argv: list[str]) -> Agent:
        if host.name in self.agents and self.agents[host.name].process.poll() is None:
            raise TestbedError(f"an agent is already running on {host.name}")
        data_dir = self.data_dir(host)
        data_dir.mkdir(parents=True, exist_ok=True)
        # CANOPY_NETNS_PREFIX asks the agent to name the service namespaces it creates under our prefix, so they
        # are unique per host and teardown finds them even if the agent dies without cleaning up.
        env = {"CANOPY_NETNS_PREFIX": f"{host.netns}-", "RUST_BACKTRACE": "1"}
        # One log per agent run, so a restarted agent does not overwrite what its predecessor said.
        launch = self._agent_launches[host.name] = self._agent_launches.get(host.name, 0) + 1
        proc = self.spawn(host, argv, log_name=f"agent-{host.name}-{launch}", env=env, share_mounts=True)
        agent = Agent(host, data_dir, self.processes[-1][2], proc)
        self.agents[host.name] = agent
        return agent

    def start_agent(self, host: Node, listen: Sequence[str] | None = None, extra_args: Sequence[str] = ()) -> Agent:
        """`agent start` on a host: the first node of a new overlay."""
        return self._launch_agent(host, self._agent_argv(host, ["start"], listen, extra_args))

    def join_agent(self, host: Node, join_args: Sequence[str], listen: Sequence[str] | None = None, extra_args: Sequence[str] = ()) -> Agent:
        """`agent join <join_args...>` on a host; join_args is what `join_command` returned (bootstrap + key flags)."""
        return self._launch_agent(host, self._agent_argv(host, ["join", *join_args], listen, extra_args))

    def join_command(self, first: Node, timeout: float = 30) -> list[str]:
        """The arguments after `agent join` that the first node printed (bootstrap address, network key flags),
        without any --data-dir/--position/--listen it suggested: those are per host."""
        agent = self.agents[first.name]

        def parse():
            if agent.process.poll() is not None:
                raise GiveUp(f"the agent on {first.name} exited with code {agent.process.returncode}; see its log")
            return parse_join_command(agent.log_path.read_text(errors="replace"))

        return self.wait_for(parse, timeout, f"the join command in {agent.log_path.name}")

    def start_overlay(self, hosts: Sequence[Node], join_timeout: float = 30, stagger: float = 0.0, extra_args: dict[str, Sequence[str]] | None = None) -> list[Agent]:
        """Start the first host's agent and join the others through it. `extra_args` adds flags per host name."""
        if not hosts:
            raise TestbedError("start_overlay needs at least one host")
        extra = extra_args or {}
        agents = [self.start_agent(hosts[0], extra_args=extra.get(hosts[0].name, ()))]
        join_args = self.join_command(hosts[0], timeout=join_timeout)
        for host in hosts[1:]:
            agents.append(self.join_agent(host, join_args, extra_args=extra.get(host.name, ())))
            if stagger:
                time.sleep(stagger)
        return agents

    def agent_cli(self, host: Node, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run an agent client command (status, tree, resolve, ...) against the agent of `host`."""
        return self.exec(host, [str(self.find_agent_binary()), *args, "--data-dir", str(self.data_dir(host))], check=check, timeout=timeout)

    def api(self, host: Node, method: str, path: str, body: object = None, timeout: float = 30) -> object:
        """One call to a host's agent API (HTTP with JSON over the Unix socket in its data dir); the parsed reply.
        The socket is a file, so this works from outside the host's namespace."""
        connection = _UnixHTTPConnection(str(self.data_dir(host) / "agent.sock"), timeout=timeout)
        try:
            payload = None if body is None else json.dumps(body).encode()
            connection.request(method, path, body=payload, headers={"content-type": "application/json"})
            response = connection.getresponse()
            text = response.read().decode(errors="replace")
        except OSError as err:
            raise TestbedError(f"{method} {path} on {host.name}'s agent: {err}") from err
        finally:
            connection.close()
        if response.status >= 300:
            raise TestbedError(f"{method} {path} on {host.name}'s agent: HTTP {response.status}: {text.strip()}")
        return json.loads(text) if text else None

    def status(self, host: Node) -> dict:
        """`agent status --json` of a host, parsed."""
        return json.loads(self.agent_cli(host, "status", "--json").stdout)

    def stop_agent(self, host: Node, kill: bool = False) -> None:
        """Stop a host's agent: SIGTERM and wait (kill=False), or SIGKILL at once to emulate a crash."""
        agent = self.agents.get(host.name)
        if agent is None:
            raise TestbedError(f"no agent on {host.name}")
        terminate(agent.process, 0 if kill else GRACEFUL_STOP_SECONDS)

    def run_service(self, host: Node, service: str, cmd: Sequence[str], instance: int | None = None, log_name: str | None = None, extra_args: Sequence[str] = ()) -> subprocess.Popen:
        """`agent run --service APP.APPNS.SVC.SVCNS [--instance N] [EXTRA_ARGS] -- CMD...` in the background on a host;
        its output goes to `logs/<log_name>.log` (default: named after host, service and instance)."""
        argv = [str(self.find_agent_binary()), "run", "--data-dir", str(self.data_dir(host)), "--service", service]
        if instance is not None:
            argv += ["--instance", str(instance)]
        argv += list(extra_args)
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", service)
        log_name = log_name or f"service-{host.name}-{safe}-{instance if instance is not None else 'x'}"
        return self.spawn(host, [*argv, "--", *cmd], log_name=log_name)

    def run_client(self, host: Node, service: str, cmd: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess:
        """`agent run --service ... -- CMD` in the foreground: CMD runs in a service namespace and is waited for."""
        argv = [str(self.find_agent_binary()), "--data-dir", str(self.data_dir(host)), "run", "--service", service, "--", *cmd]
        return self.exec(host, argv, check=False, timeout=timeout)

    def resolve(self, host: Node, name: str) -> str:
        """The first IPv4 address that `agent resolve NAME` prints on a host."""
        result = self.agent_cli(host, "resolve", name, check=False)
        match = re.search(r"\b(\d{1,3}(?:\.\d{1,3}){3})\b", result.stdout)
        if result.returncode != 0 or not match:
            raise TestbedError(f"resolve {name} on {host.name}: {result.stderr.strip() or result.stdout.strip()}")
        return match.group(1)

    def wait_one_tree(self, hosts: Sequence[Node], timeout: float = 60) -> dict[str, dict]:
        """Wait until the agents of `hosts` form one tree: one root, everyone else attached below it."""

        def check():
            statuses = {h.name: self.status(h) for h in hosts}
            check_one_tree(statuses)
            return statuses

        return self.wait_for(check, timeout, f"one tree over {len(hosts)} agents", interval=1.0)

    def wait_subnets(self, hosts: Sequence[Node], timeout: float = 60) -> dict[str, str]:
        """Wait until every host's agent reports the machine subnet the tree granted it, no two overlapping; the
        subnets by host name."""

        def check():
            subnets = {}
            for host in hosts:
                subnet = self.status(host).get("subnet")
                if not subnet:
                    raise TestbedError(f"{host.name} has no subnet yet")
                subnets[host.name] = subnet
            check_disjoint_subnets(subnets)
            return subnets

        return self.wait_for(check, timeout, f"subnet grants on {len(hosts)} agents", interval=1.0)

    def _require_started(self) -> None:
        if not self._started or self._torn_down:
            raise TestbedError("the testbed is not running (use it as a context manager or call start())")


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a Unix socket (the agent's local API)."""

    def __init__(self, socket_path: str, timeout: float):
        super().__init__("agent", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock


def terminate(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM the process (and its process group when it leads its own), wait `grace` seconds, then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    # Never signal our own group: only processes started in a new session get group-wide signals.
    own_group = pgid == os.getpgid(0)

    def send(sig: int) -> None:
        try:
            if own_group:
                os.kill(proc.pid, sig)
            else:
                os.killpg(pgid, sig)
        except ProcessLookupError:
            pass

    if grace > 0:
        send(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    send(signal.SIGKILL)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def parse_join_command(log_text: str) -> list[str] | None:
    """The arguments after `agent join` in the first `agent join ...` line of an agent's output (None if there is
    none yet), without the per-host flags. Shared by the netns, Mininet and containernet runners."""
    for line in _strip_ansi(log_text).splitlines():
        match = re.search(r"\bagent\s+join\s+(.+)$", line)
        if match:
            try:
                return _drop_per_host_flags(shlex.split(match.group(1).strip().rstrip("`'\"")))
            except ValueError:  # unbalanced quotes: a partly written line, try again later
                return None
    return None


def check_one_tree(statuses: dict[str, dict]) -> None:
    """Raise TestbedError unless the `agent status --json` outputs (by host name) show one tree: exactly one root
    and every other agent attached with the root among its ancestors, and no parent or ancestor outside the given
    agents."""
    views = {name: tree_view(status) for name, status in statuses.items()}
    roots = [name for name, view in views.items() if view["role"] == "root"]
    if len(roots) != 1:
        raise TestbedError(f"{len(roots)} roots: {roots}")
    root_id = views[roots[0]]["id"]
    # Parents and ancestors must be among the given agents: a node still below a killed agent is not in the tree.
    members = {view["id"] for view in views.values()}
    for name, view in views.items():
        if name == roots[0]:
            continue
        if view["role"] in ("detached", "") or (root_id not in view["ancestors"] and view["parent"] != root_id):
            raise TestbedError(f"{name} is not below the root (role {view['role']!r}, parent {view['parent']!r})")
        strangers = [a for a in [*view["ancestors"], view["parent"]] if a not in members]
        if strangers:
            raise TestbedError(f"{name} is below {strangers[0]!r}, which is not one of the agents")


def check_disjoint_subnets(subnets: dict[str, str]) -> None:
    """Raise TestbedError when two machines (by name) hold overlapping subnets or one is not a valid network."""
    parsed = {}
    for name, text in subnets.items():
        try:
            parsed[name] = ipaddress.ip_network(text)
        except ValueError as err:
            raise TestbedError(f"{name} reports a bad subnet {text!r}: {err}") from err
    for (a, net_a), (b, net_b) in itertools.combinations(parsed.items(), 2):
        if net_a.overlaps(net_b):
            raise TestbedError(f"{a} ({net_a}) and {b} ({net_b}) hold overlapping subnets")


def _drop_per_host_flags(args: list[str]) -> list[str]:
    """Remove --data-dir/--position (one value each) and --listen (its multiaddrs) from a suggested join command."""
    out: list[str] = []
    i = 0
    while i < len(args):
        name = args[i].split("=", 1)[0]
        inline_value = "=" in args[i]
        i += 1
        if name in ("--data-dir", "--position"):
            i += 0 if inline_value else 1
        elif name == "--listen":
            while not inline_value and i < len(args) and args[i].startswith("/"):
                i += 1
        else:
            out.append(args[i - 1])
    return out


def tree_view(status: dict) -> dict:
    """Pull id, role, parent and ancestors out of `agent status --json`, wherever the agent nests them."""

    def find(obj, key):
        if isinstance(obj, dict):
            if key in obj:
                return obj[key]
            for value in obj.values():
                found = find(value, key)
                if found is not None:
                    return found
        return None

    role = find(status, "role")
    ancestors = find(status, "ancestors") or []
    return {
        "id": find(status, "id") or find(status, "peer_id"),
        "role": str(role or "").lower(),
        "parent": find(status, "parent"),
        "ancestors": ancestors if isinstance(ancestors, list) else [],
    }
