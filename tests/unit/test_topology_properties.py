"""Invariants of every candidate path on every generator, for random GPU pairs (hypothesis)."""

from __future__ import annotations

import functools

from hypothesis import given, settings
from hypothesis import strategies as st
from kvlane.policy.topology import Path, Topology, load_topology

SPECS = [
    "loopback:gpus=4",
    "zcube:n=8,k=2,gpus_per_node=4",
    "zcube:n=3,k=3,gpus_per_node=3",
    "fattree:k=4,oversub=2",
    "roft:nodes=16,rails=4,radix=8",
    "roft:nodes=8,rails=4,radix=8",
    "railonly:rails=4,radix=6",
    "railfly:rails=4,radix=10,isl_links=2",
    "railfabric:switches=16,down=8,expander=3,fastlane=4,dheavy=4,dheavy_fastlane=6,gpus_per_node=4",
    "dragonfly:routers=3,hosts=2,global=1",
    "torus:dims=3x4,gpus_per_node=2",
    "zrail:cells=3,n=3,gpus_per_node=3",
    "dexpander:switches=8,down=4,expander=3,dheavy=2,dheavy_down=2,dheavy_expander=5,gpus_per_node=2",
]


@functools.cache
def topo(spec: str) -> Topology:
    return load_topology(spec)


def walk(t: Topology, src: str, dst: str, p: Path) -> list[str]:
    """Follow the path's links from src; return the switches met. Fails if the links do not chain."""
    switches = set(t.switches)
    here = {src, *t.ports_of(src)}
    met = []
    for lid in p.links:
        ln = t.link(lid)
        assert ln.a in here or ln.b in here, (p.name, lid, here)
        nxt = ln.b if ln.a in here else ln.a
        if nxt in switches:
            here = {nxt}
            met.append(nxt)
        elif nxt in set(t.gpus):
            here = {nxt, *t.ports_of(nxt)}
        else:  # a NIC port: we are at its GPU now
            gpu = nxt.rsplit(".", 1)[0]
            here = {nxt, gpu}
    assert dst in here, (p.name, here)
    return met


@settings(max_examples=120, deadline=None)
@given(spec=st.sampled_from(SPECS), data=st.data())
def test_paths_chain_from_src_to_dst(spec: str, data: st.DataObject) -> None:
    t = topo(spec)
    gpus = t.gpus
    src = data.draw(st.sampled_from(gpus))
    dst = data.draw(st.sampled_from([g for g in gpus if g != src]))
    ps = t.paths(src, dst)
    assert ps, (src, dst)
    assert len({p.name for p in ps}) == len(ps)
    keys = [(p.hops, -p.bottleneck_gbps, p.name) for p in ps]
    assert keys == sorted(keys)                                   # best first
    for p in ps:
        assert walk(t, src, dst, p) == list(p.switches)
        assert p.hops == len(p.switches)
        assert p.bottleneck_gbps == min(t.link(lid).gbps for lid in p.links)
        assert len(set(p.switches)) == len(p.switches)            # loop-free
        if p.name != "nvlink":
            # the NICs are on the source / destination host (the GPU's own unless relayed over NVLink)
            assert t.node_of(t.gpu_of_port(p.src_nic)) == t.node_of(src)
            assert t.node_of(t.gpu_of_port(p.dst_nic)) == t.node_of(dst)
            if "relay" not in p.name:
                assert p.src_nic in t.ports_of(src) and p.dst_nic in t.ports_of(dst)
    assert t.distance(src, dst).hops == ps[0].hops <= t.diameter_hops()
    assert t.paths(src, dst) == ps                                # deterministic


def test_diameter_is_reached() -> None:
    # the closed-form diameter is attained by some pair, on every fabric small enough to scan
    for spec in SPECS:
        t = topo(spec)
        gpus = t.gpus
        worst = max(t.distance(a, b).hops for a in gpus for b in gpus if a != b)
        assert worst == t.diameter_hops(), spec
