"""Fabric generators for every topology the seed discusses: `name:k=v,k=v` → Topology.

Owned by `kvlane.policy.topology`; runs wherever a topology is loaded (policy service, CLI, tests). Pure:
builds nodes/switches/links and a per-fabric router; never computes anything over all GPU pairs.
Every parameter is declared in `GENERATORS` (that table is what `kvlane topo inspect --help` prints).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import networkx as nx

from .model import Namer, Path, Topology, TopologyError, generic_router, prefix_namer

ParamValue = int | float | str


@dataclass(frozen=True)
class Param:
    name: str
    type: type
    default: ParamValue | None  # None = required
    help: str


@dataclass(frozen=True)
class Generator:
    name: str
    summary: str
    params: tuple[Param, ...]
    build: Callable[[dict[str, Any]], Topology]

    def help_text(self) -> str:
        args = ",".join(f"{p.name}=…" if p.default is None else f"{p.name}={p.default}" for p in self.params)
        lines = [f"{self.name}:{args}", f"  {self.summary}"]
        lines += [f"    {p.name}: {p.help}" + ("" if p.default is None else f" (default {p.default})")
                  for p in self.params]
        return "\n".join(lines)


GENERATORS: dict[str, Generator] = {}


def _register(name: str, summary: str, *params: Param) -> Callable[[Callable[[dict[str, Any]], Topology]],
                                                                    Callable[[dict[str, Any]], Topology]]:
    def deco(fn: Callable[[dict[str, Any]], Topology]) -> Callable[[dict[str, Any]], Topology]:
        GENERATORS[name] = Generator(name, summary, params, fn)
        return fn
    return deco


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    name, _, rest = spec.partition(":")
    name = name.strip()
    raw: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        k, eq, v = item.partition("=")
        if not eq or not k.strip() or not v.strip():
            raise TopologyError(f"{spec!r}: expected k=v, got {item!r}")
        if k.strip() in raw:
            raise TopologyError(f"{spec!r}: parameter {k.strip()!r} given twice")
        raw[k.strip()] = v.strip()
    return name, raw


def generate(spec: str) -> Topology:
    """Build a topology from a generator spec such as "zcube:n=32,k=2"."""
    name, raw = parse_spec(spec)
    gen = GENERATORS.get(name)
    if gen is None:
        raise TopologyError(f"unknown generator {name!r}; known: {', '.join(sorted(GENERATORS))}")
    tiles = raw.pop("tiles", None)
    known = {p.name: p for p in gen.params}
    for k in raw:
        if k not in known:
            raise TopologyError(f"{name}: unknown parameter {k!r}; parameters: {', '.join(known)}")
    args: dict[str, Any] = {}
    for p in gen.params:
        if p.name in raw:
            try:
                args[p.name] = p.type(raw[p.name])
            except ValueError:
                raise TopologyError(f"{name}: parameter {p.name}={raw[p.name]!r} is not a valid "
                                    f"{p.type.__name__}") from None
        elif p.default is None:
            raise TopologyError(f"{name}: missing required parameter {p.name!r} ({p.help})")
        else:
            args[p.name] = p.default
    topo = gen.build(args)
    topo.spec = spec
    topo.params = {"generator": name, **args, **topo.params}
    if tiles is not None:
        from .placement import plan_tiles

        plan_tiles(topo, ratio=tiles).apply(topo)
        topo.params["tiles"] = tiles
    return topo


def generators_help() -> str:
    return "\n\n".join([*(g.help_text() for g in GENERATORS.values()),
                        "Every generator also takes tiles=P:D (e.g. zcube:n=32,k=2,tiles=3:2): place affinity\n"
                        "  tiles of pP+dD nodes plus flex nodes with plan_tiles() and set node tiles/roles."])


def _positive(name: str, **vals: float) -> None:
    for k, v in vals.items():
        if v <= 0:
            raise TopologyError(f"{name}: {k} must be > 0, got {v}")


def _nodes_of(topo: Topology, total_gpus: int, gpn: int, gen: str, cell_of: Callable[[int], int] | None = None
              ) -> list[str]:
    """Add ceil-free nodes "n<m>" of `gpn` consecutive GPUs; returns all GPU ids in order."""
    if total_gpus % gpn:
        raise TopologyError(f"{gen}: {total_gpus} GPUs do not split into nodes of gpus_per_node={gpn}")
    gpus: list[str] = []
    for m in range(total_gpus // gpn):
        gpus += topo.add_node(f"n{m}", gpn, cell=cell_of(m) if cell_of else 0)
    return gpus


# ---------------------------------------------------------------------------------------------- loopback
@_register(
    "loopback", "one host, N GPUs; every pair has two paths, 'shm' (shared memory) and 'tcp' (loopback TCP)",
    Param("gpus", int, 2, "GPUs (engines / TP ranks) on the single host"),
    Param("shm_gbps", float, 100.0, "bandwidth of the shared-memory path"),
    Param("tcp_gbps", float, 25.0, "bandwidth of the TCP loopback path"),
)
def _loopback(a: dict[str, Any]) -> Topology:
    _positive("loopback", gpus=a["gpus"], shm_gbps=a["shm_gbps"], tcp_gbps=a["tcp_gbps"])
    if a["gpus"] < 1:
        raise TopologyError("loopback: gpus must be >= 1")
    t = Topology("loopback")
    gpus = t.add_node("n0", a["gpus"])
    t.add_switch("shm")
    t.add_switch("tcp")
    for g in gpus:
        t.add_port(g, "shm", "shm", a["shm_gbps"], kind="shm")
        t.add_port(g, "tcp", "tcp", a["tcp_gbps"], kind="tcp")
    t.set_router(diameter=lambda: 1)
    return t


# ---------------------------------------------------------------------------------------------- ZCube
@_register(
    "zcube",
    "ZCube(n,k): n^k GPUs, k switch layers of n^(k-1) switches, k NIC ports per GPU, diameter k "
    "(ZCube(128,2) = 16,384 GPUs, 256 switches); consecutive layers are wired so every switch has n links "
    "to each neighbouring layer (k=2: the two layers are a full bipartite graph)",
    Param("n", int, None, "GPUs per switch (and switches per layer for k=2)"),
    Param("k", int, 2, "switch layers = NIC ports per GPU = diameter"),
    Param("gpus_per_node", int, 8, "GPUs per host (consecutive GPU indices)"),
    Param("gbps", float, 200.0, "GPU NIC port speed (the seed splits a 400G NIC into 2x200G)"),
    Param("isl_gbps", float, 200.0, "inter-switch link speed"),
)
def _zcube(a: dict[str, Any]) -> Topology:
    """ZCube(n,k) by the seed's recursion: ZCube(n,1) = 1 switch + n GPUs, ZCube(n,k+1) = n·ZCube(n,k) + n^k
    switches → n^k GPUs, k layers of n^(k-1) switches, k ports per GPU, diameter k.

    Where the seed disagrees with itself we follow the recursion and its concrete figures: §2 also states
    "n^(k+1) GPUs, k+1 layers of n^k" (BCube's indexing, k from 0), which would make ZCube(128,2) 2,097,152
    GPUs, whereas the seed's ZCube(128,2) has 16,384 GPUs, 256 switches, 2 ports per GPU, diameter 2, and
    49,152 cables (32,768 GPU + 16,384 bipartite) — all reproduced here, as is §5's cell table (ZCube(32,2) =
    1024 GPUs / 64 switches / 64 ports). §8's "ZCube bipartite links" column ((N/8)²: 1,000 GPUs → 15,876)
    assumes one switch per 8-GPU node and contradicts §5 (1024 GPUs → 32² = 1,024 links); we follow §5.
    GPU x (= gpus_per_node·node + rank) has base-n digits; its layer-l switch joins the n GPUs that agree
    with x on every digit but digit l; layers l and l+1 are linked once per GPU (between x's two switches).
    """
    n, k, gpn = a["n"], a["k"], a["gpus_per_node"]
    _positive("zcube", n=n, k=k, gpus_per_node=gpn)
    if n < 2 or k > 8:
        raise TopologyError("zcube: need n >= 2 and 1 <= k <= 8")
    total = n**k
    if total > 1 << 20:
        raise TopologyError(f"zcube: {total} GPUs is too large (limit 1,048,576)")
    t = Topology(f"zcube-{n}-{k}")
    gpus = _nodes_of(t, total, gpn, "zcube")
    per_layer = n ** (k - 1)
    letters = [chr(ord("A") + layer) for layer in range(k)]
    for layer in range(k):
        for s in range(per_layer):
            t.add_switch(f"{letters[layer]}{s}")

    def sw(layer: int, x: int) -> int:  # index of x's layer-`layer` switch: x with digit `layer` removed
        return (x // n ** (layer + 1)) * n**layer + x % n**layer

    for x, g in enumerate(gpus):
        for layer in range(k):
            t.add_port(g, f"p{layer}", f"{letters[layer]}{sw(layer, x)}", a["gbps"])
    # Layer l and l+1: one link per GPU x, between x's two switches on those layers (n per switch per side).
    for layer in range(k - 1):
        for x in range(total):
            t.add_link(f"{letters[layer]}{sw(layer, x)}", f"{letters[layer + 1]}{sw(layer + 1, x)}",
                       a["isl_gbps"], kind="inter-switch")
    t.set_router(diameter=lambda: k)
    if k == 2:
        index = {g: x for x, g in enumerate(gpus)}
        t.set_router(_zcube2_router(n, index))
    else:
        t.set_router(namer=lambda sp, dp, i: f"zcube-{sp}-{dp}" + (f"-{i}" if i else ""))
    return t


def _zcube2_router(n: int, index: dict[str, int], cells: int = 1, xcell_namer: Namer | None = None
                   ) -> Callable[[Topology, str, str], list[Path]]:
    """ZCube(n,2) closed form (seed §7): P=(A_p,B_p), D=(A_d,B_d);
    zcube-path1: P→A_p→B_d→D (leaves on P's p0, arrives on D's p1); zcube-path2: P→B_p→A_d→D;
    plus the one-switch path when P and D share a switch (zcube-a via A, zcube-b via B).
    With several cells (zrail), GPU index x lies in cell x // n²; cell c's switches are indices 2n·c + …, named
    "c<c>.A<i>"; pairs in different cells use the generic router (shortest routes) named by `xcell_namer`."""
    per_cell = n * n

    def route(t: Topology, src: str, dst: str) -> list[Path]:
        cs, xs = divmod(index[src], per_cell)
        cd, xd = divmod(index[dst], per_cell)
        if cs != cd:
            return generic_router(t, src, dst, namer=xcell_namer)
        base, pre = 2 * n * cs, (f"c{cs}." if cells > 1 else "")
        ap, bp = divmod(xs, n)
        ad, bd = divmod(xd, n)
        out = [
            t.make_path("zcube-path1", f"{src}.p0", [base + ap, base + n + bd], [f"{pre}A{ap}--{pre}B{bd}"],
                        f"{dst}.p1"),
            t.make_path("zcube-path2", f"{src}.p1", [base + n + bp, base + ad], [f"{pre}A{ad}--{pre}B{bp}"],
                        f"{dst}.p0"),
        ]
        if ap == ad:
            out.append(t.make_path("zcube-a", f"{src}.p0", [base + ap], [], f"{dst}.p0"))
        if bp == bd:
            out.append(t.make_path("zcube-b", f"{src}.p1", [base + n + bp], [], f"{dst}.p1"))
        return out

    return route


# ---------------------------------------------------------------------------------------------- Hybrid ZRail
@_register(
    "zrail",
    "PD-aware Hybrid ZRail (seed §9, §12): `cells` ZCube(n,2) cells (full bipartite inside a cell), joined by "
    "sparse inter-cell links: switch i of cell c links to switch i of cells c±1 … c±xcell (a ring of cells); "
    "node attribute cell = cell index; cross-cell paths are named xcell-<src port>-<dst port>[-i]",
    Param("cells", int, 4, "ZCube cells"),
    Param("n", int, 32, "ZCube(n,2) per cell: n² GPUs, 2n switches"),
    Param("xcell", int, 1, "ring depth of the inter-cell links (each switch gets min(2·xcell, cells-1) of them)"),
    Param("gpus_per_node", int, 8, "GPUs per host"),
    Param("gbps", float, 200.0, "GPU NIC port speed"),
    Param("isl_gbps", float, 200.0, "intra-cell bipartite link speed"),
    Param("xcell_gbps", float, 400.0, "inter-cell link speed"),
)
def _zrail(a: dict[str, Any]) -> Topology:
    cells, n, xc, gpn = a["cells"], a["n"], a["xcell"], a["gpus_per_node"]
    _positive("zrail", cells=cells, n=n, xcell=xc, gpus_per_node=gpn)
    if n < 2 or (n * n) % gpn:
        raise TopologyError(f"zrail: need n >= 2 and gpus_per_node dividing n² = {n * n}")
    if cells * n * n > 1 << 20:
        raise TopologyError("zrail: more than 1,048,576 GPUs")
    per_cell = n * n
    t = Topology(f"zrail-{cells}x{per_cell}")
    gpus = _nodes_of(t, cells * per_cell, gpn, "zrail", cell_of=lambda m: m * gpn // per_cell)
    for c in range(cells):
        for layer in "AB":
            for i in range(n):
                t.add_switch(f"c{c}.{layer}{i}")
    for x, g in enumerate(gpus):
        c, xl = divmod(x, per_cell)
        t.add_port(g, "p0", f"c{c}.A{xl // n}", a["gbps"])
        t.add_port(g, "p1", f"c{c}.B{xl % n}", a["gbps"])
    for c in range(cells):
        for i in range(n):
            for j in range(n):
                t.add_link(f"c{c}.A{i}", f"c{c}.B{j}", a["isl_gbps"], kind="inter-switch")
    made: set[tuple[int, int]] = set()
    for c in range(cells):
        for r in range(1, xc + 1):
            c2 = (c + r) % cells
            if c2 == c or (min(c, c2), max(c, c2)) in made:
                continue
            made.add((min(c, c2), max(c, c2)))
            for layer in "AB":
                for i in range(n):
                    t.add_link(f"c{c}.{layer}{i}", f"c{c2}.{layer}{i}", a["xcell_gbps"], kind="inter-cell")
    index = {g: x for x, g in enumerate(gpus)}
    ring = cells // 2
    t.set_router(_zcube2_router(n, index, cells, lambda sp, dp, i: f"xcell-{sp}-{dp}" + (f"-{i}" if i else "")),
                 diameter=lambda: 2 if cells == 1 else 2 + -(-ring // xc))
    t.ecmp = 2
    return t


# ---------------------------------------------------------------------------------------------- fat-tree
@_register(
    "fattree",
    "3-tier k-ary fat-tree: k pods of k/2 edge + k/2 aggregation switches, (k/2)^2 cores, k^3/4 host ports",
    Param("k", int, None, "switch radix (even)"),
    Param("oversub", float, 1.0, "oversubscription: uplinks (edge-agg, agg-core) run at gbps/oversub"),
    Param("gbps", float, 100.0, "host port speed"),
    Param("gpus_per_node", int, 1, "GPUs per host node (consecutive host ports; must divide k^3/4)"),
)
def _fattree(a: dict[str, Any]) -> Topology:
    k, gpn = a["k"], a["gpus_per_node"]
    _positive("fattree", k=k, oversub=a["oversub"], gbps=a["gbps"], gpus_per_node=gpn)
    if k % 2 or k < 2:
        raise TopologyError(f"fattree: k must be even and >= 2, got {k}")
    h = k // 2
    t = Topology(f"fattree-{k}")
    gpus = _nodes_of(t, k**3 // 4, gpn, "fattree")
    up = a["gbps"] / a["oversub"]
    for p in range(k):
        for i in range(h):
            t.add_switch(f"e{p}.{i}")
        for i in range(h):
            t.add_switch(f"a{p}.{i}")
    for c in range(h * h):
        t.add_switch(f"c{c}")
    for x, g in enumerate(gpus):
        p, rem = divmod(x, h * h)
        t.add_port(g, "p0", f"e{p}.{rem // h}", a["gbps"])
    for p in range(k):
        for e in range(h):
            for ag in range(h):
                t.add_link(f"e{p}.{e}", f"a{p}.{ag}", up, kind="inter-switch")
        for ag in range(h):
            for j in range(h):
                t.add_link(f"a{p}.{ag}", f"c{ag * h + j}", up, kind="inter-switch")
    # one pod holds h*h host ports: if all hosts sit on one edge (k=2: one port per pod) the worst is still 5
    t.set_router(namer=prefix_namer("up-down"), diameter=lambda: 5)
    return t


# ---------------------------------------------------------------------------------------------- ROFT
@_register(
    "roft",
    "rail-optimized fat-tree: rail r of every `radix/2` nodes shares a leaf; leaf-spine (2 tiers) while "
    "leaves <= radix, else pods of radix/2 leaves + a core layer (3 tiers)",
    Param("nodes", int, None, "hosts"),
    Param("rails", int, 8, "GPUs (= rails) per host"),
    Param("radix", int, 64, "switch ports; a leaf has radix/2 downlinks and radix/2 uplinks"),
    Param("gbps", float, 400.0, "GPU NIC speed"),
    Param("oversub", float, 1.0, "oversubscription: uplinks run at gbps/oversub"),
)
def _roft(a: dict[str, Any]) -> Topology:
    nodes, rails, radix = a["nodes"], a["rails"], a["radix"]
    _positive("roft", nodes=nodes, rails=rails, radix=radix, gbps=a["gbps"], oversub=a["oversub"])
    if radix % 2 or radix < 2:
        raise TopologyError(f"roft: radix must be even, got {radix}")
    h = radix // 2
    groups = math.ceil(nodes / h)
    leaves = groups * rails
    up = a["gbps"] / a["oversub"]
    t = Topology(f"roft-{nodes}x{rails}")
    for m in range(nodes):
        t.add_node(f"n{m}", rails)
    for g in range(groups):
        for r in range(rails):
            t.add_switch(f"l{g}.r{r}")
    for m in range(nodes):
        for r in range(rails):
            t.add_port(f"n{m}.g{r}", "p0", f"l{m // h}.r{r}", a["gbps"])
    leaf_names = [f"l{g}.r{r}" for g in range(groups) for r in range(rails)]
    if leaves <= radix:
        tiers, pods = 2, 1
        for j in range(h):
            t.add_switch(f"s{j}")
        for leaf in leaf_names:
            for j in range(h):
                t.add_link(leaf, f"s{j}", up)
    else:
        tiers, pods = 3, math.ceil(leaves / h)
        if pods > radix or radix % pods or h % (radix // pods):
            raise TopologyError(f"roft: {pods} pods of {h} leaves do not fit a 3-tier core of radix {radix} "
                                "(need pods to divide radix and radix/pods to divide radix/2)")
        block = radix // pods            # spine indices served by one core block
        for p in range(pods):
            for j in range(h):
                t.add_switch(f"s{p}.{j}")
        cores = (h // block) * h
        for c in range(cores):
            t.add_switch(f"c{c}")
        for i, leaf in enumerate(leaf_names):
            for j in range(h):
                t.add_link(leaf, f"s{i // h}.{j}", up)
        for p in range(pods):
            for j in range(h):
                beta = j // block
                for c in range(h):
                    t.add_link(f"s{p}.{j}", f"c{beta * h + c}", up)

    def diameter() -> int:
        if leaves == 1:
            return 1
        return 3 if tiers == 2 or pods == 1 else 5

    def route(topo: Topology, src: str, dst: str) -> list[Path]:
        out = generic_router(topo, src, dst, namer=prefix_namer("up-down"))
        r = src.rsplit(".g", 1)[1]
        return [_rename(p, f"rail{r}") if p.hops == 1 else p for p in out]

    t.set_router(route, diameter=diameter)
    t.params.update(tiers=tiers, pods=pods)
    return t


def _rename(p: Path, name: str) -> Path:
    return Path(name, p.links, p.switches, p.src_nic, p.dst_nic, p.hops, p.bottleneck_gbps)


# ---------------------------------------------------------------------------------------------- rail-only
@_register(
    "railonly",
    "Rail-only: one switch per rail, no spine; rank r of every host on rail switch r; cross-rail traffic is "
    "relayed over NVLink inside the source or destination host",
    Param("rails", int, 8, "GPUs (= rails) per host"),
    Param("radix", int, 64, "rail switch ports (= max hosts)"),
    Param("nodes", int, 0, "hosts (0 = radix)"),
    Param("gbps", float, 400.0, "GPU NIC speed"),
    Param("nvlink_gbps", float, 3600.0, "NVLink bandwidth between two GPUs of a host"),
)
def _railonly(a: dict[str, Any]) -> Topology:
    rails, radix = a["rails"], a["radix"]
    nodes = a["nodes"] or radix
    _positive("railonly", rails=rails, radix=radix, nodes=nodes, gbps=a["gbps"], nvlink_gbps=a["nvlink_gbps"])
    if nodes > radix:
        raise TopologyError(f"railonly: {nodes} nodes exceed the rail switch radix {radix}")
    t = Topology(f"railonly-{nodes}x{rails}")
    for r in range(rails):
        t.add_switch(f"rail{r}")
    for m in range(nodes):
        gs = t.add_node(f"n{m}", rails)
        for r, g in enumerate(gs):
            t.add_port(g, "p0", f"rail{r}", a["gbps"])
        for i in range(rails):
            for j in range(i + 1, rails):
                t.add_link(gs[i], gs[j], a["nvlink_gbps"], kind="nvlink")

    def route(topo: Topology, src: str, dst: str) -> list[Path]:
        sn, sr = src.rsplit(".g", 1)
        dn, dr = dst.rsplit(".g", 1)
        if sn == dn:
            lid = f"{src}--{dst}" if int(sr) < int(dr) else f"{dst}--{src}"
            bw = topo.link(lid).gbps
            return [Path("nvlink", (lid,), (), src, dst, 0, bw)]
        if sr == dr:
            return [topo.make_path(f"rail{sr}", f"{src}.p0", [int(sr)], [], f"{dst}.p0")]
        relay_s, relay_d = f"{sn}.g{dr}", f"{dn}.g{sr}"
        nv_s = f"{src}--{relay_s}" if int(sr) < int(dr) else f"{relay_s}--{src}"
        nv_d = f"{relay_d}--{dst}" if int(sr) < int(dr) else f"{dst}--{relay_d}"
        return [
            topo.make_path(f"rail{dr}-relay-src", f"{relay_s}.p0", [int(dr)], [], f"{dst}.p0", pre=[nv_s]),
            topo.make_path(f"rail{sr}-relay-dst", f"{src}.p0", [int(sr)], [], f"{relay_d}.p0", post=[nv_d]),
        ]

    t.set_router(route, diameter=lambda: 1)
    return t


# ---------------------------------------------------------------------------------------------- RailFly
@_register(
    "railfly",
    "RailFly: rail-only plus a full mesh between the K rail switches (K(K-1)/2 inter-group links, 28 for "
    "K=8); each rail switch keeps radix-(K-1) ports for GPUs (radix 128 -> 121 hosts, 968 GPUs)",
    Param("rails", int, 8, "K: GPUs (= rails = rail switches) per host"),
    Param("radix", int, 128, "rail switch ports"),
    Param("nodes", int, 0, "hosts (0 = radix - (rails - 1), the most the switches take)"),
    Param("gbps", float, 400.0, "GPU NIC speed"),
    Param("isl_gbps", float, 400.0, "speed of one inter-group cable"),
    Param("isl_links", int, 1, "parallel cables per rail-switch pair"),
)
def _railfly(a: dict[str, Any]) -> Topology:
    rails, radix, m_isl = a["rails"], a["radix"], a["isl_links"]
    _positive("railfly", rails=rails, radix=radix, isl_links=m_isl, gbps=a["gbps"], isl_gbps=a["isl_gbps"])
    free = radix - (rails - 1) * m_isl
    nodes = a["nodes"] or free
    if nodes > free or nodes < 1:
        raise TopologyError(f"railfly: a rail switch has {free} ports left after {(rails - 1) * m_isl} "
                            f"inter-group ports; {nodes} nodes do not fit")
    t = Topology(f"railfly-{nodes}x{rails}")
    for r in range(rails):
        t.add_switch(f"rail{r}")
    for m in range(nodes):
        for r, g in enumerate(t.add_node(f"n{m}", rails)):
            t.add_port(g, "p0", f"rail{r}", a["gbps"])
    for i in range(rails):
        for j in range(i + 1, rails):
            for _ in range(m_isl):
                t.add_link(f"rail{i}", f"rail{j}", a["isl_gbps"], kind="inter-group")

    def route(topo: Topology, src: str, dst: str) -> list[Path]:
        sr = int(src.rsplit(".g", 1)[1])
        dr = int(dst.rsplit(".g", 1)[1])
        if sr == dr:
            return [topo.make_path(f"rail{sr}", f"{src}.p0", [sr], [], f"{dst}.p0")]
        cables = topo.links_between(sr, dr)
        return [topo.make_path("xrail" if len(cables) == 1 else f"xrail-{i}", f"{src}.p0", [sr, dr], [lid],
                               f"{dst}.p0") for i, (lid, _, _) in enumerate(sorted(cables))]

    t.set_router(route, diameter=lambda: 2 if rails > 1 else 1)
    return t


# ---------------------------------------------------------------------------------------------- Rail-Fabric
@_register(
    "railfabric",
    "Rail-Fabric (seed §10): two NIC ports per GPU on two switch halves (as a ZCube cell), a sparse "
    "d-regular expander base and a q-regular KV fast lane between switches (seeded, deterministic); "
    "paths 'fastlane' (fast-lane links only), 'base' (expander links only), 'local' (shared switch)",
    Param("switches", int, 64, "Ethernet switches (even): two halves, one per NIC port"),
    Param("down", int, 32, "GPU downlinks per switch (GPUs = switches/2 * down)"),
    Param("expander", int, 8, "d: expander (base fabric) links per switch"),
    Param("fastlane", int, 8, "q: KV fast-lane links per switch"),
    Param("dheavy", int, 0, "D-heavy switches (every switches/dheavy-th one) that get more fast-lane links"),
    Param("dheavy_fastlane", int, 12, "fast-lane links per D-heavy switch"),
    Param("gpus_per_node", int, 8, "GPUs per host"),
    Param("gbps", float, 200.0, "GPU NIC port speed"),
    Param("isl_gbps", float, 400.0, "expander / fast-lane link speed"),
    Param("seed", int, 0, "random seed of the expander and fast-lane graphs"),
)
def _railfabric(a: dict[str, Any]) -> Topology:
    S, down, d, q = a["switches"], a["down"], a["expander"], a["fastlane"]
    _positive("railfabric", switches=S, down=down, gpus_per_node=a["gpus_per_node"])
    if S % 2 or S < 4:
        raise TopologyError(f"railfabric: switches must be even and >= 4, got {S}")
    for nm, deg in (("expander", d), ("fastlane", q)):
        if not 0 < deg < S or (deg * S) % 2:
            raise TopologyError(f"railfabric: {nm}={deg} needs 0 < {nm} < switches and {nm}*switches even")
    half = S // 2
    total = half * down
    t = Topology(f"railfabric-{total}")
    gpus = _nodes_of(t, total, a["gpus_per_node"], "railfabric")
    for s in range(S):
        t.add_switch(f"s{s}")
    for x, g in enumerate(gpus):
        t.add_port(g, "p0", f"s{x // down}", a["gbps"])
        t.add_port(g, "p1", f"s{half + x % half}", a["gbps"])
    exp = nx.random_regular_graph(d, S, seed=a["seed"])
    fast = nx.random_regular_graph(q, S, seed=a["seed"] + 1)
    for u, v in sorted(tuple(sorted(e)) for e in exp.edges):
        t.add_link(f"s{u}", f"s{v}", a["isl_gbps"], kind="expander")
    for u, v in sorted(tuple(sorted(e)) for e in fast.edges):
        t.add_link(f"s{u}", f"s{v}", a["isl_gbps"], kind="fastlane")
    heavy: list[int] = []
    if a["dheavy"]:
        extra = a["dheavy_fastlane"] - q
        nh = a["dheavy"]
        if not 0 < nh <= S or extra < 0 or (extra and (extra >= nh or (extra * nh) % 2)):
            raise TopologyError("railfabric: need 0 < dheavy <= switches, dheavy_fastlane >= fastlane, and "
                                "(dheavy_fastlane - fastlane) * dheavy even and < dheavy")
        heavy = [i * S // nh for i in range(nh)]
        if extra:
            hg = nx.random_regular_graph(extra, nh, seed=a["seed"] + 2)
            for u, v in sorted(tuple(sorted(e)) for e in hg.edges):
                t.add_link(f"s{heavy[u]}", f"s{heavy[v]}", a["isl_gbps"], kind="fastlane")
    planes = {"fastlane": frozenset({"fastlane"}), "base": frozenset({"expander"})}

    def route(topo: Topology, src: str, dst: str) -> list[Path]:
        sp, dp = topo.port_records(src), topo.port_records(dst)
        out: list[Path] = []
        shared = [(s, d_) for s in sp for d_ in dp if s[2] == d_[2]]
        if shared:
            (spid, _, shared_sw), (dpid, _, _) = shared[0]
            out.append(topo.make_path("local", spid, [shared_sw], [], dpid))
        for name, plane in planes.items():
            best = None
            for spid, _, ssw in sp:
                for dpid, _, dsw in dp:
                    dd = topo.switch_distance(ssw, dsw, plane)
                    if dd > 0 and (best is None or dd < best[0]):
                        best = (dd, spid, ssw, dpid, dsw)
            if best is not None and not shared:
                _, spid, ssw, dpid, dsw = best
                hops, ls = next(topo.shortest_switch_routes(ssw, dsw, plane, 1, salt=f"{src}>{dst}"))
                out.append(topo.make_path(name, spid, hops, ls, dpid))
        return out

    t.set_router(route, diameter=lambda: t.diameter_hops_planes(list(planes.values())))
    t.params.update(dheavy_switches=[f"s{h}" for h in heavy])
    return t


# ---------------------------------------------------------------------------------------------- D-centric expander
@_register(
    "dexpander",
    "D-centric asymmetric expander (seed §10, simplified variant): no spine, switches joined by a seeded random "
    "expander; normal switches have `down` GPU ports + `expander` links, D-heavy switches fewer GPU ports and "
    "more expander links; nodes on D-heavy switches get role_hint=decode; one NIC port per GPU, a node's GPUs "
    "on one switch; paths base-0, base-1, ...",
    Param("switches", int, 64, "Ethernet switches"),
    Param("down", int, 32, "GPU ports on a normal (P-bearing) switch"),
    Param("expander", int, 8, "expander links on a normal switch"),
    Param("dheavy", int, 16, "D-heavy switches (every switches/dheavy-th one)"),
    Param("dheavy_down", int, 24, "GPU ports on a D-heavy switch (seed: 24-28)"),
    Param("dheavy_expander", int, 16, "expander links on a D-heavy switch (seed: 12-16)"),
    Param("gpus_per_node", int, 8, "GPUs per host (must divide down and dheavy_down)"),
    Param("gbps", float, 400.0, "GPU NIC speed"),
    Param("isl_gbps", float, 400.0, "expander link speed"),
    Param("seed", int, 0, "random seed of the expander"),
)
def _dexpander(a: dict[str, Any]) -> Topology:
    S, nh, gpn = a["switches"], a["dheavy"], a["gpus_per_node"]
    down, hdown, d, hd = a["down"], a["dheavy_down"], a["expander"], a["dheavy_expander"]
    _positive("dexpander", switches=S, down=down, dheavy_down=hdown, expander=d, gpus_per_node=gpn)
    if not 0 <= nh <= S or down % gpn or hdown % gpn:
        raise TopologyError("dexpander: need 0 <= dheavy <= switches and gpus_per_node dividing both down "
                            "and dheavy_down")
    heavy = {i * S // nh for i in range(nh)} if nh else set()
    degrees = [hd if s in heavy else d for s in range(S)]
    if max(degrees) >= S or sum(degrees) % 2:
        raise TopologyError("dexpander: expander degrees must be < switches with an even sum")
    try:
        g = nx.random_degree_sequence_graph(degrees, seed=a["seed"], tries=50)
    except nx.NetworkXError as exc:
        raise TopologyError(f"dexpander: no expander with these degrees (seed {a['seed']}): {exc}") from None
    t = Topology(f"dexpander-{S}")
    m = 0
    for s in range(S):
        t.add_switch(f"s{s}")
        for _ in range((hdown if s in heavy else down) // gpn):
            for gid in t.add_node(f"n{m}", gpn, role_hint="decode" if s in heavy else None):
                t.add_port(gid, "p0", f"s{s}", a["gbps"])
            m += 1
    for u, v in sorted(tuple(sorted(e)) for e in g.edges):
        t.add_link(f"s{u}", f"s{v}", a["isl_gbps"], kind="expander")
    t.set_router(namer=prefix_namer("base"))
    t.params.update(dheavy_switches=[f"s{h}" for h in sorted(heavy)])
    return t


# ---------------------------------------------------------------------------------------------- Dragonfly
@_register(
    "dragonfly",
    "Dragonfly: groups of `routers` fully connected routers, `hosts` host ports and `global` global links "
    "per router, one global link between every pair of groups (groups <= routers*global+1); cell = group",
    Param("routers", int, 4, "a: routers per group"),
    Param("hosts", int, 2, "p: host ports (GPUs) per router"),
    Param("global", int, 2, "h: global links per router"),
    Param("groups", int, 0, "g: groups (0 = routers*global+1, the balanced maximum)"),
    Param("gpus_per_node", int, 1, "GPUs per host node (must divide hosts)"),
    Param("gbps", float, 100.0, "speed of every link"),
)
def _dragonfly(a: dict[str, Any]) -> Topology:
    ra, p, h, gpn = a["routers"], a["hosts"], a["global"], a["gpus_per_node"]
    g = a["groups"] or ra * h + 1
    _positive("dragonfly", routers=ra, hosts=p, groups=g, gpus_per_node=gpn)
    if g > ra * h + 1:
        raise TopologyError(f"dragonfly: {g} groups need more than routers*global = {ra * h} global ports")
    if p % gpn:
        raise TopologyError(f"dragonfly: gpus_per_node={gpn} must divide hosts={p}")
    t = Topology(f"dragonfly-{g}x{ra}x{p}")
    for grp in range(g):
        for r in range(ra):
            t.add_switch(f"r{grp}.{r}")
    per_group = ra * p // gpn
    gpus = _nodes_of(t, g * ra * p, gpn, "dragonfly", cell_of=lambda m: m // per_group)
    for x, gid in enumerate(gpus):
        grp, rem = divmod(x, ra * p)
        t.add_port(gid, "p0", f"r{grp}.{rem // p}", a["gbps"])
    for grp in range(g):
        for i in range(ra):
            for j in range(i + 1, ra):
                t.add_link(f"r{grp}.{i}", f"r{grp}.{j}", a["gbps"], kind="local")
    for i in range(g):
        for j in range(i + 1, g):
            qi, qj = (j - i - 1) % g, (i - j - 1) % g   # consecutive arrangement of global ports
            t.add_link(f"r{i}.{qi // h}", f"r{j}.{qj // h}", a["gbps"], kind="global")

    def diameter() -> int:
        if g == 1:
            return 2 if ra > 1 else 1
        return 4 if ra > 1 else 2

    t.set_router(namer=prefix_namer("min"), diameter=diameter)
    return t


# ---------------------------------------------------------------------------------------------- torus
@_register(
    "torus",
    "2D/3D torus of switches (wrap-around rings per dimension), `gpus_per_node` GPUs of one host per switch",
    Param("dims", str, "4x4", "ring sizes, e.g. 4x4 or 4x4x4"),
    Param("gpus_per_node", int, 1, "GPUs (host ports) on each torus switch"),
    Param("gbps", float, 100.0, "speed of every link"),
)
def _torus(a: dict[str, Any]) -> Topology:
    try:
        dims = [int(v) for v in a["dims"].lower().split("x")]
    except ValueError:
        raise TopologyError(f"torus: dims must look like 4x4 or 4x4x4, got {a['dims']!r}") from None
    if not 1 <= len(dims) <= 3 or any(d < 1 for d in dims):
        raise TopologyError(f"torus: need 1 to 3 dimensions of size >= 1, got {a['dims']!r}")
    _positive("torus", gpus_per_node=a["gpus_per_node"], gbps=a["gbps"])
    t = Topology(f"torus-{a['dims']}")
    coords = [()]  # type: list[tuple[int, ...]]
    for d in dims:
        coords = [c + (i,) for c in coords for i in range(d)]

    def nm(c: tuple[int, ...]) -> str:
        return "t" + ".".join(map(str, c))

    for m, c in enumerate(coords):
        t.add_switch(nm(c))
        for g in t.add_node(f"n{m}", a["gpus_per_node"]):
            t.add_port(g, "p0", nm(c), a["gbps"])
    for c in coords:
        for axis, d in enumerate(dims):
            if d == 1 or (d == 2 and c[axis] == 1):
                continue
            nxt = c[:axis] + ((c[axis] + 1) % d,) + c[axis + 1:]
            t.add_link(nm(c), nm(nxt), a["gbps"], kind="torus")
    t.set_router(namer=prefix_namer("min"), diameter=lambda: sum(d // 2 for d in dims) + 1)
    return t
