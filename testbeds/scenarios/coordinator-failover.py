#!/usr/bin/env python3
"""Scenario: the root coordinator crashes (SIGKILL); the other four elect a new root, stay one tree, and the
service keeps answering."""

import sys

from _runner import main, step
from common import five_machines, fetch_through_overlay, start_web_service
from canopy_netns import tree_view


def scenario(tb):
    hosts = five_machines(tb)
    machines = list(hosts.values())
    tb.start_overlay(machines)
    statuses = tb.wait_one_tree(machines, timeout=60)
    root = next(h for h in machines if tree_view(statuses[h.name])["role"] == "root")
    survivors = [h for h in machines if h is not root]
    server, client = survivors[-1], survivors[0]
    start_web_service(tb, server)
    step(f"before: {fetch_through_overlay(tb, client)}")
    tb.stop_agent(root, kill=True)
    step(f"killed the root on {root.name}")
    after = tb.wait_one_tree(survivors, timeout=60)
    new_root = next(h.name for h in survivors if tree_view(after[h.name])["role"] == "root")
    step(f"new root: {new_root}")
    step(f"after: {fetch_through_overlay(tb, client)}")


if __name__ == "__main__":
    sys.exit(main("coordinator-failover", scenario))
