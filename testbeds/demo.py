#!/usr/bin/env python3
"""The Canopy demo: five machines in network namespaces form one overlay; a web service runs on three of them and a
machine behind NAT reaches it by name (round-robin and closest) and by ServiceIP; then the root agent is killed and
the survivors elect a new one. Run through `sudo testbeds/demo` (which builds the agent first).

    --hold   keep everything running at the end and print how to poke at it; Ctrl-C tears it all down.
"""

import argparse
import collections
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "scenarios"))

from common import (  # noqa: E402
    HTTP_PORT,
    SERVICE,
    SERVICE_IPS,
    SUBNETS,
    demo_route_table,
    fetch_many,
    five_machines,
    start_named_web_server,
)
from canopy_netns import Testbed, TestbedError, check_one_tree, missing_privileges  # noqa: E402

WEB_ON = ["m2", "m3", "m4"]  # public machines: they receive tunnel traffic from anyone
CLIENT_ON = "m5"  # behind NAT: it opens every connection, so its replies come back through the NAT
FETCHES = 6


def say(text: str = "") -> None:
    print(f"[demo] {text}" if text else "", flush=True)


def distance_km(a: tuple[float, float], b: tuple[float, float]) -> float:
    from math import asin, cos, radians, sin, sqrt

    lat1, lon1, lat2, lon2 = map(radians, (*a, *b))
    h = sin((lat2 - lat1) / 2) ** 2 + cos(lat1) * cos(lat2) * sin((lon2 - lon1) / 2) ** 2
    return 2 * 6371 * asin(sqrt(h))


def show_tree(text: str, node_names: dict[str, str]) -> None:
    """`agent tree` output with each peer id followed by its machine name."""
    for machine, peer_id in node_names.items():
        text = text.replace(peer_id, f"{peer_id[:16]}… = {machine}")
    print(text.rstrip())


def show_fetches(results: list[dict]) -> dict[str, collections.Counter]:
    by_label: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in results:
        timing = f"{r['ms']:.1f} ms" if r["ms"] is not None else "failed"
        say(f"  {r['label']:<8} {r['url']:<48} -> {r['answer']:<18} ({timing})")
        by_label[r["label"]][r["answer"]] += 1
    return by_label


