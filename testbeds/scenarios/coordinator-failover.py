#!/usr/bin/env python3
"""Scenario coordinator-failover: kill -9 the root agent, then a cluster coordinator. Measures how long until the
survivors form one whole tree again and how long new connections to a service (by name, a DNS lookup each time)
fail, while probes show whether traffic to another service (by ServiceIP) keeps flowing."""

import sys
import time

from _runner import main, step
from canopy_netns import GiveUp, TestbedError, tree_view
from common import add_bystanders, API_SERVICE, CLIENT_SERVICE, SERVICE, expect, fetch, six_machines, start_tree, start_web, url
from web_programs import WEB_PROBE, probe_outages, read_probe_log

# Traffic to the other service may pause at most this long while the tree heals (its data path does not go through
# the killed agents; only a lost tunnel packet or a slow probe should show).
API_MAX_OUTAGE_S = 2.0
# 6 + 16 machines: 21 survive the root, 20 the coordinator; more than 17 keeps a level of coordinators.
BYSTANDERS = 16


def pick_roles(tb, machines):
    statuses = {h.name: tb.status(h) for h in machines}
    return {h.name: tree_view(statuses[h.name])["role"] for h in machines}


def probe_attached(probe, log_path):
    """True once `agent run` says the probe runs as an instance; GiveUp when it exited instead."""
    text = log_path.read_text(errors="replace")
    if "running as" in text:
        return True
    if probe.poll() is not None:
        raise GiveUp(f"the probe exited: {text.strip()[-300:]}")
    return False


def describe(roles):
    """`root m1; coordinators m2 m3; 18 leaves`."""
    by_role = {}
    for name, role in roles.items():
        by_role.setdefault(role, []).append(name)
    text = [f"root {' '.join(by_role.get('root', []))}", f"coordinators {' '.join(by_role.get('coordinator', [])) or '-'}"]
    text += [f"{len(names)} {'leaves' if role == 'leaf' else role}" for role, names in by_role.items() if role not in ("root", "coordinator")]
    return "; ".join(text)


def kill_and_heal(tb, figures, key, victim, survivors, probes, timeout=90):
    """SIGKILL `victim`'s agent; the seconds until the survivors form one tree; probe figures from the kill until
    a few seconds after the tree is whole."""
    killed = time.time()
    tb.stop_agent(victim, kill=True)
    tb.wait_one_tree(survivors, timeout=timeout)
    whole = time.time() - killed
    figures[f"{key}_tree_whole_s"] = round(whole, 1)
    step(f"killed {victim.name}; the {len(survivors)} survivors are one tree again after {whole:.1f} s")
    time.sleep(4)  # let the probes see the healed tree
    for name, log_path in probes.items():
        result = probe_outages(read_probe_log(log_path.read_text(errors="replace")), killed, time.time())
        figures[f"{key}_{name}"] = result
        step(f"  {name}: {result['attempts']} connections, {result['failures']} failed, longest outage "
             f"{result['longest_outage_s']} s, working again {result['recovered_after_s']} s after the kill")


def scenario(tb, figures):
    hosts = six_machines(tb)
    # Enough machines that the tree has coordinators below the root even after the root is gone (see add_bystanders).
    add_bystanders(tb, hosts, BYSTANDERS)
    machines = list(hosts.values())
    # Joins a little apart: 22 debug-build agents starting at once starve each other of CPU on a 2-core machine.
    figures.update(start_tree(tb, machines, stagger=0.5))
    roles = pick_roles(tb, machines)
    step(f"one tree over {len(machines)} agents in {figures['tree_s']} s: {describe(roles)}")
    root = next(h for h in machines if roles[h.name] == "root")
    # Client and the other service on leaves (they must outlive both kills), the web service on two more machines.
    # (m6 is behind the NAT: the behind-nat scenario covers it.)
    others = sorted((h for h in machines if h is not root and h.name != "m6"), key=lambda h: roles[h.name] != "leaf")
    client, api_host, web_hosts = others[0], others[1], others[2:4]
    for number, host in enumerate(web_hosts):
        start_web(tb, host, number, SERVICE)
    start_web(tb, api_host, 0, API_SERVICE)
    step(f"{SERVICE} on {', '.join(h.name for h in web_hosts)}; {API_SERVICE} on {api_host.name}; client on {client.name}")
    api_ip = tb.wait_for(lambda: tb.resolve(client, f"{API_SERVICE}.any.rr"), 60, f"{API_SERVICE} to resolve")
    fetch(tb, client, [url(f"{n}.none", SERVICE) for n in range(len(web_hosts))] + [url(api_ip)], [("web", url("any.rr", SERVICE), 2)])
    stop_file = tb.workdir / "stop-probes"
    probes = {}
    # Each probe is its own instance of the client service (numbers apart from the one `fetch` uses).
    for number, (name, target) in enumerate((("web_by_name", url("any.rr", SERVICE)), ("api_by_serviceip", url(api_ip))), start=10):
        probe = tb.run_service(client, CLIENT_SERVICE, ["python3", "-c", WEB_PROBE, target, str(stop_file)], instance=number, log_name=f"probe-{name}")
        probes[name] = log_path = tb.processes[-1][2]
        # One at a time: two `agent run` of one service started together on a machine can fail ("the root gave no
        # InstanceIP for instance 11"), an agent issue reported in issue 7.
        tb.wait_for(lambda: probe_attached(probe, log_path), 30, f"the {name} probe to attach")
    time.sleep(2)
    for name, log_path in probes.items():
        expect(any(e["ok"] for e in read_probe_log(log_path.read_text(errors="replace"))), f"the {name} probe never got through")
    step("probes running: a new connection every 0.2 s to the web service by name and to the api by ServiceIP")

    survivors = [h for h in machines if h is not root]
    kill_and_heal(tb, figures, "root_kill", root, survivors, probes)
    roles = pick_roles(tb, survivors)
    step(f"after: {describe(roles)}")
    # A coordinator below the new root; prefer one that hosts no instance and is not the client.
    coordinators = [h for h in survivors if roles[h.name] == "coordinator"]
    coordinators.sort(key=lambda h: (h in (client, api_host), h in web_hosts))
    if not coordinators:
        raise TestbedError(f"no coordinator below the root to kill (roles {roles})")
    coordinator = coordinators[0]
    expect(coordinator not in (client, api_host), f"the only coordinators are the client or the api host: {roles}")
    remaining = [h for h in survivors if h is not coordinator]
    kill_and_heal(tb, figures, "coordinator_kill", coordinator, remaining, probes)

    stop_file.touch()
    fresh = fetch(tb, client, [url("any.rr", SERVICE)], [("web", url("any.rr", SERVICE), 2)], warmup=30)
    step(f"after both kills a new client on {client.name} reaches {SERVICE} by name: {fresh['results'][0]['answer']}")
    for key in ("root_kill", "coordinator_kill"):
        api = figures[f"{key}_api_by_serviceip"]
        expect(api["longest_outage_s"] <= API_MAX_OUTAGE_S,
               f"{key}: traffic to {API_SERVICE} stopped for {api['longest_outage_s']} s (allowed {API_MAX_OUTAGE_S} s)")
        web = figures[f"{key}_web_by_name"]
        expect(web["recovered_after_s"] != float("inf"), f"{key}: new connections to {SERVICE} never worked again")


if __name__ == "__main__":
    sys.exit(main("coordinator-failover", scenario))
