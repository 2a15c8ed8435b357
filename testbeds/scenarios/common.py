"""Pieces shared by the netns scenarios and the demo: the emulated worlds, starting a tree, web services and
clients run with `agent run`, and what the agents know about services."""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "netns"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from canopy_netns import Node, Testbed, TestbedError, tree_view  # noqa: E402
from web_programs import HTTP_PORT, WEB_CLIENT, WEB_SERVER, client_plan, parse_client_output  # noqa: E402

SERVICE = "demo.canopy.web.test"
API_SERVICE = "demo.canopy.api.test"
# The agents' data-plane tunnel port (agent default).
TUNNEL_PORT = 50103
CLIENT_SERVICE = "demo.canopy.client.test"

# Positions of six_machines: Munich area on segment wan-a, Nuremberg area on wan-b, Munich-Pasing behind the NAT.
POSITIONS = {
    "m1": (48.137, 11.575),  # Munich
    "m2": (48.249, 11.651),  # Garching
    "m3": (48.180, 11.510),  # Munich-Moosach
    "m4": (49.452, 11.077),  # Nuremberg
    "m5": (49.598, 11.004),  # Erlangen
    "m6": (48.149, 11.462),  # Munich-Pasing, behind NAT
}


def five_machines(tb: Testbed) -> dict[str, Node]:
    """Two public segments joined by a router (Munich area and Nuremberg area) and one home LAN behind a NAT:

        m1 m2 ---[wan-a]--- r1 ---[wan-b]--- m3 m4
                   |
                  nat ---[lan]--- m5
    """
    wan_a, wan_b = tb.add_segment("wana"), tb.add_segment("wanb")
    lan = tb.add_segment("lan", public=False)
    tb.add_router("r1", [wan_a, wan_b])
    tb.add_nat_router("nat", wan=wan_a, lan=lan)
    hosts = {
        "m1": tb.add_host("m1", wan_a, position=(48.137, 11.575)),  # Munich
        "m2": tb.add_host("m2", wan_a, position=(48.249, 11.651)),  # Garching
        "m3": tb.add_host("m3", wan_b, position=(49.452, 11.077)),  # Nuremberg
        "m4": tb.add_host("m4", wan_b, position=(49.598, 11.004)),  # Erlangen
        "m5": tb.add_host("m5", lan, position=(48.149, 11.462)),  # Munich-Pasing, behind NAT
    }
    tb.install_routes()
    return hosts


def six_machines(tb: Testbed) -> dict[str, Node]:
    """Three machines around Munich and two around Nuremberg on two routed segments, one more behind a NAT:

        m1 m2 m3 ---[wan-a]--- r1 ---[wan-b]--- m4 m5
                      |
                     nat ---[lan]--- m6
    """
    wan_a, wan_b = tb.add_segment("wana"), tb.add_segment("wanb")
    lan = tb.add_segment("lan", public=False)
    tb.add_router("r1", [wan_a, wan_b])
    tb.add_nat_router("nat", wan=wan_a, lan=lan)
    segment = {"m1": wan_a, "m2": wan_a, "m3": wan_a, "m4": wan_b, "m5": wan_b, "m6": lan}
    hosts = {name: tb.add_host(name, segment[name], position=POSITIONS[name]) for name in segment}
    tb.install_routes()
    return hosts


def add_bystanders(tb: Testbed, hosts: dict[str, Node], count: int, seed: int = 7) -> list[Node]:
    """`count` more machines (b1, b2, ...) without services, alternating between the Munich and the Nuremberg
    segment of `six_machines`. A coordinator adopts up to 16 children before it sends joiners down, so a tree needs
    more than 17 machines to have a level of coordinators below the root."""
    import random

    rng = random.Random(seed)
    segments = [tb.segments["wana"], tb.segments["wanb"]]
    centres = [POSITIONS["m1"], POSITIONS["m4"]]
    added = []
    for i in range(count):
        lat, lon = centres[i % 2]
        position = (round(lat + rng.uniform(-0.1, 0.1), 4), round(lon + rng.uniform(-0.1, 0.1), 4))
        added.append(tb.add_host(f"b{i + 1}", segments[i % 2], position=position))
    tb.install_routes()
    hosts.update({h.name: h for h in added})
    return added