def main() -> int:
    parser = argparse.ArgumentParser(description="Canopy demo: five machines, one overlay, one service")
    parser.add_argument("--hold", action="store_true", help="keep the testbed up until Ctrl-C")
    parser.add_argument("--timeout", type=float, default=90)
    args = parser.parse_args()
    reason = missing_privileges()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    began = time.monotonic()
    try:
        with Testbed() as tb:
            hosts = five_machines(tb)
            machines = list(hosts.values())
            nat = tb.nodes["nat"]
            say(f"{len(machines)} machines in network namespaces: " + ", ".join(f"{h.name} {h.ip}" for h in machines))
            say("  m1 m2 (Munich area) and m3 m4 (Nuremberg area) on two routed segments; m5 behind a NAT router")
            tb.ping(hosts["m5"], hosts["m3"].ip)
            say("underlay works: m5 (behind NAT) reaches m3 across the router")

            say()
            say("starting the agents: m1 starts the overlay, the others join through it; each gets its own --subnet")
            started = time.monotonic()
            tb.start_agent(hosts["m1"], extra_args=["--subnet", SUBNETS["m1"]])
            join_args = tb.join_command(hosts["m1"], timeout=args.timeout)
            for h in machines[1:]:
                tb.join_agent(h, join_args, extra_args=["--subnet", SUBNETS[h.name]])
            tb.wait_one_tree(machines, timeout=args.timeout)
            say(f"tree formed: {len(machines)} agents, one root, in {time.monotonic() - started:.1f} s")
            # The data plane is named after the agent's peer id: use it to put machine names into `agent tree`.
            node_names = {h.name: tb.api(h, "GET", "/v1/dataplane")["node"] for h in machines}
            show_tree(tb.agent_cli(hosts["m1"], "tree").stdout, node_names)

            say()
            # m5's tunnel traffic leaves through the NAT, which keeps the port: the others know it by the NAT's address.
            endpoints = {h.name: h.ip for h in machines}
            endpoints["m5"] = str(nat.ip)
            positions = {h.name: h.position for h in machines}
            table = demo_route_table(node_names, endpoints, positions, WEB_ON, CLIENT_ON)
            for h in machines:
                tb.api(h, "PUT", "/v1/dataplane/routes", table)
            say("routes: static table given to every agent; the tree will distribute them in a later release")
            say(f"  {SERVICE}: instances on {', '.join(WEB_ON)}; ServiceIPs rr {SERVICE_IPS['rr']}, "
                f"closest {SERVICE_IPS['closest']}; tunnels encrypted with a key from the table")
            for n, m in enumerate(WEB_ON):
                start_named_web_server(tb, hosts[m], n)
            say(f"web server started with `agent run` on {', '.join(WEB_ON)} (port {HTTP_PORT}, answers with its machine)")

            say()
            client = hosts[CLIENT_ON]
            names = [f"{SERVICE}.any.rr", f"{SERVICE}.any.closest", f"{SERVICE}.0.none"]
            for name in names:
                address = tb.wait_for(lambda n=name: tb.resolve(client, n), args.timeout, f"{name} to resolve")
                say(f"{client.name}$ agent resolve {name}  ->  {address}")

            say()
            say(f"{client.name} (behind NAT) fetches the service {FETCHES} times each way, a new connection every time:")
            fetch_started = time.monotonic()
            results = fetch_many(
                tb,
                client,
                [
                    ("rr", f"http://{SERVICE}.any.rr:{HTTP_PORT}/", FETCHES),
                    ("closest", f"http://{SERVICE}.any.closest:{HTTP_PORT}/", 3),
                    ("ServiceIP", f"http://{SERVICE_IPS['rr']}:{HTTP_PORT}/", 3),
                ],
                warmup=args.timeout,
                instances=len(WEB_ON),
            )
            counts = show_fetches(results)
            failed = [r for r in results if r["ms"] is None]
            if failed:
                raise TestbedError(f"{len(failed)} of {len(results)} fetches failed")
            rr_answers = set(counts["rr"])
            say(f"rr: {len(rr_answers)} different instances answered {FETCHES} fetches "
                f"({', '.join(f'{a}: {c}' for a, c in sorted(counts['rr'].items()))})")
            if len(rr_answers) < len(WEB_ON):
                raise TestbedError(f"round-robin reached only {sorted(rr_answers)}")
            nearest = min(WEB_ON, key=lambda m: distance_km(client.position, hosts[m].position))
            distances = ", ".join(f"{m} {distance_km(client.position, hosts[m].position):.0f} km" for m in WEB_ON)
            say(f"closest: every fetch went to {', '.join(sorted(counts['closest']))}; "
                f"the nearest instance to {client.name} is on {nearest} ({distances})")
            if set(counts["closest"]) != {f"hello from {nearest}"}:
                raise TestbedError(f"closest should always reach {nearest}, got {dict(counts['closest'])}")
            say(f"(all fetches took {time.monotonic() - fetch_started:.1f} s including the client namespace setup)")

            say()
            root = hosts["m1"]
            survivors = [h for h in machines if h is not root]
            say(f"killing the root agent on {root.name} (SIGKILL, no goodbye)")
            killed = time.monotonic()
            tb.stop_agent(root, kill=True)
            statuses = tb.wait_one_tree(survivors, timeout=args.timeout)
            check_one_tree(statuses)
            say(f"failover: the {len(survivors)} survivors formed one tree with a new root in "
                f"{time.monotonic() - killed:.1f} s")
            show_tree(tb.agent_cli(hosts["m2"], "tree").stdout, node_names)
            after = fetch_many(tb, client, [("after", f"http://{SERVICE}.any.rr:{HTTP_PORT}/", 3)], warmup=args.timeout)
            show_fetches(after)
            say("the data plane kept serving while the control plane re-formed (it has its own static routes)")

            if args.hold:
                agent = tb.find_agent_binary()
                say("holding; try for example:")
                for h in survivors:
                    print(f"    ip netns exec {h.netns} {agent} status --data-dir {tb.data_dir(h)}")
                print(f"    ip netns exec {client.netns} {agent} resolve {SERVICE}.any.rr --data-dir {tb.data_dir(client)}")
                say("Ctrl-C to tear everything down")
                try:
                    while True:
                        input()
                except (KeyboardInterrupt, EOFError):
                    pass
        say(f"done in {time.monotonic() - began:.1f} s; everything torn down")
        return 0
    except TestbedError as err:
        print(f"[demo] FAILED: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
