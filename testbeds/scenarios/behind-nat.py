#!/usr/bin/env python3
"""Scenario behind-nat: m6 sits behind a NAT router (the underlay gives public machines no route to it; seed 002
section 4.3.3). As in the thesis' setup, the NAT router forwards one UDP port to m6's tunnel and m6's agent
advertises it (`--tunnel-endpoint`). m6 joins the tree, hosts a service that public machines reach by name and by
ServiceIP, and reaches a public service itself."""

import sys

from _runner import main, step
from common import API_SERVICE, SERVICE, TUNNEL_PORT, answers, expect, fetch, median_ms, six_machines, start_tree, start_web, url


def scenario(tb, figures):
    hosts = six_machines(tb)
    machines = list(hosts.values())
    nat_host = hosts["m6"]
    expect(not tb.ping(hosts["m1"], nat_host.ip, timeout=1, check=False), f"{nat_host.name} is reachable without the overlay: the NAT is not in place")
    step(f"underlay: no public machine reaches {nat_host.name} ({nat_host.ip}) behind the NAT")
    tunnel = tb.forward_port(tb.nodes["nat"], TUNNEL_PORT, nat_host)
    step(f"the NAT router forwards UDP {tunnel} to {nat_host.name}'s tunnel; its agent advertises it")
    figures.update(start_tree(tb, machines, extra_args={nat_host.name: ["--tunnel-endpoint", tunnel]}))
    step(f"{nat_host.name} is in the tree with subnet {tb.status(nat_host).get('subnet')} ({figures['subnets_s']} s)")
    start_web(tb, nat_host, 0, SERVICE)
    start_web(tb, hosts["m4"], 0, API_SERVICE)
    for client in (hosts["m1"], hosts["m5"]):
        service_ip = tb.wait_for(lambda c=client: tb.resolve(c, f"{SERVICE}.any.rr"), 60, f"{SERVICE} to resolve on {client.name}")
        reply = fetch(tb, client, [url("0.none", SERVICE)], [("name", url("any.rr", SERVICE), 3), ("serviceip", url(service_ip), 3)])
        figures[f"{client.name}_to_nat_fetch_ms_median"] = median_ms(reply)
        for label in ("name", "serviceip"):
            expect(answers(reply, label) == {f"hello from {nat_host.name}": 3}, f"{client.name} {label}: {answers(reply, label)}")
        step(f"{client.name} reaches {SERVICE} on {nat_host.name} by name and by ServiceIP {service_ip} (median {median_ms(reply)} ms)")
    reply = fetch(tb, nat_host, [url("0.none", API_SERVICE)], [("name", url("any.rr", API_SERVICE), 3)])
    expect(answers(reply, "name") == {"hello from m4": 3}, f"{nat_host.name} -> {API_SERVICE}: {answers(reply, 'name')}")
    figures["nat_to_m4_fetch_ms_median"] = median_ms(reply)
    step(f"{nat_host.name} reaches {API_SERVICE} on m4 by name (median {median_ms(reply)} ms)")


if __name__ == "__main__":
    sys.exit(main("behind-nat", scenario))
