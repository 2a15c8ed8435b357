#!/usr/bin/env python3
"""Scenario: five machines join one tree; a web service on m4 is reached from m1 and from m5 behind NAT."""

import sys

from _runner import main, step
from common import five_machines, fetch_through_overlay, start_web_service


def scenario(tb):
    hosts = five_machines(tb)
    tb.start_overlay(list(hosts.values()))
    tb.wait_one_tree(list(hosts.values()), timeout=60)
    step("one tree over 5 agents")
    start_web_service(tb, hosts["m4"])
    step(f"m1: {fetch_through_overlay(tb, hosts['m1'])}")
    step(f"m5 (behind NAT): {fetch_through_overlay(tb, hosts['m5'])}")


if __name__ == "__main__":
    sys.exit(main("join-and-route", scenario))
