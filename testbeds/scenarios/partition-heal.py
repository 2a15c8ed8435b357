#!/usr/bin/env python3
"""Scenario partition-heal: a machine hosting an instance is cut off long enough to become the root of its own
island (it keeps its subnet); meanwhile a new machine joins the main tree and is granted that very subnet (its parent
freed it when the cut-off machine went silent). When the link comes back the island merges, the overlap is found and
one of the two machines is renumbered: its data plane restarts on the new subnet and adopts the namespaces of its
running instances, which keep their InstanceIPs (issue 5: "the younger one is renumbered (its services get new
namespace IPs; their InstanceIPs and ServiceIPs do not change)").

Measured: seconds from the heal until one tree with disjoint subnets, and until both instances answer again."""

import sys
import time

from _runner import main, step
from canopy_netns import TestbedError
from common import SERVICE, expect, fetch, local_instances, start_tree, start_web, url, wait_local_instances

# Long enough for the parent to drop the silent child (3 heartbeats) and for the island to settle.
CUT_S = 10


def scenario(tb, figures):
    segment = tb.add_segment("wan")
    names = ["m1", "m2", "m3", "m4"]
    hosts = {name: tb.add_host(name, segment, position=(48.1 + i * 0.05, 11.5)) for i, name in enumerate(names)}
    tb.install_routes()
    first = [hosts["m1"], hosts["m2"], hosts["m3"]]
    figures.update(start_tree(tb, first))
    cut, newcomer, client = hosts["m3"], hosts["m4"], hosts["m1"]
    cut_subnet = tb.status(cut)["subnet"]
    step(f"one tree over 3 agents in {figures['tree_s']} s; {cut.name} holds {cut_subnet}")

    start_web(tb, cut, 0)
    island_ip = wait_local_instances(tb, cut, SERVICE, 1)[0]
    step(f"instance 0 on {cut.name} at InstanceIP {island_ip}")

    tb.set_link(cut, up=False)
    step(f"cut {cut.name}'s link")
    # The parent drops the silent machine and frees its grant; a machine joining now gets the lowest free subnet.
    time.sleep(5)
    tb.join_agent(newcomer, tb.join_command(hosts["m1"]))
    newcomer_subnet = tb.wait_for(lambda: tb.status(newcomer).get("subnet"), 30, f"{newcomer.name}'s subnet")
    figures["clash"] = newcomer_subnet == cut_subnet
    step(f"{newcomer.name} joined during the cut and holds {newcomer_subnet} (same as {cut.name}'s: {figures['clash']})")
    start_web(tb, newcomer, 1)
    newcomer_ip = wait_local_instances(tb, newcomer, SERVICE, 1)[1]
    step(f"instance 1 on {newcomer.name} at InstanceIP {newcomer_ip}")
    time.sleep(max(0.0, CUT_S - 5))

    tb.set_link(cut, up=True)
    healed = time.monotonic()
    step(f"restored {cut.name}'s link")
    all_hosts = list(hosts.values())
    tb.wait_one_tree(all_hosts, timeout=90)
    subnets = tb.wait_subnets(all_hosts, timeout=90)
    figures["one_tree_disjoint_s"] = round(time.monotonic() - healed, 1)
    renumbered = sorted(h for h, before in ((cut.name, cut_subnet), (newcomer.name, newcomer_subnet)) if subnets[h] != before)
    figures["renumbered"] = renumbered
    step(f"one tree, disjoint subnets {figures['one_tree_disjoint_s']} s after the heal; renumbered: {renumbered or 'none'}")
    if figures["clash"]:
        expect(len(renumbered) == 1, f"{cut.name} and {newcomer.name} both held {cut_subnet}; renumbered: {renumbered}")

    # Both instances keep their InstanceIPs and answer at them from the client's machine.
    tb.wait_for(lambda: all(local_instances(tb, h, SERVICE) for h in (cut, newcomer)), 60, "both instances registered again")
    kept = {cut.name: local_instances(tb, cut, SERVICE).get(0), newcomer.name: local_instances(tb, newcomer, SERVICE).get(1)}
    expect(kept == {cut.name: island_ip, newcomer.name: newcomer_ip}, f"InstanceIPs changed across the heal: {kept}")
    urls = [url(island_ip), url(newcomer_ip)]
    reply = fetch(tb, client, urls, [("after", u, 1) for u in urls], warmup=90)
    figures["instances_answer_s"] = round(time.monotonic() - healed, 1)
    answered = sorted(r["answer"] for r in reply["results"])
    if answered != sorted([f"hello from {cut.name}", f"hello from {newcomer.name}"]):
        raise TestbedError(f"after the heal the InstanceIPs answered {answered}")
    step(f"both instances answer at their InstanceIPs {figures['instances_answer_s']} s after the heal")


if __name__ == "__main__":
    sys.exit(main("partition-heal", scenario))
