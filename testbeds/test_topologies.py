"""Checks of the shared topology definitions: `python3 -m unittest discover -s testbeds -v` (no root needed)."""

import itertools
import sys
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import topologies as t  # noqa: E402


def switch_distance(topo: t.Topology, a: str, b: str) -> int:
    """Hops between two switches (breadth-first over the links)."""
    frontier, seen, hops = {a}, {a}, 0
    while b not in frontier:
        nxt = set()
        for link in topo.links:
            for x, y in ((link.a, link.b), (link.b, link.a)):
                if x in frontier and y not in seen:
                    nxt.add(y)
        if not nxt:
            raise AssertionError(f"{b} unreachable from {a}")
        seen |= nxt
        frontier, hops = nxt, hops + 1
    return hops


def level(switch: str) -> int:
    return int(switch[1:]).bit_length()  # heap order: s1 level 1, s2-s3 level 2, ...


class VineIOTopologies(unittest.TestCase):
    def test_host_counts_and_tree_sizes_match_the_thesis(self):
        for letter, hosts in t.VINEIO_HOST_COUNTS.items():
            topo = t.vineio(letter)
            topo.validate()
            self.assertEqual(len(topo.hosts), hosts, letter)
            self.assertEqual(len(topo.switches), 7 if letter == "A" else 31, letter)
            self.assertTrue(all(link.delay_ms == 5.0 for link in topo.links))
            self.assertEqual(len({h.switch for h in topo.hosts}), hosts, f"{letter}: two hosts share a switch")

    def test_b_has_only_even_host_distances(self):
        topo = t.vineio("B")
        for x, y in itertools.combinations(topo.hosts, 2):
            self.assertEqual(switch_distance(topo, x.switch, y.switch) % 2, 0, f"{x} {y}")

    def test_c_is_mostly_off_the_leaves_and_d_mostly_on_them(self):
        c_leaves = sum(level(h.switch) == 5 for h in t.vineio("C").hosts)
        d_leaves = sum(level(h.switch) == 5 for h in t.vineio("D").hosts)
        self.assertLess(c_leaves, 10)
        self.assertGreaterEqual(d_leaves, 15)

    def test_hosts_are_in_munich_and_positions_repeat_with_the_seed(self):
        lat0, lon0, lat1, lon1 = t.MUNICH
        for h in t.vineio("D").hosts:
            self.assertTrue(lat0 <= h.position[0] <= lat1 and lon0 <= h.position[1] <= lon1, h)
        self.assertEqual(t.vineio("C", seed=3).hosts, t.vineio("C", seed=3).hosts)
        self.assertNotEqual(t.vineio("C", seed=3).hosts, t.vineio("C", seed=4).hosts)


class OtherTopologies(unittest.TestCase):
    def test_by_name_builds_valid_trees(self):
        for name in t.NAMES:
            topo = t.by_name(name, 4)
            self.assertTrue(topo.hosts, name)

    def test_two_sites_share_one_wan_link(self):
        topo = t.two_sites(3)
        self.assertEqual([(l.a, l.b) for l in topo.links], [("s1", "s2")])
        self.assertEqual(sum(h.switch == "s2" for h in topo.hosts), 3)
        self.assertGreater(min(h.position[0] for h in topo.hosts if h.switch == "s2"), 53)

    def test_validation_rejects_loops_and_unknown_names(self):
        looped = t.linear(3)
        looped.links.append(t.Link("s1", "s3"))
        with self.assertRaises(ValueError):
            looped.validate()
        dangling = t.star(2)
        dangling.hosts.append(t.Host("h9", "s7", (48.1, 11.5)))
        with self.assertRaises(ValueError):
            dangling.validate()
        with self.assertRaises(ValueError):
            t.by_name("ring")


if __name__ == "__main__":
    unittest.main()
