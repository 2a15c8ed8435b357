"""Pieces shared by the netns scenarios and the demo: the five-machine world and the HTTP-through-overlay check."""

from __future__ import annotations

import ipaddress
import json
import secrets
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "netns"))

from canopy_netns import Node, Testbed, TestbedError  # noqa: E402

SERVICE = "demo.canopy.web.test"
CLIENT_SERVICE = "demo.canopy.client.test"
# The name a client resolves: every instance, round-robin. The agent may want its domain suffix added.
SERVICE_NAME = f"{SERVICE}.any.rr"
HTTP_PORT = 8080


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


def start_web_service(tb: Testbed, host: Node, instance: int | None = None):
    """A Python web server as SERVICE on `host` (in its own service namespace, via `agent run`)."""
    return tb.run_service(host, SERVICE, ["python3", "-m", "http.server", str(HTTP_PORT)], instance=instance)


def fetch_through_overlay(tb: Testbed, client: Node, timeout: float = 60) -> str:
    """Resolve SERVICE_NAME on `client` and fetch the page from a client service there; returns `HTTP 200 ...`."""
    service_ip = tb.wait_for(lambda: tb.resolve(client, SERVICE_NAME), timeout, f"{SERVICE_NAME} to resolve on {client.name}")
    fetch = (
        "import urllib.request; "
        f"r = urllib.request.urlopen('http://{service_ip}:{HTTP_PORT}/', timeout=5); print('HTTP', r.status, r.headers['Server'])"
    )

    def fetched():
        result = tb.run_client(client, CLIENT_SERVICE, ["python3", "-c", fetch], timeout=30)
        if "HTTP 200" not in result.stdout:
            raise TestbedError(f"client said: {(result.stdout + result.stderr).strip()[-300:]}")
        return result.stdout.strip()

    return tb.wait_for(fetched, timeout, f"an HTTP reply via {service_ip} on {client.name}", interval=2.0)


# ----- the demo's world: per-machine subnets, one static route table, a web service on three machines -----------

TUNNEL_PORT = 50103
# Each machine's instance subnet (its bridge holds .1); the demo gives every agent its own with --subnet.
SUBNETS = {
    "m1": "10.16.0.0/26",
    "m2": "10.16.0.64/26",
    "m3": "10.16.0.128/26",
    "m4": "10.16.0.192/26",
    "m5": "10.16.1.0/26",
}
# ServiceIPs of SERVICE, one per routing policy.
SERVICE_IPS = {"rr": "10.30.0.1", "closest": "10.30.0.2"}
CLIENT_SERVICE_IP = "10.30.0.10"

# A web server that answers with the machine it runs on: `python3 -c WEB_SERVER <machine>`.
WEB_SERVER = f"""
import http.server, sys
answer = ("hello from " + sys.argv[1] + "\\n").encode()
class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", {HTTP_PORT}), Hello).serve_forever()
"""

# A client that fetches URLs (names resolve through the agent's DNS on the bridge gateway) and prints JSON:
# `python3 -c WEB_CLIENT '{"warm_url": URL, "warmup": SECONDS, "fetches": [[LABEL, URL, COUNT], ...]}'`.
WEB_CLIENT = """
import json, sys, time, urllib.request
plan = json.loads(sys.argv[1])
def get(url):
    start = time.monotonic()
    with urllib.request.urlopen(url, timeout=5) as reply:
        return reply.read().decode().strip(), round((time.monotonic() - start) * 1000, 1)
deadline = time.monotonic() + plan["warmup"]
for warm_url in plan["warm_urls"]:
    while True:
        try:
            get(warm_url)
            break
        except Exception as err:
            if time.monotonic() > deadline:
                print(json.dumps({"error": warm_url + ": " + str(err)}))
                sys.exit(1)
            time.sleep(0.5)
results = []
for label, url, count in plan["fetches"]:
    for _ in range(count):
        try:
            answer, ms = get(url)
        except Exception as err:
            answer, ms = "error: " + str(err), None
        results.append({"label": label, "url": url, "answer": answer, "ms": ms})
print(json.dumps({"results": results}))
"""


def namespace_ip(machine: str, offset: int) -> str:
    """The `offset`-th address in a machine's instance subnet (.1 is its bridge)."""
    net = ipaddress.ip_network(SUBNETS[machine])
    return str(net.network_address + offset)


def demo_route_table(
    node_names: dict[str, str],
    endpoints: dict[str, str],
    positions: dict[str, tuple[float, float]],
    web_on: list[str],
    client_on: str,
) -> dict:
    """The static route table every agent gets: machines (by their data-plane node name, with their positions for
    the closest policy), SERVICE with one instance on each of `web_on` and ServiceIPs for rr and closest, and a
    client service on `client_on`."""
    return {
        "tunnel_key": secrets.token_hex(32),
        "nodes": [
            {
                "name": node_names[m],
                "subnet": SUBNETS[m],
                "endpoint": f"{endpoints[m]}:{TUNNEL_PORT}",
                "position": {"lat": positions[m][0], "lon": positions[m][1]},
            }
            for m in node_names
        ],
        "services": [
            {
                "name": SERVICE,
                "service_ip": SERVICE_IPS["rr"],
                "policy": "rr",
                "policy_ips": {"closest": SERVICE_IPS["closest"]},
                "instances": [
                    {"number": n, "instance_ip": f"10.30.1.{n + 1}", "namespace_ip": namespace_ip(m, 2), "node": node_names[m]}
                    for n, m in enumerate(web_on)
                ],
            },
            {
                "name": CLIENT_SERVICE,
                "service_ip": CLIENT_SERVICE_IP,
                "instances": [
                    {"number": 0, "instance_ip": "10.30.2.1", "namespace_ip": namespace_ip(client_on, 3), "node": node_names[client_on]}
                ],
            },
        ],
    }


def start_named_web_server(tb: Testbed, host: Node, instance: int):
    """WEB_SERVER as instance `instance` of SERVICE on `host`, answering with the host's name."""
    return tb.run_service(host, SERVICE, ["python3", "-c", WEB_SERVER, host.name], instance=instance)


def fetch_many(
    tb: Testbed,
    client: Node,
    fetches: list[tuple[str, str, int]],
    warmup: float = 30,
    instances: int = 0,
) -> list[dict]:
    """Run WEB_CLIENT once as the client service on `client`: waits until each of the first `instances` instances
    answers at its InstanceIP name (so no server is still starting) and the first URL answers, then fetches each URL
    `count` times (a new connection each time). Returns one dict per fetch: label, url, answer, ms."""
    warm_urls = [f"http://{SERVICE}.{n}.none:{HTTP_PORT}/" for n in range(instances)] + [fetches[0][1]]
    plan = {"warm_urls": warm_urls, "warmup": warmup, "fetches": [list(f) for f in fetches]}
    result = tb.run_client(client, CLIENT_SERVICE, ["python3", "-c", WEB_CLIENT, json.dumps(plan)], timeout=warmup + 60)
    try:
        reply = json.loads(result.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise TestbedError(f"the client on {client.name} said: {(result.stdout + result.stderr).strip()[-400:]}")
    if "error" in reply:
        raise TestbedError(f"the client on {client.name} could not fetch: {reply['error']}")
    return reply["results"]
