#!/usr/bin/env python3
"""Scenario restart-no-loss: `kill -9` the agent of a machine hosting two instances, start it again with the same
data dir; it keeps its peer id and its subnet, and its instances answer again at the same InstanceIPs (measured:
seconds from the restart until every instance answers a new connection from another machine). Then the same after
a graceful stop (SIGTERM, as for an upgrade): the instances keep running and are adopted again."""

import sys
import time

from _runner import main, step
from canopy_netns import tree_view
from common import SERVICE, expect, expect_served_by, fetch, six_machines, start_tree, start_web, url, wait_local_instances


def scenario(tb, figures):
    hosts = six_machines(tb)
    machines = list(hosts.values())
    figures.update(start_tree(tb, machines))
    step(f"one tree over 6 agents in {figures['tree_s']} s")
    server, other, client = hosts["m4"], hosts["m5"], hosts["m1"]
    # The first instance deploys the service; the next ones start once it is registered (two `agent run` of a
    # service the tree does not know yet, started together on one machine, fail: "the root gave no InstanceIP for
    # instance 1").
    runs = [start_web(tb, server, 0)]
    wait_local_instances(tb, server, SERVICE, 1)
    runs.append(start_web(tb, server, 1))
    start_web(tb, other, 2)
    before = wait_local_instances(tb, server, SERVICE, 2)
    status = tb.status(server)
    identity, subnet = tree_view(status)["id"], status.get("subnet")
    step(f"{server.name}: peer id {identity[:20]}…, subnet {subnet}, instances {before}")
    instance_urls = [url(ip) for _, ip in sorted(before.items())]
    fetch(tb, client, instance_urls, [("before", u, 1) for u in instance_urls])
    step(f"{client.name} reaches both instances on {server.name} at their InstanceIPs")

    tb.stop_agent(server, kill=True)
    step(f"killed the agent on {server.name} (SIGKILL)")
    time.sleep(2)
    alive = sum(run.poll() is None for run in runs)
    figures["instance_processes_alive_after_kill"] = alive
    step(f"{alive} of {len(runs)} `agent run` processes on {server.name} outlived their agent")
    restarted = time.monotonic()
    tb.join_agent(server, tb.join_command(hosts["m1"]))
    tb.wait_one_tree(machines, timeout=90)
    figures["rejoined_s"] = round(time.monotonic() - restarted, 1)
    status = tb.status(server)
    expect(tree_view(status)["id"] == identity, f"the restarted agent has a new peer id {tree_view(status)['id']} (was {identity})")
    step(f"restarted: same peer id, back in the tree after {figures['rejoined_s']} s")
    subnet_after = tb.wait_for(lambda: tb.status(server).get("subnet"), 60, f"{server.name}'s subnet after the restart")
    expect(subnet_after == subnet, f"the restarted agent holds subnet {subnet_after}, it held {subnet}")
    step(f"same subnet {subnet_after}")
    after = wait_local_instances(tb, server, SERVICE, 2)
    expect(after == before, f"InstanceIPs changed across the restart: {before} -> {after}")
    expect_served_by(tb, client, instance_urls, server, "after the restart")
    figures["instances_answer_s"] = round(time.monotonic() - restarted, 1)
    step(f"both instances answer at the same InstanceIPs {instance_urls} {figures['instances_answer_s']} s after the restart")

    # A planned stop (an upgrade): SIGTERM, start again; the instances keep running and answer again.
    tb.stop_agent(server)
    step(f"stopped the agent on {server.name} (SIGTERM)")
    alive = sum(run.poll() is None for run in runs)
    expect(alive == len(runs), f"only {alive} of {len(runs)} `agent run` processes outlived a graceful stop")
    restarted = time.monotonic()
    tb.join_agent(server, tb.join_command(hosts["m1"]))
    tb.wait_one_tree(machines, timeout=90)
    after = wait_local_instances(tb, server, SERVICE, 2)
    expect(after == before, f"InstanceIPs changed across the graceful restart: {before} -> {after}")
    expect_served_by(tb, client, instance_urls, server, "after the graceful restart")
    figures["graceful_restart_answer_s"] = round(time.monotonic() - restarted, 1)
    step(f"after a graceful stop and start both instances answer again {figures['graceful_restart_answer_s']} s after the start")


if __name__ == "__main__":
    sys.exit(main("restart-no-loss", scenario))
