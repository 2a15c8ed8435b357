"""Topology definitions shared by the Mininet and containernet runners (plain data, no Mininet import).

A topology is switches, links between switches (with an optional delay and bandwidth), and hosts, each on one
switch and with a geographic position for its agent. Runners turn it into Mininet or containernet objects.

Topologies:
- ``linear(n)``: a chain of n switches, one host on each.
- ``star(n)``: one switch, n hosts.
- ``vineio(letter)``: the binary-tree topologies A-D of the VineIO evaluation (seed 003, section 4.2.1): hosts
  spread over Munich, every link 5 ms. The thesis shows the trees only as figures; from its text:
  A is a 3-level binary tree (7 switches) with one host per switch (7 hosts). B, C and D share a 5-level tree
  (31 switches). In B the 10 hosts sit on levels 3 and 5 only, so every host-to-host path is a multiple of
  2 hops. C has 20 hosts, one on every switch of levels 1-4 and 5 on leaves ("most nodes not on the 5th level").
  D has 30 hosts with the leaves densely populated: one on every switch but the root (all 16 leaves).
- ``two_sites(n)``: two sites (Munich, Hamburg) of n hosts each on their own switch, joined by one WAN link.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

# Munich, roughly inside the city limits (lat/lon bounding box) and Hamburg for the second site.
MUNICH = (48.06, 11.36, 48.25, 11.72)
HAMBURG = (53.45, 9.85, 53.65, 10.15)
VINEIO_LINK_DELAY_MS = 5.0


@dataclass(frozen=True)
class Host:
    name: str
    switch: str
    position: tuple[float, float]


@dataclass(frozen=True)
class Link:
    a: str
    b: str
    delay_ms: float | None = None
    bandwidth_mbit: float | None = None


@dataclass
class Topology:
    name: str
    switches: list[str] = field(default_factory=list)
    links: list[Link] = field(default_factory=list)
    hosts: list[Host] = field(default_factory=list)
    # Delay on host-to-switch links, in ms (None: no delay).
    host_link_delay_ms: float | None = None

    def validate(self) -> None:
        """Raise ValueError on dangling names, duplicates or a switch graph with a loop or islands (Linux bridges
        run without spanning tree here, so a loop would flood forever)."""
        names = self.switches + [h.name for h in self.hosts]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: duplicate node names")
        switches = set(self.switches)
        for link in self.links:
            if link.a not in switches or link.b not in switches:
                raise ValueError(f"{self.name}: link {link.a}-{link.b} names an unknown switch")
        for host in self.hosts:
            if host.switch not in switches:
                raise ValueError(f"{self.name}: host {host.name} is on unknown switch {host.switch}")
        if self.switches and len(self.links) != len(self.switches) - 1:
            raise ValueError(f"{self.name}: {len(self.switches)} switches need {len(self.switches) - 1} links for a tree")
        # Connected with n-1 links means a tree.
        reached, frontier = {self.switches[0]}, [self.switches[0]] if self.switches else []
        while frontier:
            current = frontier.pop()
            for link in self.links:
                for x, y in ((link.a, link.b), (link.b, link.a)):
                    if x == current and y not in reached:
                        reached.add(y)
                        frontier.append(y)
        if reached != switches:
            raise ValueError(f"{self.name}: switches {sorted(switches - reached)} are not connected")


def _positions(count: int, box: tuple[float, float, float, float], seed: int) -> list[tuple[float, float]]:
    """`count` positions spread uniformly over a lat/lon box, the same for the same seed."""
    rng = random.Random(seed)
    lat0, lon0, lat1, lon1 = box
    return [(round(rng.uniform(lat0, lat1), 5), round(rng.uniform(lon0, lon1), 5)) for _ in range(count)]


def linear(n: int, seed: int = 0) -> Topology:
    if n < 1:
        raise ValueError("linear needs at least 1 host")
    topo = Topology(f"linear-{n}", switches=[f"s{i}" for i in range(1, n + 1)])
    topo.links = [Link(f"s{i}", f"s{i + 1}") for i in range(1, n)]
    topo.hosts = [Host(f"h{i}", f"s{i}", pos) for i, pos in enumerate(_positions(n, MUNICH, seed), start=1)]
    return topo


def star(n: int, seed: int = 0) -> Topology:
    if n < 1:
        raise ValueError("star needs at least 1 host")
    topo = Topology(f"star-{n}", switches=["s1"])
    topo.hosts = [Host(f"h{i}", "s1", pos) for i, pos in enumerate(_positions(n, MUNICH, seed), start=1)]
    return topo


def _binary_tree(levels: int, delay_ms: float) -> tuple[list[str], list[Link], dict[int, list[str]]]:
    """Switches s1..s(2^levels - 1) in heap order (children of si are s2i and s2i+1) and the switches per level."""
    count = 2**levels - 1
    switches = [f"s{i}" for i in range(1, count + 1)]
    links = [Link(f"s{i // 2}", f"s{i}", delay_ms=delay_ms) for i in range(2, count + 1)]
    by_level = {level: [f"s{i}" for i in range(2 ** (level - 1), 2**level)] for level in range(1, levels + 1)}
    return switches, links, by_level


def _spread(items: list[str], k: int) -> list[str]:
    """k items picked evenly across the list (so hosts spread over both halves of a tree level)."""
    if k > len(items):
        raise ValueError(f"cannot pick {k} of {len(items)}")
    return [items[(i * len(items)) // k] for i in range(k)]


def vineio(letter: str, seed: int = 0) -> Topology:
    """VineIO evaluation topology A, B, C or D (see the module doc for how the figures were read)."""
    letter = letter.upper()
    if letter == "A":
        switches, links, by_level = _binary_tree(3, VINEIO_LINK_DELAY_MS)
        placement = switches
    elif letter in ("B", "C", "D"):
        switches, links, by_level = _binary_tree(5, VINEIO_LINK_DELAY_MS)
        if letter == "B":
            placement = by_level[3] + _spread(by_level[5], 6)
        elif letter == "C":
            placement = [s for level in (1, 2, 3, 4) for s in by_level[level]] + _spread(by_level[5], 5)
        else:
            placement = [s for level in (2, 3, 4, 5) for s in by_level[level]]
    else:
        raise ValueError(f"unknown VineIO topology {letter!r}: use A, B, C or D")
    topo = Topology(f"vineio-{letter}", switches=switches, links=links, host_link_delay_ms=VINEIO_LINK_DELAY_MS)
    positions = _positions(len(placement), MUNICH, seed)
    topo.hosts = [Host(f"h{i}", sw, pos) for i, (sw, pos) in enumerate(zip(placement, positions), start=1)]
    return topo


VINEIO_HOST_COUNTS = {"A": 7, "B": 10, "C": 20, "D": 30}


def two_sites(n_per_site: int, wan_delay_ms: float = 20.0, wan_bandwidth_mbit: float | None = 100.0, seed: int = 0) -> Topology:
    """Two sites (Munich, Hamburg), each a switch with n hosts, joined by one WAN link."""
    if n_per_site < 1:
        raise ValueError("two_sites needs at least 1 host per site")
    topo = Topology(f"two-sites-{n_per_site}", switches=["s1", "s2"])
    topo.links = [Link("s1", "s2", delay_ms=wan_delay_ms, bandwidth_mbit=wan_bandwidth_mbit)]
    munich = _positions(n_per_site, MUNICH, seed)
    hamburg = _positions(n_per_site, HAMBURG, seed + 1)
    topo.hosts = [Host(f"h{i}", "s1", pos) for i, pos in enumerate(munich, start=1)]
    topo.hosts += [Host(f"h{n_per_site + i}", "s2", pos) for i, pos in enumerate(hamburg, start=1)]
    return topo


def by_name(name: str, size: int | None = None, seed: int = 0) -> Topology:
    """A topology from a CLI name: linear, star, two-sites (with size), or vineio-a .. vineio-d."""
    name = name.lower()
    if name.startswith("vineio-"):
        topo = vineio(name.removeprefix("vineio-"), seed)
    elif name == "linear":
        topo = linear(size or 3, seed)
    elif name == "star":
        topo = star(size or 3, seed)
    elif name == "two-sites":
        topo = two_sites(size or 2, seed=seed)
    else:
        raise ValueError(f"unknown topology {name!r}: use linear, star, two-sites or vineio-a..vineio-d")
    topo.validate()
    return topo


NAMES = ["linear", "star", "two-sites", "vineio-a", "vineio-b", "vineio-c", "vineio-d"]
