#!/usr/bin/env python3
"""Scenario many-instances: a machine runs more instances than one machine subnet holds. Oakestra gave each
machine one /26 (a ceiling of 61 instances); here a machine whose subnet runs low asks the tree for another
(issue 5). With `--machine-prefix 29` (5 instances per subnet) nine instances on m2 need a second subnet (a third is
asked for when the free addresses run low); every instance answers at its InstanceIP from m1, also those that
answers to m1 leave out (pruned to the k most relevant instances per policy): m1 asks for them by InstanceIP.
Then a service deployed with a fixed rr ServiceIP and an InstanceIP rule gets exactly those addresses (seed 002
section 3.6.3), and another service asking for the same ServiceIP is refused with a message naming the holder.

Measured: the subnets m2 ends up with, and the seconds from the first `agent run` until all instances answer."""

import sys
import time

from _runner import main, step

from common import API_SERVICE as API, SERVICE, WEB_SERVER, answers, expect, expect_served_by, fetch, local_instances, start_tree, start_web, url, wait_local_instances

FIXED_RR = "10.30.25.3"
FIXED_BASE = "10.30.25.5"
FIXED_INSTANCE_1 = "10.30.25.6"
CLASH = "demo.canopy.clash.test"

INSTANCES = 9
PREFIX = "29"


def scenario(tb, figures):
    segment = tb.add_segment("wan")
    hosts = {name: tb.add_host(name, segment, position=(48.1 + i * 0.05, 11.5)) for i, name in enumerate(["m1", "m2"])}
    tb.install_routes()
    machines = list(hosts.values())
    figures.update(start_tree(tb, machines, extra_args={h.name: ["--machine-prefix", PREFIX] for h in machines}))
    client, server = hosts["m1"], hosts["m2"]
    step(f"one tree over 2 agents in {figures['tree_s']} s; machine subnets are /{PREFIX} (5 instances each)")

    started = time.monotonic()
    for number in range(INSTANCES):
        start_web(tb, server, number)
        wait_local_instances(tb, server, SERVICE, number + 1)
    instance_ips = local_instances(tb, server, SERVICE)
    expect(len(set(instance_ips.values())) == INSTANCES, f"InstanceIPs are not distinct: {instance_ips}")
    dataplane = tb.api(server, "GET", "/v1/dataplane")
    subnets = [dataplane["subnet"]] + dataplane.get("extra_subnets", [])
    figures["subnets"] = subnets
    step(f"{INSTANCES} instances on {server.name}, which holds the subnets {subnets}")
    expect(len(subnets) >= 2, f"{server.name} ran {INSTANCES} instances on /{PREFIX} subnets but holds only {subnets}")
    namespace_ips = sorted(a["namespace_ip"] for a in dataplane["attachments"])
    step(f"namespace IPs {namespace_ips}")

    urls = [url(ip) for _, ip in sorted(instance_ips.items())]
    expect_served_by(tb, client, urls, server, "each instance", warmup=60)
    figures["all_answer_s"] = round(time.monotonic() - started, 1)
    step(f"{client.name} reaches all {INSTANCES} instances at their InstanceIPs ({figures['all_answer_s']} s after the first run)")

    # Fixed addresses (seed 002 section 3.6.3): a ServiceIP for rr and an InstanceIP rule; a second service asking
    # for the same ServiceIP is refused with a message naming it.
    fixed = ["--service-ip", f"rr={FIXED_RR}", "--instance-ips", f"0..4={FIXED_BASE}"]
    tb.run_service(client, API, ["python3", "-c", WEB_SERVER, client.name], instance=1, extra_args=fixed)
    api_ips = wait_local_instances(tb, client, API, 1)
    expect(api_ips == {1: FIXED_INSTANCE_1}, f"{API} instance 1 got {api_ips}, not {FIXED_INSTANCE_1} from the rule")
    rr_ip = tb.wait_for(lambda: tb.resolve(server, f"{API}.any.rr"), 60, f"{API}.any.rr to resolve on {server.name}")
    expect(rr_ip == FIXED_RR, f"{API}'s rr ServiceIP resolves to {rr_ip}, not the fixed {FIXED_RR}")
    reply = fetch(tb, server, [url(FIXED_RR)], [("fixed", url(FIXED_RR), 2)], warmup=60)
    expect(answers(reply, "fixed") == {f"hello from {client.name}": 2}, f"the fixed ServiceIP answered {reply}")
    step(f"{API}: fixed rr ServiceIP {FIXED_RR} and InstanceIP {FIXED_INSTANCE_1} (rule 0..4={FIXED_BASE}), reachable from {server.name}")
    clash = tb.exec(client, [str(tb.find_agent_binary()), "run", "--data-dir", str(tb.data_dir(client)), "--service", CLASH,
                             "--service-ip", f"rr={FIXED_RR}", "--", "true"], check=False, timeout=60)
    expect(clash.returncode != 0 and FIXED_RR in clash.stderr, f"a second service got {FIXED_RR}: exit {clash.returncode} {clash.stderr[-300:]}")
    figures["taken_address_error"] = clash.stderr.strip().splitlines()[-1][-160:]
    step(f"{CLASH} asking for {FIXED_RR} is refused: {figures['taken_address_error']}")


if __name__ == "__main__":
    sys.exit(main("many-instances", scenario))
