"""Pieces shared by the netns scenarios and the demo: the five-machine world and the HTTP-through-overlay check."""

from __future__ import annotations

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
