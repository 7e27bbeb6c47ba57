"""Baselines' routing: "listed" takes one of the topology's listed equal-cost routes (on a fat-tree they share
the first up-link), "per-hop" hashes each rank stream at every switch over all shortest next hops."""

import pytest
from kvlane.policy.sim.baselines import make_policy
from kvlane.policy.topology import load_topology


def routes_up(mode: str, src: str, dst: str, n: int = 64) -> set[tuple[str, str]]:
    """(aggregation, core) switches of the routes a baseline picks for n streams of one GPU pair."""
    topo = load_topology("fattree:k=8,oversub=1,gpus_per_node=1")
    pol = make_policy("random", topo, ecmp=mode)
    out = set()
    for i in range(n):
        p = pol._ecmp(src, dst, f"t{i}/0")
        assert p.hops == 5  # cross-pod: edge, agg, core, agg, edge — always a shortest route
        assert p.src_nic == f"{src}.p0" and p.dst_nic == f"{dst}.p0"
        out.add(p.switches[1:3])
    return out


def test_per_hop_ecmp_uses_every_shortest_route_listed_only_the_topologys_four():
    # k=8: edge e0.0 has four aggregation switches a0.0-a0.3 above it, each with 4 cores: n0 (pod 0) -> n127
    # (pod 7) has 16 shortest routes. The topology lists 4 of them (one per aggregation switch); per-hop hashing
    # reaches all 16 over 256 streams (hashing is deterministic).
    listed = routes_up("listed", "n0.g0", "n127.g0")
    assert len(listed) == 4 and {agg for agg, _ in listed} == {"a0.0", "a0.1", "a0.2", "a0.3"}
    assert len(routes_up("per-hop", "n0.g0", "n127.g0", n=256)) == 16


def test_per_hop_route_inside_a_pod_and_under_one_edge():
    topo = load_topology("fattree:k=4,oversub=1,gpus_per_node=1")
    pol = make_policy("least-loaded", topo, ecmp="per-hop")
    assert pol._ecmp("n0.g0", "n1.g0", "x").switches == ("e0.0",)  # same edge switch: one hop
    assert len(pol._ecmp("n0.g0", "n2.g0", "x").switches) == 3  # same pod, other edge: edge-agg-edge


def test_unknown_ecmp_mode_is_refused():
    topo = load_topology("fattree:k=4,oversub=1,gpus_per_node=1")
    with pytest.raises(ValueError, match="ecmp must be one of listed, per-hop"):
        make_policy("random", topo, ecmp="spray")
