"""The fabric model: nodes → GPUs → NIC ports → switches, links with bandwidth, candidate paths per GPU pair.

Owned by `kvlane.policy.topology`; runs inside the policy service (and the CLI). Pure data + graph search:
no sockets, no clock, no vLLM/torch. It must never do all-pairs work at construction: paths are computed
lazily per GPU pair (LRU cache) from per-switch BFS distances, so a 16,384-GPU fabric builds in seconds.
"""

from __future__ import annotations

import enum
import functools
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

#: How many equal-cost switch routes the generic router lists per (src port, dst port) pair.
DEFAULT_ECMP = 4
#: At most this many candidates per GPU pair are kept (the best ones).
MAX_CANDIDATES = 8
#: Path LRU size (GPU pairs). A 1024-GPU cell's full P×D matrix of one rank fits easily.
PATH_CACHE_PAIRS = 65536
#: Above this many (attachment-set pairs × switches) the generic BFS diameter refuses (generators give formulas).
_DIAMETER_BFS_LIMIT = 1_100_000_000


class TopologyError(ValueError):
    """A malformed topology, spec or query. `str()` names what is wrong."""


@dataclass(frozen=True)
class Link:
    """One cable (or logical link): endpoints are switch ids, NIC port ids or (NVLink) GPU ids."""

    id: str
    a: str
    b: str
    gbps: float
    kind: str


@dataclass(frozen=True)
class Path:
    """One candidate route from a source GPU to a destination GPU.

    `name` is stable for the pair (the transport maps names such as "shm"/"tcp"/"zcube-path1"/"rail3" to
    a NIC/endpoint); `hops` counts switches traversed; `bottleneck_gbps` is the slowest link on it.
    """

    name: str
    links: tuple[str, ...]
    switches: tuple[str, ...]
    src_nic: str
    dst_nic: str
    hops: int
    bottleneck_gbps: float


@dataclass(frozen=True)
class Distance:
    hops: int
    bottleneck_gbps: float


class Locality(str, enum.Enum):
    """How close two GPUs are, in the seed's §7 candidate order (closest first).

    ADJACENT_TILE: the two GPUs' nodes are in different tiles and those tiles share at least one switch
    (some NIC port of a node of one tile and some NIC port of a node of the other attach to the same switch).
    """

    SAME_NODE = "same-node"
    SAME_TILE = "same-tile"
    ADJACENT_TILE = "adjacent-tile"
    SAME_CELL = "same-cell"
    CROSS_CELL = "cross-cell"

    @property
    def rank(self) -> int:
        """0 for SAME_NODE … 4 for CROSS_CELL (lower is closer)."""
        return _LOCALITY_ORDER.index(self)


_LOCALITY_ORDER = list(Locality)

ROLE_HINTS = ("prefill", "decode", "flex")


class _Keep:
    """Sentinel type for `set_node_attrs`: leave the attribute as it is."""


_KEEP = _Keep()


@dataclass
class _Port:
    id: str
    name: str          # suffix after the GPU id ("p0", "shm", ...)
    switch: int        # switch index
    link: str          # the access link id
    gbps: float


@dataclass
class _Node:
    id: str
    gpus: list[str]
    tile: int | None = None
    cell: int = 0
    role_hint: str | None = None


#: A router: (topology, src_gpu, dst_gpu) -> unsorted candidate paths.
Router = Callable[["Topology", str, str], list[Path]]
#: A path namer for the generic router: (src_port_name, dst_port_name, ecmp_index) -> path name.
Namer = Callable[[str, str, int], str]


def default_namer(sp: str, dp: str, i: int) -> str:
    base = sp if sp == dp else f"{sp}-{dp}"
    return base if i == 0 else f"{base}-{i}"


def prefix_namer(prefix: str) -> Namer:
    """Single-port fabrics: "<prefix>-0", "<prefix>-1", ... (e.g. up-down-0 for fat-tree ECMP routes)."""
    return lambda sp, dp, i: f"{prefix}-{i}"


