#!/usr/bin/env python3
"""The Canopy demo: five machines in network namespaces form one overlay tree; the tree hands every machine its
subnet; a web service runs on three of them and a machine behind a NAT router reaches it by name (round-robin and closest) and by
ServiceIP, with routes learned from the tree (no route table anywhere); then the root agent is killed, the
survivors elect a new one and the service still answers. Run through `sudo testbeds/demo` (which builds the agent).

    --hold   keep everything running at the end and print how to poke at it; Ctrl-C tears it all down.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "scenarios"))

from common import SERVICE, answers, distance_km, fetch, five_machines, nearest, start_tree, start_web, url  # noqa: E402
from canopy_netns import Testbed, TestbedError, missing_privileges, tree_view  # noqa: E402

WEB_ON = ["m2", "m3", "m4"]
CLIENT_ON = "m5"
FETCHES = 6


def say(text: str = "") -> None:
    print(f"[demo] {text}" if text else "", flush=True)


def show(text: str, names: dict[str, str]) -> None:
    """Command output with each peer id followed by its machine name, indented."""
    for peer_id, machine in names.items():
        text = text.replace(peer_id, f"{peer_id[:14]}…({machine})").replace(f"…{peer_id[-10:]}", f"{machine} (…{peer_id[-6:]})")
    for line in text.rstrip().splitlines():
        print(f"    {line}")


def show_fetches(reply: dict) -> None:
    for r in reply["results"]:
        say(f"  {r['label']:<10} {r['url']:<46} -> {r['answer']:<14} ({r['ms']:.1f} ms)")


def main() -> int:
    parser = argparse.ArgumentParser(description="Canopy demo: five machines, one overlay tree, one service")
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
            say(f"{len(machines)} machines in network namespaces: " + ", ".join(f"{h.name} {h.ip}" for h in machines))
            say("  m1 m2 (Munich area) and m3 m4 (Nuremberg area) on two routed segments; m5 behind a NAT router")
            say("  no machine gets a subnet or a route table from us: the tree hands them out")

            say()
            say("starting the agents: `agent start` on m1, `agent join <m1's address>` on the others")
            figures = start_tree(tb, machines, timeout=args.timeout)
            say(f"one tree after {figures['tree_s']} s; every machine holds a subnet granted by the tree after {figures['subnets_s']} s:")
            statuses = {h.name: tb.status(h) for h in machines}
            names = {tree_view(s)["id"]: name for name, s in statuses.items()}
            for name, status in statuses.items():
                say(f"  {name}: {tree_view(status)['role']:<11} subnet {status.get('subnet')}")
            say("m1$ agent tree")
            show(tb.agent_cli(hosts["m1"], "tree").stdout, names)

            say()
            for number, name in enumerate(WEB_ON):
                start_web(tb, hosts[name], number)
            say(f"`agent run --service {SERVICE} --instance N -- <web server>` on {', '.join(WEB_ON)}")
            say("  (the first one deploys the service: the root allocates its ServiceIPs and the InstanceIPs)")
            client = hosts[CLIENT_ON]
            for name in (f"{SERVICE}.any.rr", f"{SERVICE}.any.closest", f"{SERVICE}.0.none"):
                address = tb.wait_for(lambda n=name: tb.resolve(client, n), args.timeout, f"{name} to resolve")
                say(f"{client.name}$ agent resolve {name}  ->  {address}")
            rr_ip = tb.resolve(client, f"{SERVICE}.any.rr")

            say()
            say(f"{client.name} fetches the service, a new connection each time (names resolve through the agent's DNS):")
            reply = fetch(
                tb,
                client,
                [url(f"{n}.none", SERVICE) for n in range(len(WEB_ON))],
                [("rr", url("any.rr", SERVICE), FETCHES), ("closest", url("any.closest", SERVICE), 3), ("ServiceIP", url(rr_ip), 3)],
                warmup=args.timeout,
            )
            show_fetches(reply)
            rr = answers(reply, "rr")
            say(f"rr: {len(rr)} instances answered {FETCHES} fetches ({', '.join(f'{a[11:]}: {c}' for a, c in sorted(rr.items()))})")
            if len(rr) < len(WEB_ON):
                raise TestbedError(f"round-robin reached only {sorted(rr)}")
            servers = [hosts[m] for m in WEB_ON]
            near = nearest(client, servers)
            distances = ", ".join(f"{s.name} {distance_km(client.position, s.position):.0f} km" for s in servers)
            say(f"closest: every fetch went to {', '.join(a[11:] for a in answers(reply, 'closest'))}; nearest to {client.name} is {near.name} ({distances})")
            if answers(reply, "closest") != {f"hello from {near.name}": 3}:
                raise TestbedError(f"closest should always reach {near.name}, got {answers(reply, 'closest')}")
            say(f"{client.name}$ agent services   (what {client.name} learned from the tree)")
            show(tb.agent_cli(client, "services").stdout, names)

            say()
            root = next(h for h in machines if tree_view(statuses[h.name])["role"] == "root")
            survivors = [h for h in machines if h is not root]
            say(f"killing the root agent on {root.name} (SIGKILL, no goodbye)")
            killed = time.monotonic()
            tb.stop_agent(root, kill=True)
            tb.wait_one_tree(survivors, timeout=args.timeout)
            say(f"failover: the {len(survivors)} survivors formed one tree with a new root in {time.monotonic() - killed:.1f} s")
            watcher = next(h for h in survivors if h.name != "m5")
            say(f"{watcher.name}$ agent tree")
            show(tb.agent_cli(watcher, "tree").stdout, names)
            if client is root:
                client = watcher
            after = fetch(tb, client, [url("any.rr", SERVICE)], [("after", url("any.rr", SERVICE), 3)], warmup=args.timeout)
            show_fetches(after)
            say("the service kept answering while the tree re-formed")

            if args.hold:
                agent = tb.find_agent_binary()
                say("holding; try for example:")
                for h in survivors:
                    print(f"    ip netns exec {h.netns} {agent} status --data-dir {tb.data_dir(h)}")
                print(f"    ip netns exec {client.netns} {agent} services --data-dir {tb.data_dir(client)}")
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
