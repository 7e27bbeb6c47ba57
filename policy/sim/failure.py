"""Switch and link failures for the simulator: `degrade(topology, switches=..., links=...)` returns a new
`Topology` without the failed parts, which both the simulator's network and the policy under test are built on.

Owned by `kvlane.policy.sim`; runs in the simulator's process (CLI, tests, benchmarks). Pure: it copies the
topology through its public construction API and never touches the original, a file, a socket or a clock.

What a failure does (a failure is present from the start of a run — steady state with the fault):
- every cable of a failed switch is gone, as are failed links; a NIC port whose cable is gone is dead;
- a GPU pair keeps those of its original candidate paths that avoid every failed part (so untouched pairs keep
  exactly their routes); a pair that lost a candidate also gets the shortest routes of the surviving graph (up to
  the topology's ECMP width per port pair) as alternatives — its only routes when none survived;
- a GPU left without any NIC port is either *relayed* over NVLink through a sibling GPU of its node that still
  has one (the path gains an NVLink hop and shares the sibling's NIC — what a rail-optimized fabric does when a
  rail's ToR dies), or, with `relay="none"`, *down*: the simulator does not register its engine, so the policy
  never pairs it. A GPU that no surviving route can reach (networkx connected components) is down too.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import networkx as nx

from ..topology import Path, Topology, TopologyError
from ..topology.model import generic_router

Relay = Literal["nvlink", "none"]
RELAYS: tuple[str, ...] = ("nvlink", "none")

#: Bandwidth of the NVLink hop a relayed GPU gains when the topology has no GPU–GPU link of its own (Gbps).
DEFAULT_NVLINK_GBPS = 3600.0


@dataclass(frozen=True)
class FailureReport:
    """What a failure removed and what it left behind (also kept on the degraded topology as `.failure`)."""

    switches: tuple[str, ...]
    #: Every cable removed: the failed links plus each failed switch's cables.
    links: tuple[str, ...]
    #: NIC ports whose cable is gone.
    dead_ports: tuple[str, ...]
    #: GPU that lost every NIC port -> the sibling GPU whose NIC it borrows over NVLink.
    relayed: dict[str, str]
    #: GPUs with no route at all (no port and no relay, or cut off from the rest of the fabric).
    down_gpus: tuple[str, ...]
    relay: str

    def describe(self) -> str:
        parts = [f"switch {', '.join(self.switches)}" if self.switches else "",
                 f"{len(self.links)} cables", f"{len(self.dead_ports)} NIC ports dead"]
        if self.relayed:
            parts.append(f"{len(self.relayed)} GPUs relayed over NVLink")
        if self.down_gpus:
            parts.append(f"{len(self.down_gpus)} GPUs down")
        return ", ".join(p for p in parts if p)


def parse_failures(items: Iterable[str]) -> tuple[list[str], list[str]]:
    """`["switch:A0", "link:A0--B3", "l0.r0"]` → (switches, links); a bare name is a switch."""
    switches: list[str] = []
    links: list[str] = []
    for raw in items:
        for item in filter(None, (s.strip() for s in raw.split(","))):
            kind, sep, name = item.partition(":")
            if not sep:
                kind, name = "switch", item
            if kind not in ("switch", "link") or not name:
                raise TopologyError(f"failure {item!r}: expected switch:<id> or link:<id>")
            (switches if kind == "switch" else links).append(name)
    return switches, links


def _relay_path(name: str, pre: Sequence[str], path: Path | None, post: Sequence[str], src: str, dst: str,
                gbps: Sequence[float]) -> Path:
    links = (*pre, *(path.links if path else ()), *post)
    bw = min([*gbps, path.bottleneck_gbps] if path else list(gbps))
    return Path(name, tuple(links), path.switches if path else (), path.src_nic if path else src,
                path.dst_nic if path else dst, path.hops if path else 0, bw)


def degrade(topology: Topology, switches: Iterable[str] = (), links: Iterable[str] = (), *,
            relay: Relay = "nvlink", nvlink_gbps: float = DEFAULT_NVLINK_GBPS) -> Topology:
    """A copy of `topology` with `switches` and `links` failed (see the module docstring). The copy carries
    `.failure` (a `FailureReport`) and `.down_gpus`; its paths are computed lazily like the original's."""
    if relay not in RELAYS:
        raise TopologyError(f"relay must be one of {', '.join(RELAYS)}, got {relay!r}")
    if not nvlink_gbps > 0:
        raise TopologyError(f"nvlink_gbps must be > 0, got {nvlink_gbps}")
    failed_sw = list(dict.fromkeys(switches))
    known_sw = set(topology.switches)
    for s in failed_sw:
        if s not in known_sw:
            raise TopologyError(f"cannot fail unknown switch {s!r} (switches look like {topology.switches[0]!r})")
    failed_links: set[str] = set()
    for lid in links:
        topology.link(lid)  # raises TopologyError naming an unknown link
        failed_links.add(lid)
    sw_set = set(failed_sw)
    for link in topology.links:
        if link.a in sw_set or link.b in sw_set:
            failed_links.add(link.id)

    t = Topology(topology.name + "-degraded", spec=topology.spec, params=dict(topology.params), ecmp=topology.ecmp)
    for node in topology.nodes:
        attrs = topology.node_attrs(node)
        t.add_node(node, topology.gpus_of(node), tile=attrs["tile"], cell=attrs["cell"],
                   role_hint=attrs["role_hint"])
    for s in topology.switches:  # every switch, failed ones included (isolated), so indices stay the same
        t.add_switch(s)
    port_link = {}
    gpu_set = set(topology.gpus)
    for link in topology.links:
        if link.a not in gpu_set and link.a not in known_sw:
            port_link[link.a] = link
    dead_ports: list[str] = []
    for g in topology.gpus:
        for pid, name, sidx in topology.port_records(g):
            link = port_link[pid]
            if link.id in failed_links:
                dead_ports.append(pid)
                continue
            t.add_port(g, name, topology.switches[sidx], link.gbps, kind=link.kind, link_id=link.id)
    nvlinks: dict[frozenset[str], str] = {}
    for link in topology.links:
        if link.id in failed_links:
            continue
        if link.a in known_sw or link.a in gpu_set:  # switch-switch or GPU-GPU (ports were copied above)
            t.add_link(link.a, link.b, link.gbps, kind=link.kind, link_id=link.id)
            if link.a in gpu_set:
                nvlinks[frozenset((link.a, link.b))] = link.id

    # GPUs without a port: relay through a sibling of the same node that still has one, or mark down.
    relayed: dict[str, str] = {}
    down: set[str] = set()
    for node in topology.nodes:
        gpus = topology.gpus_of(node)
        alive = [g for g in gpus if t.ports_of(g)]
        for i, g in enumerate(gpus):
            if t.ports_of(g):
                continue
            if relay == "none" or not alive:
                down.add(g)
                continue
            # the next live sibling in rank order (wrapping): spreads relays when several GPUs lost their NIC
            sib = min(alive, key=lambda s: (gpus.index(s) - i) % len(gpus))
            relayed[g] = sib
            key = frozenset((g, sib))
            if key not in nvlinks:
                nvlinks[key] = t.add_link(g, sib, nvlink_gbps, kind="nvlink", link_id=f"{g}--{sib}")

    # Reachability on the surviving graph (networkx): GPUs outside the largest GPU-holding component are down.
    graph = nx.Graph()
    graph.add_nodes_from(g for g in topology.gpus if g not in down)
    for link in t.links:
        a = t.gpu_of_port(link.a) if link.a not in known_sw and link.a not in gpu_set else link.a
        graph.add_edge(a, link.b)
    comps = sorted(nx.connected_components(graph), key=lambda c: (-sum(1 for x in c if x in gpu_set), min(c)))
    if comps:
        for comp in comps[1:]:
            down.update(x for x in comp if x in gpu_set)
    for g in down:
        relayed.pop(g, None)

    base_paths = topology.paths

    def ok(p: Path) -> bool:
        return not failed_links.intersection(p.links)

    def direct(src: str, dst: str) -> list[Path]:
        before = base_paths(src, dst)
        kept = [p for p in before if ok(p)]
        if len(kept) == len(before):
            return kept
        # Some candidates died: keep the survivors and add the surviving graph's shortest routes as
        # alternatives (what ECMP converges to), so a pair that lost path diversity can still spread load.
        seen = {p.links for p in kept}
        for p in generic_router(t, src, dst, namer=lambda sp, dp, i: f"reroute-{sp}-{dp}" + (f"-{i}" if i else "")):
            if p.links not in seen:
                seen.add(p.links)
                kept.append(p)
        return kept

    def route(topo: Topology, src: str, dst: str) -> list[Path]:
        if src in down or dst in down:
            return []
        rs, rd = relayed.get(src), relayed.get(dst)
        if rs is None and rd is None:
            return direct(src, dst)
        a, b = rs or src, rd or dst
        pre = [nvlinks[frozenset((src, rs))]] if rs else []
        post = [nvlinks[frozenset((rd, dst))]] if rd else []
        gbps = [topo.link(x).gbps for x in (*pre, *post)]
        if a == b:  # the relay is the other end (or both relay through the same GPU)
            return [_relay_path("nvlink", pre, None, post, src, dst, gbps)]
        return [_relay_path(f"{p.name}-relay", pre, p, post, src, dst, gbps) for p in direct(a, b)]

    t.set_router(route)
    report = FailureReport(switches=tuple(failed_sw), links=tuple(sorted(failed_links)),
                           dead_ports=tuple(dead_ports), relayed=relayed, down_gpus=tuple(sorted(down)),
                           relay=relay)
    t.failure = report  # type: ignore[attr-defined]
    t.down_gpus = frozenset(down)  # type: ignore[attr-defined]
    return t