@dataclass(eq=False)
class Topology:
    """A fabric. Build it with `add_node` / `add_switch` / `add_port` / `add_link`, or get one from
    `load_topology(spec)`. After construction it is read-only except for tiles/roles (`apply_placement`)."""

    name: str
    spec: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    ecmp: int = DEFAULT_ECMP

    def __post_init__(self) -> None:
        self._nodes: list[_Node] = []
        self._node_index: dict[str, int] = {}
        self._gpu_node: dict[str, int] = {}
        self._gpu_ports: dict[str, list[_Port]] = {}
        self._port_gpu: dict[str, str] = {}
        self._switches: list[str] = []
        self._switch_index: dict[str, int] = {}
        # adjacency: switch idx -> {neighbour idx: [(link_id, kind, gbps), ...]}
        self._adj: list[dict[int, list[tuple[str, str, float]]]] = []
        self._switch_ports: list[int] = []   # links incident to each switch (its used port count)
        self._links: dict[str, Link] = {}
        self._router: Router | None = None
        self._namer: Namer = default_namer
        self._diameter_formula: Callable[[], int] | None = None
        self._diameter: int | None = None
        self._tile_switches: dict[int, frozenset[int]] | None = None
        self._paths_cached = functools.lru_cache(maxsize=PATH_CACHE_PAIRS)(self._compute_paths)
        self._bfs_cached = functools.lru_cache(maxsize=4096)(self._bfs)
        self._plane_adj: dict[frozenset[str] | None, list[list[tuple[int, str, float]]]] = {}

    # ------------------------------------------------------------------ construction
    def add_node(self, node_id: str, gpus: Sequence[str] | int, *, tile: int | None = None, cell: int = 0,
                 role_hint: str | None = None) -> list[str]:
        """Add a host. `gpus` is a count (ids "<node>.g<i>") or a list of GPU suffixes/ids."""
        if node_id in self._node_index:
            raise TopologyError(f"duplicate node id {node_id!r}")
        if role_hint is not None and role_hint not in ROLE_HINTS:
            raise TopologyError(f"node {node_id!r}: role_hint must be one of {ROLE_HINTS}, got {role_hint!r}")
        names = [f"g{i}" for i in range(gpus)] if isinstance(gpus, int) else list(gpus)
        if not names:
            raise TopologyError(f"node {node_id!r} has no GPUs")
        ids = [g if g.startswith(node_id + ".") else f"{node_id}.{g}" for g in names]
        idx = len(self._nodes)
        for g in ids:
            if g in self._gpu_node:
                raise TopologyError(f"duplicate GPU id {g!r}")
            self._gpu_node[g] = idx
            self._gpu_ports[g] = []
        self._nodes.append(_Node(node_id, ids, tile, cell, role_hint))
        self._node_index[node_id] = idx
        return ids

    def add_switch(self, switch_id: str) -> int:
        if switch_id in self._switch_index or switch_id in self._gpu_node or switch_id in self._port_gpu:
            raise TopologyError(f"duplicate id {switch_id!r}")
        self._switch_index[switch_id] = len(self._switches)
        self._switches.append(switch_id)
        self._adj.append({})
        self._switch_ports.append(0)
        return len(self._switches) - 1

    def _new_link(self, a: str, b: str, gbps: float, kind: str, link_id: str | None) -> Link:
        if not gbps > 0:
            raise TopologyError(f"link {a}--{b}: gbps must be > 0, got {gbps}")
        lid = link_id or f"{a}--{b}"
        if lid in self._links:
            n = 2
            while f"{lid}#{n}" in self._links:
                n += 1
            if link_id is not None:
                raise TopologyError(f"duplicate link id {link_id!r}")
            lid = f"{lid}#{n}"
        link = Link(lid, a, b, float(gbps), kind)
        self._links[lid] = link
        return link

    def add_port(self, gpu: str, port_name: str, switch: str, gbps: float, kind: str = "gpu-access",
                 link_id: str | None = None) -> str:
        """Give `gpu` a NIC port "<gpu>.<port_name>" cabled to `switch`. Returns the port id."""
        if gpu not in self._gpu_node:
            raise TopologyError(f"unknown GPU {gpu!r}")
        if switch not in self._switch_index:
            raise TopologyError(f"unknown switch {switch!r}")
        pid = f"{gpu}.{port_name}"
        if pid in self._port_gpu:
            raise TopologyError(f"port {pid!r} is wired twice")
        link = self._new_link(pid, switch, gbps, kind, link_id)
        s = self._switch_index[switch]
        self._gpu_ports[gpu].append(_Port(pid, port_name, s, link.id, link.gbps))
        self._port_gpu[pid] = gpu
        self._switch_ports[s] += 1
        self._diameter = None
        return pid

    def add_link(self, a: str, b: str, gbps: float, kind: str = "inter-switch", link_id: str | None = None) -> str:
        """A switch–switch link (parallel links allowed), or a GPU–GPU link (NVLink, kind "nvlink")."""
        if a in self._switch_index and b in self._switch_index:
            if a == b:
                raise TopologyError(f"self-loop link on switch {a!r}")
            link = self._new_link(a, b, gbps, kind, link_id)
            ia, ib = self._switch_index[a], self._switch_index[b]
            entry = (link.id, kind, link.gbps)
            self._adj[ia].setdefault(ib, []).append(entry)
            self._adj[ib].setdefault(ia, []).append(entry)
            self._switch_ports[ia] += 1
            self._switch_ports[ib] += 1
            self._plane_adj.clear()
            self._bfs_cached.cache_clear()
            self._paths_cached.cache_clear()
            self._diameter = None
            return link.id
        if a in self._gpu_node and b in self._gpu_node:
            return self._new_link(a, b, gbps, kind, link_id).id
        bad = b if a in self._switch_index or a in self._gpu_node else a
        raise TopologyError(f"link {a}--{b}: unknown endpoint {bad!r}")

    def set_router(self, router: Router | None = None, *, namer: Namer | None = None,
                   diameter: Callable[[], int] | None = None) -> None:
        if router is not None:
            self._router = router
        if namer is not None:
            self._namer = namer
        if diameter is not None:
            self._diameter_formula = diameter
        self._diameter = None
        self._paths_cached.cache_clear()

    # ------------------------------------------------------------------ basic queries
    @property
    def nodes(self) -> list[str]:
        return [n.id for n in self._nodes]

    @property
    def gpus(self) -> list[str]:
        return [g for n in self._nodes for g in n.gpus]

    @property
    def switches(self) -> list[str]:
        return list(self._switches)

    @property
    def links(self) -> list[Link]:
        return list(self._links.values())

    def gpus_of(self, node: str) -> list[str]:
        return list(self._nodes[self._node(node)].gpus)

    def node_of(self, gpu: str) -> str:
        return self._nodes[self._gpu(gpu)].id

    def ports_of(self, gpu: str) -> list[str]:
        self._gpu(gpu)
        return [p.id for p in self._gpu_ports[gpu]]

    def gpu_of_port(self, port: str) -> str:
        gpu = self._port_gpu.get(port)
        if gpu is None:
            raise TopologyError(f"unknown NIC port {port!r}")
        return gpu

    def switch_of_port(self, port: str) -> str:
        gpu = self._port_gpu.get(port)
        if gpu is None:
            raise TopologyError(f"unknown NIC port {port!r}")
        return next(self._switches[p.switch] for p in self._gpu_ports[gpu] if p.id == port)

    def switches_of_node(self, node: str) -> dict[str, int]:
        """Switches the node's NIC ports attach to, with how many of its ports land on each."""
        c: Counter[str] = Counter()
        for g in self._nodes[self._node(node)].gpus:
            for p in self._gpu_ports[g]:
                c[self._switches[p.switch]] += 1
        return dict(c)

    def node_attrs(self, node: str) -> dict[str, Any]:
        n = self._nodes[self._node(node)]
        return {"tile": n.tile, "cell": n.cell, "role_hint": n.role_hint}

    @property
    def num_gpus(self) -> int:
        return len(self._gpu_node)

    @property
    def num_switches(self) -> int:
        return len(self._switches)

    @property
    def num_links(self) -> int:
        return len(self._links)

    def link(self, link_id: str) -> Link:
        try:
            return self._links[link_id]
        except KeyError:
            raise TopologyError(f"unknown link {link_id!r}") from None

    def switch_degree(self, switch: str) -> int:
        """Ports used on a switch (GPU downlinks + switch links)."""
        if switch not in self._switch_index:
            raise TopologyError(f"unknown switch {switch!r}")
        return self._switch_ports[self._switch_index[switch]]

    def _node(self, node: str) -> int:
        try:
            return self._node_index[node]
        except KeyError:
            raise TopologyError(f"unknown node {node!r}") from None

    def _gpu(self, gpu: str) -> int:
        try:
            return self._gpu_node[gpu]
        except KeyError:
            raise TopologyError(f"unknown GPU {gpu!r} (GPU ids look like {self._example_gpu()!r})") from None

    def _example_gpu(self) -> str:
        return self._nodes[0].gpus[0] if self._nodes else "n0.g0"

    # ------------------------------------------------------------------ paths
    def paths(self, src_gpu: str, dst_gpu: str) -> list[Path]:
        """Candidate paths, best first: fewest hops, then highest bottleneck, then name. Deterministic."""
        self._gpu(src_gpu)
        self._gpu(dst_gpu)
        if src_gpu == dst_gpu:
            raise TopologyError(f"paths from {src_gpu!r} to itself are not defined")
        return list(self._paths_cached(src_gpu, dst_gpu))

    def _compute_paths(self, src: str, dst: str) -> tuple[Path, ...]:
        router = self._router or generic_router
        cands = router(self, src, dst)
        seen: set[str] = set()
        out = []
        for p in sorted(cands, key=lambda p: (p.hops, -p.bottleneck_gbps, p.name)):
            if p.name in seen:
                raise TopologyError(f"router produced two paths named {p.name!r} for {src}->{dst}")
            seen.add(p.name)
            out.append(p)
        return tuple(out[:MAX_CANDIDATES])

    def distance(self, src_gpu: str, dst_gpu: str) -> Distance:
        ps = self.paths(src_gpu, dst_gpu)
        if not ps:
            raise TopologyError(f"no path from {src_gpu!r} to {dst_gpu!r}")
        return Distance(ps[0].hops, ps[0].bottleneck_gbps)

    def make_path(self, name: str, src_port: str, switch_route: Sequence[int], inter_links: Sequence[str],
                  dst_port: str, pre: Sequence[str] = (), post: Sequence[str] = ()) -> Path:
        """Assemble a Path from a src port, switch indices, the links between them and a dst port.
        `pre`/`post` are GPU–GPU (NVLink) links before the source port / after the destination port."""
        sp = self._find_port(src_port)
        dp = self._find_port(dst_port)
        links = (*pre, sp.link, *inter_links, dp.link, *post)
        bw = min(self._links[lid].gbps for lid in links)
        return Path(name, tuple(links), tuple(self._switches[s] for s in switch_route), sp.id, dp.id,
                    len(switch_route), bw)

    def _find_port(self, port_id: str) -> _Port:
        gpu = self._port_gpu.get(port_id)
        if gpu is None:
            raise TopologyError(f"unknown NIC port {port_id!r}")
        for p in self._gpu_ports[gpu]:
            if p.id == port_id:
                return p
        raise TopologyError(f"unknown NIC port {port_id!r}")  # pragma: no cover - index is consistent

    def port_records(self, gpu: str) -> list[tuple[str, str, int]]:
        """(port id, port name, switch index) for each NIC port of `gpu`."""
        return [(p.id, p.name, p.switch) for p in self._gpu_ports[gpu]]

    def switch_index(self, switch: str) -> int:
        try:
            return self._switch_index[switch]
        except KeyError:
            raise TopologyError(f"unknown switch {switch!r}") from None

    def links_between(self, a: int, b: int, plane: frozenset[str] | None = None) -> list[tuple[str, str, float]]:
        return [e for e in self._adj[a].get(b, []) if plane is None or e[1] in plane]

    # -- generic BFS over the switch graph (restricted to a plane = set of link kinds; None = all)
    def _adjacency(self, plane: frozenset[str] | None) -> list[list[tuple[int, str, float]]]:
        adj = self._plane_adj.get(plane)
        if adj is None:
            adj = []
            for nbrs in self._adj:
                row = []
                for v in sorted(nbrs):
                    best = [e for e in nbrs[v] if plane is None or e[1] in plane]
                    if best:
                        lid, _, gbps = max(best, key=lambda e: (e[2], e[0]))
                        row.append((v, lid, gbps))
                adj.append(row)
            self._plane_adj[plane] = adj
        return adj

    def _bfs(self, target: int, plane: frozenset[str] | None) -> tuple[int, ...]:
        """Hop distances (switch edges) from every switch to `target`; -1 = unreachable."""
        adj = self._adjacency(plane)
        dist = [-1] * len(self._switches)
        dist[target] = 0
        q = deque([target])
        while q:
            u = q.popleft()
            du = dist[u] + 1
            for v, _, _ in adj[u]:
                if dist[v] < 0:
                    dist[v] = du
                    q.append(v)
        return tuple(dist)

    def switch_distance(self, a: int, b: int, plane: frozenset[str] | None = None) -> int:
        return self._bfs_cached(b, plane)[a]

    def shortest_switch_routes(self, s: int, t: int, plane: frozenset[str] | None = None, limit: int = 4,
                               salt: str = "") -> Iterator[tuple[list[int], list[str]]]:
        """Up to `limit` distinct shortest switch routes s→t (switch indices, link ids). Neighbour order is
        rotated by a stable hash of `salt` (the GPU pair) so different pairs prefer different ECMP routes.

        Route i first takes the (hash + i)-th next hop at *every* switch, so the routes differ from the first
        hop on wherever the fabric allows (on a fat-tree: different aggregation up-links, not only different
        cores above one shared up-link); the depth-first enumeration then fills up to `limit`. Route 0 is the
        same either way."""
        dist = self._bfs_cached(t, plane)
        if dist[s] < 0:
            return
        adj = self._adjacency(plane)
        rot = zlib.crc32(salt.encode())
        seen: set[tuple[str, ...]] = set()

        def nexts(u: int) -> list[tuple[int, str]]:
            return [(v, lid) for v, lid, _ in adj[u] if dist[v] == dist[u] - 1]

        for i in range(limit):
            u, sw, ls = s, [s], []
            while u != t:
                nxt = nexts(u)
                v, lid = nxt[(rot + i) % len(nxt)]
                sw.append(v)
                ls.append(lid)
                u = v
            key = tuple(ls)
            if key not in seen:
                seen.add(key)
                yield sw, ls
        if len(seen) >= limit:
            return

        def walk(u: int, sw: list[int], ls: list[str]) -> Iterator[tuple[list[int], list[str]]]:
            if u == t:
                key = tuple(ls)
                if key not in seen:
                    seen.add(key)
                    yield list(sw), list(ls)
                return
            nxt = nexts(u)
            r = rot % len(nxt)
            for v, lid in nxt[r:] + nxt[:r]:
                if len(seen) >= limit:
                    return
                sw.append(v)
                ls.append(lid)
                yield from walk(v, sw, ls)
                sw.pop()
                ls.pop()

        yield from walk(s, [s], [])

    # ------------------------------------------------------------------ structure-wide figures
    def diameter_hops(self) -> int:
        """Max over GPU pairs of the best path's switch count (computed once, then remembered)."""
        if self._diameter is None:
            self._diameter = self._diameter_formula() if self._diameter_formula is not None else \
                self.diameter_hops_bfs()
        return self._diameter

    def diameter_hops_bfs(self) -> int:
        """Diameter from BFS over the switch graph and the distinct NIC attachment sets of GPUs (no GPU
        all-pairs). Generators with a closed form use that instead; tests check both agree on small fabrics."""
        return self.diameter_hops_planes([None])

    def diameter_hops_planes(self, planes: Sequence[frozenset[str] | None]) -> int:
        """Max over GPU pairs of min over (plane, src port, dst port) of switches on the shortest route, where
        a route stays inside one plane (set of link kinds; None = any). Vectorised over the distinct NIC
        attachment sets; refuses (TopologyError) above ~1e9 set pairs × ports²."""
        import numpy as np

        attach = sorted({tuple(sorted({p.switch for p in ports})) for ports in self._gpu_ports.values() if ports})
        if not attach:
            return 0
        width = max(len(a) for a in attach)
        if len(attach) ** 2 * width**2 > _DIAMETER_BFS_LIMIT:
            raise TopologyError(f"{self.name}: too many distinct NIC attachment sets ({len(attach)}) for the "
                                "BFS diameter; this fabric needs a closed-form diameter")
        sws = sorted({s for a in attach for s in a})
        col = {s: i for i, s in enumerate(sws)}
        big = 30_000  # "unreachable"; hop counts fit int16, which keeps the T×T sweep memory-light
        # m[i, j] = fewest switch hops from sws[i] to sws[j] inside any single plane
        m = np.full((len(sws), len(sws)), big, dtype=np.int16)
        for plane in planes:
            for j, s in enumerate(sws):
                row = np.array(self._bfs_cached(s, plane), dtype=np.int16)[sws]
                m[:, j] = np.minimum(m[:, j], np.where(row < 0, big, row))
        # attachment sets padded to `width` by repeating their first switch
        idx = np.array([[col[a[min(i, len(a) - 1)]] for i in range(width)] for a in attach], dtype=np.int64)
        # v[s, c] = best hops from switch s to any port switch of attachment set c   (S × T)
        v = m[:, idx[:, 0]]
        for i in range(1, width):
            v = np.minimum(v, m[:, idx[:, i]])
        # best[r, c] = min over r's port switches of v[., c]; rows in chunks of ~4M cells
        worst = 0
        chunk = max(1, 4_000_000 // len(attach))
        for r0 in range(0, len(attach), chunk):
            rows = idx[r0:r0 + chunk]
            best = v[rows[:, 0]]
            for i in range(1, width):
                best = np.minimum(best, v[rows[:, i]])
            w = int(best.max())
            if w >= big:
                r, c = np.unravel_index(int(best.argmax()), best.shape)
                raise TopologyError(f"{self.name}: the fabric is disconnected (no route from switch "
                                    f"{self._switches[attach[r0 + r][0]]} to {self._switches[attach[c][0]]})")
            worst = max(worst, w + 1)
        return worst

    def summary(self) -> dict[str, Any]:
        kinds = Counter(link.kind for link in self._links.values())
        ports_per_gpu = Counter(len(p) for p in self._gpu_ports.values())
        degs = self._switch_ports
        return {
            "name": self.name,
            "spec": self.spec,
            "gpus": self.num_gpus,
            "nodes": len(self._nodes),
            "switches": self.num_switches,
            "links": self.num_links,
            "diameter_hops": self.diameter_hops(),
            "link_kinds": dict(sorted(kinds.items())),
            "ports_per_gpu": {str(k): v for k, v in sorted(ports_per_gpu.items())},
            "switch_ports": {"min": min(degs), "max": max(degs)} if degs else {"min": 0, "max": 0},
            "cells": len({n.cell for n in self._nodes}),
            "tiles": len({n.tile for n in self._nodes if n.tile is not None}),
            "params": dict(self.params),
        }

    # ------------------------------------------------------------------ tiles and locality
    def set_node_attrs(self, node: str, *, tile: int | None | _Keep = _KEEP, cell: int | None = None,
                       role_hint: str | None | _Keep = _KEEP) -> None:
        """Change a node's tile (None = no tile), cell or role hint; arguments left out are kept."""
        n = self._nodes[self._node(node)]
        if not isinstance(tile, _Keep):
            n.tile = tile
            self._tile_switches = None
        if cell is not None:
            n.cell = cell
            self._tile_switches = None
        if not isinstance(role_hint, _Keep):
            if role_hint is not None and role_hint not in ROLE_HINTS:
                raise TopologyError(f"role_hint must be one of {ROLE_HINTS}, got {role_hint!r}")
            n.role_hint = role_hint

    def apply_placement(self, placement: Any) -> None:
        """Set every node's tile and role hint from a `Placement` (see placement.py)."""
        placement.apply(self)

    def _tiles(self) -> dict[int, frozenset[int]]:
        if self._tile_switches is None:
            acc: dict[int, set[int]] = {}
            for n in self._nodes:
                if n.tile is None:
                    continue
                s = acc.setdefault(n.tile, set())
                for g in n.gpus:
                    s.update(p.switch for p in self._gpu_ports[g])
            self._tile_switches = {t: frozenset(s) for t, s in acc.items()}
        return self._tile_switches

    def tiles_adjacent(self, t1: int, t2: int) -> bool:
        """Two different tiles are adjacent when their nodes' NIC ports share at least one switch."""
        tiles = self._tiles()
        if t1 not in tiles or t2 not in tiles:
            raise TopologyError(f"unknown tile {t1 if t1 not in tiles else t2}")
        return t1 != t2 and not tiles[t1].isdisjoint(tiles[t2])

    def locality(self, src_gpu: str, dst_gpu: str) -> Locality:
        a = self._nodes[self._gpu(src_gpu)]
        b = self._nodes[self._gpu(dst_gpu)]
        if a is b:
            return Locality.SAME_NODE
        if a.tile is not None and a.tile == b.tile and a.cell == b.cell:
            return Locality.SAME_TILE
        if a.cell != b.cell:
            return Locality.CROSS_CELL
        if a.tile is not None and b.tile is not None and self.tiles_adjacent(a.tile, b.tile):
            return Locality.ADJACENT_TILE
        return Locality.SAME_CELL


def generic_router(topo: Topology, src: str, dst: str, plane: frozenset[str] | None = None,
                   namer: Namer | None = None) -> list[Path]:
    """Shortest switch routes for every (src port, dst port) combination, up to `topo.ecmp` each."""
    namer = namer or topo._namer
    out: list[Path] = []
    for spid, spn, ssw in topo.port_records(src):
        for dpid, dpn, dsw in topo.port_records(dst):
            routes = topo.shortest_switch_routes(ssw, dsw, plane, topo.ecmp, salt=f"{src}>{dst}")
            for i, (sw, ls) in enumerate(routes):
                out.append(topo.make_path(namer(spn, dpn, i), spid, sw, ls, dpid))
    return out