def distance_km(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Great-circle distance between two (lat, lon) positions."""
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * 6371 * math.asin(math.sqrt(h))


def nearest(client: Node, servers: list[Node]) -> Node:
    return min(servers, key=lambda s: distance_km(client.position, s.position))


def start_tree(tb: Testbed, hosts: list[Node], timeout: float = 90, stagger: float = 0.0, extra_args: dict[str, list[str]] | None = None) -> dict[str, float]:
    """Start the first host's agent, join the others `stagger` seconds apart (tree mode: no --subnet, no route
    table), wait for one tree and for every machine's subnet grant. Returns the seconds until each, from the first
    agent's start."""
    started = time.monotonic()
    tb.start_overlay(hosts, stagger=stagger, extra_args=extra_args)
    tb.wait_one_tree(hosts, timeout=timeout)
    tree_s = time.monotonic() - started
    tb.wait_subnets(hosts, timeout=timeout)
    return {"tree_s": round(tree_s, 1), "subnets_s": round(time.monotonic() - started, 1)}


def roles(tb: Testbed, hosts: list[Node]) -> dict[str, str]:
    """Each host's role (root, coordinator, leaf, detached) by host name."""
    return {h.name: tree_view(tb.status(h))["role"] for h in hosts}


def start_web(tb: Testbed, host: Node, instance: int, service: str = SERVICE):
    """WEB_SERVER as instance `instance` of `service` on `host`, answering `hello from <host>`."""
    return tb.run_service(host, service, ["python3", "-c", WEB_SERVER, host.name], instance=instance)


def url(name_or_ip: str, service: str | None = None) -> str:
    """http://NAME:PORT/ for a ServiceIP/InstanceIP, or for `service` + a name suffix like `any.rr`."""
    host = f"{service}.{name_or_ip}" if service else name_or_ip
    return f"http://{host}:{HTTP_PORT}/"


def fetch(tb: Testbed, client: Node, warm_urls: list[str], fetches: list[tuple[str, str, int]], warmup: float = 60) -> dict:
    """Run WEB_CLIENT as CLIENT_SERVICE on `client`: waits until every warm URL answers (at most `warmup` seconds),
    then fetches each URL `count` times with a new connection each time. Returns {"results": [...], "warm_ms"}."""
    plan = client_plan(warm_urls, fetches, warmup)
    result = tb.run_client(client, CLIENT_SERVICE, ["python3", "-c", WEB_CLIENT, plan], timeout=warmup + 90)
    try:
        reply = parse_client_output(result.stdout)
    except ValueError as err:
        raise TestbedError(f"the client on {client.name} (exit {result.returncode}): {err} {result.stderr.strip()[-300:]}") from err
    if "error" in reply:
        raise TestbedError(f"the client on {client.name} could not fetch: {reply['error']}")
    failed = [r for r in reply["results"] if r["ms"] is None]
    if failed:
        raise TestbedError(f"{len(failed)} of {len(reply['results'])} fetches from {client.name} failed, e.g. {failed[0]['url']}: {failed[0]['answer']}")
    return reply


def expect_served_by(tb: Testbed, client: Node, urls: list[str], server: Node, label: str, warmup: float = 90) -> None:
    """One new connection from `client` to each URL (waiting up to `warmup` seconds for all to answer); every answer
    must come from `server`'s web service."""
    reply = fetch(tb, client, urls, [(label, u, 1) for u in urls], warmup=warmup)
    answered = {r["answer"] for r in reply["results"]}
    if answered != {f"hello from {server.name}"}:
        raise TestbedError(f"{label}: {urls} answered {answered}, not only {server.name}")


def answers(reply: dict, label: str) -> dict[str, int]:
    """How often each answer came back for the fetches labelled `label`."""
    counts: dict[str, int] = {}
    for r in reply["results"]:
        if r["label"] == label:
            counts[r["answer"]] = counts.get(r["answer"], 0) + 1
    return counts


def median_ms(reply: dict) -> float:
    return statistics.median(r["ms"] for r in reply["results"])


def services(tb: Testbed, host: Node) -> list[dict]:
    """`agent services --json` on a host."""
    return json.loads(tb.agent_cli(host, "services", "--json").stdout)


def local_instances(tb: Testbed, host: Node, service: str) -> dict[int, str]:
    """InstanceIPs of the instances of `service` that `host` runs, by instance number."""
    for entry in services(tb, host):
        if entry.get("name") == service:
            return {i["number"]: i["instance_ip"] for i in entry.get("instances", []) if i.get("local")}
    return {}


def wait_local_instances(tb: Testbed, host: Node, service: str, count: int, timeout: float = 60) -> dict[int, str]:
    """Wait until `host` reports `count` local instances of `service` with their InstanceIPs."""

    def enough():
        found = local_instances(tb, host, service)
        return found if len(found) >= count and all(found.values()) else None

    return tb.wait_for(enough, timeout, f"{count} instances of {service} registered on {host.name}")


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise TestbedError(message)
