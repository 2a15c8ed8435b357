#!/usr/bin/python3
"""Run Canopy on a Mininet topology (as root): build it, ping all, start agents, wait for one tree, run a service
with instances on two far-apart hosts and fetch it from a third by name and by ServiceIP; prints what it measured
(tree formation time, the agents' total RSS, ...) and a final `figures {json}` line.

    sudo testbeds/mininet/run.py --topology vineio-a                 # the whole scenario
    sudo testbeds/mininet/run.py --topology linear --size 4 --ping-only

Switches are Open vSwitch in standalone mode when OVS works here (kernel module and ovsdb running), else Linux
bridges (no controller either way). Link delays need the netem qdisc; without it they are skipped with a notice.
Uses the system Python (`/usr/bin/python3`), where `apt-get install mininet` puts the Mininet package.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

TESTBEDS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTBEDS))

import topologies  # noqa: E402
from overlay_driver import run_checks  # noqa: E402


def netem_available() -> bool:
    """Whether a netem qdisc can be created (probed on the loopback of a throwaway namespace)."""
    probe = f"cnpprobe{uuid.uuid4().hex[:8]}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
        return False
    try:
        result = subprocess.run(["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"], capture_output=True)
        return result.returncode == 0
    finally:
        subprocess.run(["ip", "netns", "delete", probe], capture_output=True)


def ovs_available() -> bool:
    if not Path("/sys/module/openvswitch").exists() or shutil.which("ovs-vsctl") is None:
        return False
    return subprocess.run(["ovs-vsctl", "--timeout=3", "show"], capture_output=True).returncode == 0


def build_mininet(topo: topologies.Topology, switch_kind: str, with_delays: bool):
    from mininet.link import TCLink
    from mininet.net import Mininet
    from mininet.node import OVSSwitch
    from mininet.nodelib import LinuxBridge
    from mininet.topo import Topo

    def delay(ms: float | None) -> dict:
        return {"delay": f"{ms}ms"} if with_delays and ms else {}

    class CanopyTopo(Topo):
        def build(self):
            for name in topo.switches:
                self.addSwitch(name, **({"failMode": "standalone"} if switch_kind == "ovs" else {}))
            for host in topo.hosts:
                self.addHost(host.name)
                self.addLink(host.name, host.switch, **delay(topo.host_link_delay_ms))
            for link in topo.links:
                opts = delay(link.delay_ms)
                if link.bandwidth_mbit:
                    opts["bw"] = link.bandwidth_mbit
                self.addLink(link.a, link.b, **opts)

    switch = OVSSwitch if switch_kind == "ovs" else LinuxBridge
    return Mininet(topo=CanopyTopo(), switch=switch, controller=None, link=TCLink, autoSetMacs=True, waitConnected=False,
                   # Underlay outside the platform range 10.16.0.0/12, so overlay routes never overlap it.
                   ipBase="10.0.0.0/16")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topology", choices=topologies.NAMES, default="vineio-a")
    parser.add_argument("--size", type=int, default=None, help="hosts for linear/star, hosts per site for two-sites")
    parser.add_argument("--seed", type=int, default=0, help="seed for host positions")
    parser.add_argument("--switch", choices=["auto", "ovs", "linuxbridge"], default="auto")
    parser.add_argument("--ping-only", action="store_true", help="build the topology and ping all, no agents")
    parser.add_argument("--agent", default=str(TESTBEDS.parent / "target" / "debug" / "agent"))
    parser.add_argument("--service", default="demo.canopy.web.test", help="APP.APPNS.SVC.SVCNS of the test service")
    parser.add_argument("--resolve-name", default=None, help="name to resolve for the service (default SERVICE.any.rr)")
    parser.add_argument("--stagger", type=float, default=0.0, help="seconds between agent joins (eases CPU load at start)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds to wait for the tree and for traffic")
    args = parser.parse_args()

    try:
        topo = topologies.by_name(args.topology, args.size, args.seed)
    except ValueError as err:
        parser.error(str(err))
    if not args.ping_only and not Path(args.agent).is_file():
        parser.error(f"no agent binary at {args.agent} (cargo build -p canopy-agent, or pass --agent)")
    try:
        from mininet.log import setLogLevel
    except ImportError:
        print("error: Mininet is not installed for this Python (apt-get install mininet; run with /usr/bin/python3)", file=sys.stderr)
        return 2
    setLogLevel("warning")

    switch_kind = args.switch
    if switch_kind == "auto":
        switch_kind = "ovs" if ovs_available() else "linuxbridge"
    with_delays = netem_available()
    if not with_delays:
        print("notice: no netem qdisc on this kernel: link delays are skipped", flush=True)
    print(f"topology {topo.name}: {len(topo.hosts)} hosts, {len(topo.switches)} switches ({switch_kind})", flush=True)

    net = build_mininet(topo, switch_kind, with_delays)
    workdir = Path(tempfile.mkdtemp(prefix="canopy-mininet-"))
    # Mininet hosts share the mount namespace, so the service namespaces the agents mount under /run/netns share
    # one list of names: give each agent its own prefix, unique to this run.
    daemon_env = {"CANOPY_NETNS_PREFIX": f"cnm{os.getpid()}-{{host}}-"}
    return run_checks(net, topo, workdir, args.agent, str(workdir / "data"), args, ping_only=args.ping_only, daemon_env=daemon_env)


if __name__ == "__main__":
    sys.exit(main())
