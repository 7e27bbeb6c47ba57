"""Affinity-tile placement (seed §6): split a cell's nodes into tiles of pP+dD nodes plus flex nodes so that
every switch sees a prefill/decode port mix close to the global ratio.

Owned by `kvlane.policy.topology`; runs in the CLI (`kvlane plan tiles`) and the policy service at start.
Pure and deterministic: the same topology, node count and ratio always give the same placement.
It never assigns a P zone and a D zone (the "wrong approach" of §6): roles are interleaved switch by switch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .model import Topology, TopologyError

PREFILL, DECODE, FLEX = "prefill", "decode", "flex"


@dataclass(frozen=True)
class Tile:
    id: int
    prefill: tuple[str, ...]
    decode: tuple[str, ...]

    @property
    def nodes(self) -> tuple[str, ...]:
        return self.prefill + self.decode


@dataclass(frozen=True)
class SwitchBalance:
    """NIC ports of prefill / decode nodes on one switch (flex nodes are not counted)."""

    switch: str
    prefill_ports: int
    decode_ports: int
    p_fraction: float
    deviation: float      # |p_fraction - target|
    excess_ports: float   # prefill_ports - target * (prefill_ports + decode_ports)


@dataclass
class Placement:
    ratio: tuple[int, int]           # tile composition (P nodes, D nodes)
    target_p_fraction: float         # P / (P + D)
    tiles: list[Tile]
    flex: list[str]
    roles: dict[str, str]            # node -> prefill | decode | flex
    switches: list[SwitchBalance] = field(default_factory=list)
    method: str = "flow"             # "flow" (exact floor/ceil rounding) or "greedy" (fallback)

    @property
    def max_deviation(self) -> float:
        return max((s.deviation for s in self.switches), default=0.0)

    @property
    def mean_deviation(self) -> float:
        return sum(s.deviation for s in self.switches) / len(self.switches) if self.switches else 0.0

    def tile_of(self, node: str) -> int | None:
        for t in self.tiles:
            if node in t.nodes:
                return t.id
        return None

    def apply(self, topo: Topology) -> None:
        """Write tiles and role hints into `topo` (nodes outside the plan get no tile and no role)."""
        tile_of = {n: t.id for t in self.tiles for n in t.nodes}
        for n in topo.nodes:
            topo.set_node_attrs(n, tile=tile_of.get(n), role_hint=self.roles.get(n))

    def to_dict(self) -> dict[str, Any]:
        p, d = self.ratio
        return {
            "ratio": f"{p}:{d}",
            "tile": f"{p}P+{d}D",
            "tiles": len(self.tiles),
            "flex": len(self.flex),
            "prefill_nodes": sum(1 for r in self.roles.values() if r == PREFILL),
            "decode_nodes": sum(1 for r in self.roles.values() if r == DECODE),
            "target_p_fraction": round(self.target_p_fraction, 6),
            "method": self.method,
            "max_switch_deviation": round(self.max_deviation, 6),
            "mean_switch_deviation": round(self.mean_deviation, 6),
            "tile_members": {str(t.id): {"prefill": list(t.prefill), "decode": list(t.decode)} for t in self.tiles},
            "flex_nodes": list(self.flex),
            "switch_balance": {s.switch: {"prefill_ports": s.prefill_ports, "decode_ports": s.decode_ports,
                                          "p_fraction": round(s.p_fraction, 6)} for s in self.switches},
        }


def parse_ratio(ratio: str, tile: str | None = None) -> tuple[int, int]:
    """"3:2" → (3, 2) = tiles of 3P+2D (not reduced: "4:4" is the seed's balanced 4P+4D tile). `tile`
    ("4P+4D") overrides the composition and must have the same proportion as `ratio`."""
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", ratio)
    if not m or int(m[1]) < 1 or int(m[2]) < 1:
        raise TopologyError(f"ratio must look like P:D with positive integers (e.g. 3:2), got {ratio!r}")
    p, d = int(m[1]), int(m[2])
    if tile is None:
        return p, d
    mt = re.fullmatch(r"\s*(\d+)\s*[pP]\s*\+\s*(\d+)\s*[dD]\s*", tile)
    if not mt or int(mt[1]) < 1 or int(mt[2]) < 1:
        raise TopologyError(f"tile must look like 4P+4D, got {tile!r}")
    tp, td = int(mt[1]), int(mt[2])
    if tp * d != td * p:
        raise TopologyError(f"tile {tile} does not have the ratio {ratio}")
    return tp, td


def plan_tiles(topology: Topology, nodes: int | None = None, ratio: str = "3:2", tile: str | None = None
               ) -> Placement:
    """Place `nodes` nodes (the topology's first N, default all) as ⌊N/(p+d)⌋ tiles of pP+dD plus flex.

    1. Flex nodes (the remainder) sit at evenly spaced positions in node order.
    2. Roles. Switches with the same set of member nodes form a class (ZCube: one class per A switch, one
       per group of B switches; ROFT: one per rail group). When every node lies in at most two classes and
       the classes form a bipartite graph (every fabric generated here except ZCube k≥3), P counts are
       rounded by a min-cost flow so that every class, and every (row, column) cell, gets ⌊f·n⌋ or ⌈f·n⌉
       prefill nodes (f = p/(p+d); the rounding exists by Bacharach's matrix-rounding theorem): every
       switch is then within one node's ports of the global ratio. Otherwise a greedy pass gives each node
       the role that keeps its switches closest to the ratio.
    3. Tiles: walking nodes in order, each P (D) node joins the earliest tile still short of P (D) nodes,
       so a tile's members are neighbours in the fabric.
    """
    p, d = parse_ratio(ratio, tile)
    all_nodes = topology.nodes
    n = len(all_nodes) if nodes is None else nodes
    if not 1 <= n <= len(all_nodes):
        raise TopologyError(f"nodes must be between 1 and the topology's {len(all_nodes)} nodes, got {n}")
    size = p + d
    n_tiles = n // size
    if n_tiles == 0:
        raise TopologyError(f"{n} nodes cannot hold one tile of {p}P+{d}D")
    n_flex = n - n_tiles * size
    chosen = all_nodes[:n]
    flex_idx = {int((i + 0.5) * n / n_flex) for i in range(n_flex)} if n_flex else set()
    target = p / size
    ports = {nd: topology.switches_of_node(nd) for nd in chosen}
    planned = [nd for i, nd in enumerate(chosen) if i not in flex_idx]
    method = "flow"
    prefill = _round_by_flow(planned, ports, target, n_tiles * p)
    if prefill is None:
        method, prefill = "greedy", _greedy(planned, ports, target, n_tiles * p, n_tiles * d)
    roles = {nd: (FLEX if i in flex_idx else PREFILL if nd in prefill else DECODE) for i, nd in enumerate(chosen)}
    p_ports: dict[str, int] = {}
    all_ports: dict[str, int] = {}
    for nd in planned:
        for sw, c in ports[nd].items():
            all_ports[sw] = all_ports.get(sw, 0) + c
            if nd in prefill:
                p_ports[sw] = p_ports.get(sw, 0) + c
    open_p: list[list[str]] = [[] for _ in range(n_tiles)]
    open_d: list[list[str]] = [[] for _ in range(n_tiles)]
    for nd in chosen:
        bucket, cap_n = (open_p, p) if roles[nd] == PREFILL else (open_d, d) if roles[nd] == DECODE else (None, 0)
        if bucket is None:
            continue
        for members in bucket:
            if len(members) < cap_n:
                members.append(nd)
                break
    tiles = [Tile(i, tuple(open_p[i]), tuple(open_d[i])) for i in range(n_tiles)]
    balance = []
    for sw in topology.switches:
        tot = all_ports.get(sw, 0)
        if tot == 0:
            continue
        pp = p_ports.get(sw, 0)
        frac = pp / tot
        balance.append(SwitchBalance(sw, pp, tot - pp, frac, abs(frac - target), pp - target * tot))
    return Placement((p, d), target, tiles, [nd for nd in chosen if roles[nd] == FLEX], roles, balance, method)


def _round_by_flow(nodes: list[str], ports: dict[str, dict[str, int]], f: float, quota: int) -> set[str] | None:
    """Exact floor/ceil rounding of P counts on a two-family (rows × columns) switch structure, or None."""
    import math

    import networkx as nx

    members: dict[str, list[str]] = {}
    for nd in nodes:
        for sw in ports[nd]:
            members.setdefault(sw, []).append(nd)
    cls_of_set: dict[tuple[str, ...], int] = {}
    node_classes: dict[str, list[int]] = {nd: [] for nd in nodes}
    for sw in sorted(members):
        key = tuple(members[sw])
        if key not in cls_of_set:
            cls_of_set[key] = len(cls_of_set)
            for nd in key:
                node_classes[nd].append(cls_of_set[key])
    if any(len(c) > 2 or not c for c in node_classes.values()):
        return None
    # two-colour the class graph (an edge per node in two classes)
    adj: dict[int, set[int]] = {c: set() for c in range(len(cls_of_set))}
    for cs in node_classes.values():
        if len(cs) == 2:
            adj[cs[0]].add(cs[1])
            adj[cs[1]].add(cs[0])
    colour: dict[int, int] = {}
    for start in adj:
        if start in colour:
            continue
        colour[start] = 0
        stack = [start]
        while stack:
            u = stack.pop()
            for v in adj[u]:
                if v not in colour:
                    colour[v] = 1 - colour[u]
                    stack.append(v)
                elif colour[v] == colour[u]:
                    return None
    cells: dict[tuple[str, str], list[str]] = {}
    for nd in nodes:
        cs = node_classes[nd]
        row = next((f"r{c}" for c in cs if colour[c] == 0), "r-free")
        col = next((f"c{c}" for c in cs if colour[c] == 1), "c-free")
        cells.setdefault((row, col), []).append(nd)
    g = nx.DiGraph()
    demand: dict[str, int] = {"src": -quota, "dst": quota}

    def edge(u: str, v: str, lo: int, hi: int) -> None:
        g.add_edge(u, v, capacity=hi - lo, weight=0)
        demand[u] = demand.get(u, 0) + lo
        demand[v] = demand.get(v, 0) - lo

    rows: dict[str, int] = {}
    cols: dict[str, int] = {}
    for (row, col), nds in cells.items():
        rows[row] = rows.get(row, 0) + len(nds)
        cols[col] = cols.get(col, 0) + len(nds)
        x = f * len(nds)
        edge(row, col, math.floor(x), math.ceil(x))
    for row, n in rows.items():
        edge("src", row, *((0, n) if row == "r-free" else (math.floor(f * n), math.ceil(f * n))))
    for col, n in cols.items():
        edge(col, "dst", *((0, n) if col == "c-free" else (math.floor(f * n), math.ceil(f * n))))
    for nd, dmd in demand.items():
        g.add_node(nd, demand=dmd)
    try:
        flow = nx.min_cost_flow(g)
    except nx.NetworkXUnfeasible:  # pragma: no cover - the rounding theorem says this cannot happen
        return None
    chosen: set[str] = set()
    for (row, col), nds in cells.items():
        k = flow[row][col] + math.floor(f * len(nds))
        # spread the k prefill nodes evenly along the cell's nodes (node order)
        if k:
            chosen.update(nds[int((i + 0.5) * len(nds) / k)] for i in range(k))
    return chosen


def _greedy(nodes: list[str], ports: dict[str, dict[str, int]], f: float, qp: int, qd: int) -> set[str]:
    """Fallback: each node in order takes the role keeping its switches closest to f (per-node-port units)."""
    unit: dict[str, int] = {}
    for nd in nodes:
        for sw, c in ports[nd].items():
            unit[sw] = max(unit.get(sw, 0), c)
    p_ports: dict[str, int] = {}
    all_ports: dict[str, int] = {}
    quota = {PREFILL: qp, DECODE: qd}
    out: set[str] = set()
    for nd in nodes:
        best_role, best_cost = None, 0.0
        for role in (PREFILL, DECODE):
            if quota[role] == 0:
                continue
            cost = 0.0
            for sw, c in ports[nd].items():
                ex = p_ports.get(sw, 0) + (c if role == PREFILL else 0) - f * (all_ports.get(sw, 0) + c)
                cost += (ex / unit[sw]) ** 2
            if best_role is None or cost < best_cost - 1e-12:
                best_role, best_cost = role, cost
        assert best_role is not None
        quota[best_role] -= 1
        for sw, c in ports[nd].items():
            all_ports[sw] = all_ports.get(sw, 0) + c
            if best_role == PREFILL:
                p_ports[sw] = p_ports.get(sw, 0) + c
        if best_role == PREFILL:
            out.add(nd)
    return out
