#!/usr/bin/env python3
"""Scenario: a machine behind NAT joins and hosts the service; public machines reach it through the overlay
although the underlay gives them no route to it."""

import sys

from _runner import main, step
from common import five_machines, fetch_through_overlay, start_web_service
from canopy_netns import TestbedError


def scenario(tb):
    hosts = five_machines(tb)
    machines = list(hosts.values())
    if tb.ping(hosts["m3"], hosts["m5"].ip, timeout=1, check=False):
        raise TestbedError("m5 is reachable without the overlay: the NAT is not in place")
    tb.start_overlay(machines)
    tb.wait_one_tree(machines, timeout=60)
    step("m5 (behind NAT) is in the tree")
    start_web_service(tb, hosts["m5"])
    step(f"m3: {fetch_through_overlay(tb, hosts['m3'])}")


if __name__ == "__main__":
    sys.exit(main("behind-nat", scenario))
