#!/usr/bin/python3
"""Run Canopy on a containernet topology: every host is a Docker container with the agent inside.

Needs a Docker engine and containernet (https://containernet.github.io, which replaces the `mininet` Python
package), run as root. It is NOT run in CI: the CI machine has no Docker engine. Steps:

    cargo build -p canopy-agent
    docker build -f testbeds/containernet/Dockerfile -t canopy-agent:dev target/debug
    sudo python3 testbeds/containernet/run.py --topology vineio-a

Topologies are the same as the Mininet runner's (`testbeds/topologies.py`); switches are Linux bridges unless
Open vSwitch works, link delays need netem. Containers are privileged (containernet does that), so the agent can
create its bridge, TUN device and service namespaces inside them.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

TESTBEDS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTBEDS))
sys.path.insert(0, str(TESTBEDS / "mininet"))

import topologies  # noqa: E402
from overlay_driver import run_checks  # noqa: E402
from run import netem_available, ovs_available  # noqa: E402  (the Mininet runner's probes)

AGENT_IN_CONTAINER = "/usr/local/bin/agent"
DATA_IN_CONTAINER = "/var/lib/canopy-testbed"


def build_containernet(topo: topologies.Topology, image: str, switch_kind: str, with_delays: bool):
    from mininet.link import TCLink
    from mininet.net import Containernet
    from mininet.node import OVSSwitch
    from mininet.nodelib import LinuxBridge

    net = Containernet(controller=None, switch=OVSSwitch if switch_kind == "ovs" else LinuxBridge, link=TCLink, autoSetMacs=True)

    def delay(ms: float | None) -> dict:
        return {"delay": f"{ms}ms"} if with_delays and ms else {}

    for name in topo.switches:
        net.addSwitch(name, **({"failMode": "standalone"} if switch_kind == "ovs" else {}))
    for index, host in enumerate(topo.hosts, start=1):
        net.addDocker(host.name, ip=f"10.0.{index // 250}.{index % 250 + 1}/16", dimage=image)
        net.addLink(host.name, host.switch, **delay(topo.host_link_delay_ms))
    for link in topo.links:
        opts = delay(link.delay_ms)
        if link.bandwidth_mbit:
            opts["bw"] = link.bandwidth_mbit
        net.addLink(link.a, link.b, **opts)
    return net


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topology", choices=topologies.NAMES, default="vineio-a")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image", default="canopy-agent:dev", help="Docker image with the agent (see Dockerfile)")
    parser.add_argument("--switch", choices=["auto", "ovs", "linuxbridge"], default="auto")
    parser.add_argument("--service", default="demo.canopy.web.test")
    parser.add_argument("--resolve-name", default=None)
    parser.add_argument("--stagger", type=float, default=0.0, help="seconds between agent joins (eases CPU load at start)")
    parser.add_argument("--timeout", type=float, default=180)
    args = parser.parse_args()

    try:
        topo = topologies.by_name(args.topology, args.size, args.seed)
        from mininet.log import setLogLevel
        from mininet.net import Containernet  # noqa: F401  (fails on plain Mininet)
    except ValueError as err:
        parser.error(str(err))
    except ImportError:
        print("error: containernet is not installed for this Python (see https://containernet.github.io)", file=sys.stderr)
        return 2
    if shutil.which("docker") is None:
        print("error: Docker is not installed", file=sys.stderr)
        return 2
    setLogLevel("warning")
    switch_kind = args.switch if args.switch != "auto" else ("ovs" if ovs_available() else "linuxbridge")
    with_delays = netem_available()
    if not with_delays:
        print("notice: no netem qdisc on this kernel: link delays are skipped", flush=True)

    net = build_containernet(topo, args.image, switch_kind, with_delays)
    workdir = Path(tempfile.mkdtemp(prefix="canopy-containernet-"))
    return run_checks(net, topo, workdir, AGENT_IN_CONTAINER, DATA_IN_CONTAINER, args)


if __name__ == "__main__":
    sys.exit(main())
