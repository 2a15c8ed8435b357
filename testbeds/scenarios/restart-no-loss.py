#!/usr/bin/env python3
"""Scenario: the agent hosting a service restarts (SIGTERM, then the same command and data dir); it keeps its
identity and the service stays reachable."""

import sys

from _runner import main, step
from common import five_machines, fetch_through_overlay, start_web_service
from canopy_netns import TestbedError, tree_view


def scenario(tb):
    hosts = five_machines(tb)
    machines = list(hosts.values())
    tb.start_overlay(machines)
    tb.wait_one_tree(machines, timeout=60)
    server, client = hosts["m4"], hosts["m1"]
    start_web_service(tb, server)
    step(f"before: {fetch_through_overlay(tb, client)}")
    identity_before = tree_view(tb.status(server))["id"]
    tb.stop_agent(server)
    tb.join_agent(server, tb.join_command(machines[0]))
    tb.wait_one_tree(machines, timeout=60)
    identity_after = tree_view(tb.status(server))["id"]
    if identity_after != identity_before:
        raise TestbedError(f"the restarted agent changed identity: {identity_before} -> {identity_after}")
    step("restarted with the same identity")
    step(f"after: {fetch_through_overlay(tb, client)}")


if __name__ == "__main__":
    sys.exit(main("restart-no-loss", scenario))
