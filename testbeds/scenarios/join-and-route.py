#!/usr/bin/env python3
"""Scenario join-and-route: six machines join one tree with no static routes; two services with instances on
several machines; clients reach them by name and by ServiceIP with rr (every instance answers) and closest (the
nearest instance by position answers)."""

import sys

from _runner import main, step
from common import API_SERVICE, SERVICE, answers, expect, fetch, median_ms, nearest, six_machines, start_tree, start_web, url

WEB_ON = ["m2", "m4", "m5"]  # Garching, Nuremberg, Erlangen
API_ON = ["m3", "m5"]  # Munich-Moosach, Erlangen


def check_service(tb, figures, client, service, servers, key):
    """rr by name reaches every instance; closest by name and by its ServiceIP reaches the nearest; rr by ServiceIP
    answers."""
    rr_ip = tb.wait_for(lambda: tb.resolve(client, f"{service}.any.rr"), 60, f"{service}.any.rr to resolve on {client.name}")
    closest_ip = tb.resolve(client, f"{service}.any.closest")
    step(f"{client.name}: {service}.any.rr -> {rr_ip}, {service}.any.closest -> {closest_ip}")
    expect(rr_ip != closest_ip, f"rr and closest share the ServiceIP {rr_ip}")
    warm = [url(f"{n}.none", service) for n in range(len(servers))]
    rounds = 2 * len(servers)
    reply = fetch(
        tb,
        client,
        warm,
        [
            ("rr", url("any.rr", service), rounds),
            ("closest", url("any.closest", service), 3),
            ("rr-ip", url(rr_ip), rounds),
            ("closest-ip", url(closest_ip), 3),
        ],
    )
    figures[f"{key}_cold_s"] = round(reply["warm_ms"] / 1000, 2)
    figures[f"{key}_fetch_ms_median"] = median_ms(reply)
    everyone = {f"hello from {s.name}" for s in servers}
    near = f"hello from {nearest(client, servers).name}"
    for label in ("rr", "rr-ip"):
        got = answers(reply, label)
        step(f"{client.name} {label:<10} {dict(sorted(got.items()))}")
        expect(set(got) == everyone, f"{label} from {client.name} reached {sorted(got)}, expected all of {sorted(everyone)}")
    for label in ("closest", "closest-ip"):
        got = answers(reply, label)
        step(f"{client.name} {label:<10} {dict(got)} (nearest: {near[11:]})")
        expect(set(got) == {near}, f"{label} from {client.name} reached {sorted(got)}, expected only {near!r}")


def scenario(tb, figures):
    hosts = six_machines(tb)
    machines = list(hosts.values())
    figures.update(start_tree(tb, machines))
    step(f"one tree over 6 agents in {figures['tree_s']} s, every machine has a subnet after {figures['subnets_s']} s")
    for number, name in enumerate(WEB_ON):
        start_web(tb, hosts[name], number, SERVICE)
    for number, name in enumerate(API_ON):
        start_web(tb, hosts[name], number, API_SERVICE)
    step(f"{SERVICE} on {', '.join(WEB_ON)}; {API_SERVICE} on {', '.join(API_ON)}")
    check_service(tb, figures, hosts["m1"], SERVICE, [hosts[n] for n in WEB_ON], "web_from_m1")
    check_service(tb, figures, hosts["m4"], API_SERVICE, [hosts[n] for n in API_ON], "api_from_m4")


if __name__ == "__main__":
    sys.exit(main("join-and-route", scenario))
