"""Self-test of the namespace testbed library. Run as root: `python3 -m unittest discover -s testbeds/netns -v`.

The tests that build namespaces skip with a message when not root (CI runs as root, so there they run).
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import canopy_netns as cn  # noqa: E402

NOT_READY = cn.missing_privileges()

UDP_ECHO_SOURCE = textwrap.dedent(
    """
    import socket
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 9999))
    s.settimeout(15)
    _, addr = s.recvfrom(100)
    print("source", addr[0], flush=True)
    """
)

TCP_SINK = textwrap.dedent(
    """
    import socket, time
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", 5201)); srv.listen(1); srv.settimeout(15)
    conn, _ = srv.accept(); total = 0; start = None
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            break
        if start is None:
            start = time.monotonic()
        total += len(chunk)
    print("mbit", total * 8 / (time.monotonic() - start) / 1e6, flush=True)
    """
)

TCP_SOURCE = textwrap.dedent(
    """
    import socket, sys, time
    s = socket.create_connection((sys.argv[1], 5201), timeout=10)
    block = b"x" * 65536; end = time.monotonic() + 2.0
    while time.monotonic() < end:
        s.sendall(block)
    s.close()
    """
)


class JoinCommandParsing(unittest.TestCase):
    def test_per_host_flags_are_dropped_and_the_rest_kept(self):
        args = ["--position", "48.1,11.5", "/ip4/198.18.0.1/udp/4001/quic-v1/p2p/12D3Koo", "--network-key-file", "/k",
                "--listen", "/ip4/0.0.0.0/tcp/1", "/ip4/0.0.0.0/udp/1/quic-v1", "--data-dir=/tmp/x", "--tunnel-port", "7"]
        self.assertEqual(
            cn._drop_per_host_flags(args),
            ["/ip4/198.18.0.1/udp/4001/quic-v1/p2p/12D3Koo", "--network-key-file", "/k", "--tunnel-port", "7"],
        )

    def test_join_line_is_found_in_agent_output(self):
        log = "2026-01-01 INFO started\n\x1b[1mTo add machines run:\x1b[0m  agent join /ip4/1.2.3.4/tcp/4001 --network-key k1 --data-dir /var/lib/canopy\n"
        self.assertEqual(cn.parse_join_command(log), ["/ip4/1.2.3.4/tcp/4001", "--network-key", "k1"])
        self.assertIsNone(cn.parse_join_command("INFO starting\n"))

    def test_one_tree_needs_one_root_and_everyone_below_it(self):
        root = {"id": "A", "role": "Root", "parent": None, "ancestors": []}
        leaf = {"id": "B", "role": "Leaf", "parent": "A", "ancestors": ["A"]}
        deep = {"id": "C", "role": "Leaf", "parent": "B", "ancestors": ["B", "A"]}
        cn.check_one_tree({"a": root, "b": leaf, "c": deep})
        with self.assertRaises(cn.TestbedError):
            cn.check_one_tree({"a": root, "b": dict(root, id="B")})
        with self.assertRaises(cn.TestbedError):
            cn.check_one_tree({"a": root, "c": {"id": "C", "role": "Detached", "parent": None, "ancestors": []}})
        with self.assertRaises(cn.TestbedError):
            cn.check_one_tree({"a": root, "c": dict(deep, parent="X", ancestors=["X"])})
        # Below a coordinator that is gone (killed): root among the ancestors, yet not in the tree.
        with self.assertRaises(cn.TestbedError):
            cn.check_one_tree({"a": root, "c": deep})

    def test_subnets_must_not_overlap(self):
        cn.check_disjoint_subnets({"a": "10.16.0.0/26", "b": "10.16.0.64/26"})
        with self.assertRaises(cn.TestbedError):
            cn.check_disjoint_subnets({"a": "10.16.0.0/26", "b": "10.16.0.32/27"})
        with self.assertRaises(cn.TestbedError):
            cn.check_disjoint_subnets({"a": "10.16.0.0/33"})

    def test_tree_view_finds_nested_fields(self):
        status = {"node": {"id": "B", "role": "Leaf", "parent": "A", "ancestors": ["A"]}, "services": []}
        self.assertEqual(cn.tree_view(status), {"id": "B", "role": "leaf", "parent": "A", "ancestors": ["A"]})


class RouteComputation(unittest.TestCase):
    """Routes over a chain of segments a - r1 - b - r2 - c, without creating anything."""

    def test_hosts_route_through_the_router_chain(self):
        tb = cn.Testbed(prefix="cnpdry")
        segs = {}
        for i, name in enumerate("abc"):
            segs[name] = cn.Segment(name, f"br{i}", cn.ipaddress.ip_network(f"198.18.{i}.0/24"), True)
            tb.segments[name] = segs[name]

        def node(name, kind, *seg_names):
            n = cn.Node(name, f"cnpdry-{name}", kind)
            for i, s in enumerate(seg_names):
                att = cn.Attachment(n, segs[s], f"eth{i}", segs[s].allocate())
                n.attachments.append(att)
                segs[s].attachments.append(att)
            tb.nodes[name] = n
            return n

        ha = node("ha", "host", "a")
        r1 = node("r1", "router", "a", "b")
        node("r2", "router", "b", "c")
        routes = {dest: (str(via), dev) for dest, via, dev in tb._routes_for(ha)}
        self.assertEqual(routes["198.18.1.0/24"], (str(r1.address_on(segs["a"])), "eth0"))
        self.assertEqual(routes["198.18.2.0/24"], (str(r1.address_on(segs["a"])), "eth0"))
        self.assertEqual(routes["default"], (str(r1.address_on(segs["a"])), "eth0"))
        r1_routes = {dest: (str(via), dev) for dest, via, dev in tb._routes_for(r1)}
        self.assertEqual(r1_routes["198.18.2.0/24"], (str(tb.nodes["r2"].address_on(segs["b"])), "eth1"))


@unittest.skipIf(NOT_READY, f"skipping namespace tests: {NOT_READY}")
class NamespaceTestbed(unittest.TestCase):
    def test_three_hosts_behind_nat_ping_and_full_teardown(self):
        with cn.Testbed() as tb:
            wan = tb.add_segment("wan")
            lan = tb.add_segment("lan", public=False)
            h1 = tb.add_host("h1", wan, position=(48.14, 11.58))
            h2 = tb.add_host("h2", wan, position=(48.15, 11.57))
            h3 = tb.add_host("h3", lan, position=(48.20, 11.60))
            nat = tb.add_nat_router("nat", wan=wan, lan=lan)
            tb.ping(h1, h2.ip)
            tb.ping(h2, h1.ip)
            tb.ping(h3, h1.ip)  # from behind the NAT to a public host
            self.assertFalse(tb.ping(h1, h3.ip, timeout=1, check=False), "a public host reached a private address")

            # The public host sees the NAT's public address, not the private one: masquerade works.
            server = tb.spawn(h1, [sys.executable, "-c", UDP_ECHO_SOURCE], log_name="udp-server")
            log = tb.processes[-1][2]
            for _ in range(20):
                tb.exec(h3, [sys.executable, "-c", f"import socket; socket.socket(2, 2).sendto(b'x', ('{h1.ip}', 9999))"])
                if server.poll() is not None:
                    break
                time.sleep(0.2)
            server.wait(timeout=5)
            self.assertIn(f"source {nat.address_on(wan)}", log.read_text())

            sleeper = tb.spawn(h2, ["sleep", "600"])
            workdir, prefix = tb.workdir, tb.prefix
            self.assertIn(f"{prefix}-h3", cn.list_netns())
        self.assertEqual(tb.leftovers(), [])
        self.assertFalse(workdir.exists())
        self.assertIsNotNone(sleeper.poll(), "a spawned process survived teardown")
        self.assertFalse([n for n in cn.list_netns() if n.startswith(prefix + "-")])

    def test_routed_segments_and_bandwidth_limit(self):
        with cn.Testbed() as tb:
            a, b, c = tb.add_segment("a"), tb.add_segment("b"), tb.add_segment("c")
            tb.add_router("r1", [a, b])
            tb.add_router("r2", [b, c])
            ha = tb.add_host("ha", a)
            hc = tb.add_host("hc", c)
            tb.ping(ha, hc.ip)
            tb.ping(hc, ha.ip)
            tb.set_link(hc, up=False)  # cut the cable
            self.assertFalse(tb.ping(ha, hc.ip, timeout=1, check=False), "ping crossed a link that is down")
            tb.set_link(hc, up=True)
            tb.wait_for(lambda: tb.ping(ha, hc.ip, timeout=1, check=False), 10, "the link to come back")

            tb.limit_bandwidth(hc, 20, qdisc="htb")
            sink = tb.spawn(hc, [sys.executable, "-c", TCP_SINK], log_name="sink")
            log = tb.processes[-1][2]
            tb.wait_for(lambda: "5201" in tb.exec(hc, ["ss", "-ltn"]).stdout, 10, "the TCP sink to listen")
            tb.exec(ha, [sys.executable, "-c", TCP_SOURCE, hc.ip], timeout=20)
            sink.wait(timeout=20)
            mbit = float(log.read_text().split()[-1])
            print(f"shaped throughput: {mbit:.1f} Mbit/s (htb 20 Mbit/s)", file=sys.stderr)
            # htb at 20 Mbit/s: well below the unshaped veth rate (Gbit/s), and not starved.
            self.assertLess(mbit, 26, f"measured {mbit:.1f} Mbit/s through a 20 Mbit/s limit")
            self.assertGreater(mbit, 10, f"measured only {mbit:.1f} Mbit/s through a 20 Mbit/s limit")

    def test_overlay_orchestration_with_a_stand_in_agent(self):
        """start/join/status/resolve/run plumbing, with fake_agent.py in place of the real agent."""
        fake = Path(__file__).resolve().parent / "fake_agent.py"
        with cn.Testbed(agent_binary=fake) as tb:
            wan, lan = tb.add_segment("wan"), tb.add_segment("lan", public=False)
            tb.add_nat_router("nat", wan=wan, lan=lan)
            hosts = [tb.add_host("h1", wan, (48.1, 11.5)), tb.add_host("h2", wan), tb.add_host("h3", lan)]
            tb.start_overlay(hosts)
            self.assertEqual(tb.join_command(hosts[0]), ["/ip4/198.18.0.2/tcp/4001", "--network-key-file", "/fake/key"])
            statuses = tb.wait_one_tree(hosts, timeout=20)
            root_id = statuses["h1"]["node"]["id"]
            self.assertEqual(statuses["h3"]["node"]["parent"], root_id)  # joined from behind the NAT
            self.assertEqual(tb.resolve(hosts[2], "demo.canopy.web.test.any.rr"), "10.30.0.7")
            self.assertIn("hello", tb.run_client(hosts[1], "demo.canopy.client.test", ["echo", "hello"]).stdout)
            tb.stop_agent(hosts[1], kill=True)
            tb.exec(hosts[1], ["rm", str(tb.data_dir(hosts[1]) / "state.json")])
            with self.assertRaises(cn.TestbedError):
                tb.wait_one_tree(hosts, timeout=2)
            agent_procs = [a.process for a in tb.agents.values()]
        self.assertTrue(all(p.poll() is not None for p in agent_procs), "an agent survived teardown")
        self.assertEqual(tb.leftovers(), [])

    def test_teardown_after_an_exception(self):
        with self.assertRaises(ZeroDivisionError):
            with cn.Testbed() as tb:
                seg = tb.add_segment("s")
                tb.add_host("h1", seg)
                tb.spawn(tb.nodes["h1"], ["sleep", "600"])
                1 / 0
        self.assertEqual(tb.leftovers(), [])

    def test_teardown_on_sigterm(self):
        script = textwrap.dedent(
            f"""
            import sys, time
            sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
            import canopy_netns as cn
            with cn.Testbed() as tb:
                seg = tb.add_segment("s")
                h = tb.add_host("h1", seg)
                sleeper = tb.spawn(h, ["sleep", "600"])
                print(tb.prefix, sleeper.pid, tb.workdir, flush=True)
                time.sleep(600)
            """
        )
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        try:
            prefix, sleeper_pid, workdir = child.stdout.readline().split()
            os.kill(child.pid, signal.SIGTERM)
            self.assertEqual(child.wait(timeout=30), 128 + signal.SIGTERM)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            child.stdout.close()
        self.assertFalse([n for n in cn.list_netns() if n.startswith(prefix + "-")])
        self.assertFalse(cn._pid_alive(int(sleeper_pid)), "the spawned process survived SIGTERM of its owner")
        self.assertFalse(Path(workdir).exists())


if __name__ == "__main__":
    unittest.main()
