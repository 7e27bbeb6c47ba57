"""Fabric model: generator figures derived by hand, candidate paths, locality, scale without all-pairs work."""

from __future__ import annotations

import pytest
from kvlane.policy.topology import (
    GENERATORS,
    Distance,
    Locality,
    Topology,
    TopologyError,
    generators_help,
    load_topology,
)


@pytest.fixture(scope="module")
def zcube16k() -> Topology:
    return load_topology("zcube:n=128,k=2")


# ------------------------------------------------------------------------------------------------ ZCube
def test_zcube_128_2_matches_the_seed(zcube16k: Topology) -> None:
    t = zcube16k
    # Recursive definition: ZCube(n,1) = 1 switch + n GPUs; ZCube(n,2) = n × ZCube(n,1) + n switches
    # → 128 × 128 = 16,384 GPUs, 2 layers × 128 = 256 switches, 2 NIC ports per GPU, diameter 2.
    assert t.num_gpus == 16_384
    assert len(t.nodes) == 16_384 // 8 == 2048
    assert t.num_switches == 256
    assert all(len(t.ports_of(g)) == 2 for g in ("n0.g0", "n1000.g5", "n2047.g7"))
    assert t.diameter_hops() == 2
    # Cables (seed Table 6: "49,152×200G"): 16,384 GPUs × 2 access cables = 32,768, plus the full
    # bipartite graph between the layers 128 × 128 = 16,384 → 49,152.
    s = t.summary()
    assert s["links"] == t.num_links == 49_152
    assert s["link_kinds"] == {"gpu-access": 32_768, "inter-switch": 16_384}
    # Ports per switch: 128 GPU downlinks + 128 links to the other layer = 256 = 2n (seed: "first and last
    # layer switches require 2n ports"; "256 logical ports per switch at 16K").
    assert s["switch_ports"] == {"min": 256, "max": 256}
    assert t.switch_degree("A0") == t.switch_degree("B127") == 256


def test_zcube_two_paths_through_the_right_switches(zcube16k: Topology) -> None:
    t = zcube16k
    # GPU x = 8·node + rank; coordinates (A, B) = divmod(x, 128).
    # n0.g3 → x=3 → (A0, B3); n100.g5 → x=805 → (A6, B37).
    ps = t.paths("n0.g3", "n100.g5")
    assert [p.name for p in ps] == ["zcube-path1", "zcube-path2"]
    p1, p2 = ps
    assert p1.switches == ("A0", "B37")            # P → A_p → B_d → D
    assert p2.switches == ("B3", "A6")             # P → B_p → A_d → D
    assert p1.src_nic == "n0.g3.p0" and p1.dst_nic == "n100.g5.p1"
    assert p2.src_nic == "n0.g3.p1" and p2.dst_nic == "n100.g5.p0"
    assert p1.links == ("n0.g3.p0--A0", "A0--B37", "n100.g5.p1--B37")
    assert all(t.link(lid).gbps == 200.0 for lid in p1.links + p2.links)
    assert p1.hops == p2.hops == 2 and p1.bottleneck_gbps == 200.0
    assert t.distance("n0.g3", "n100.g5") == Distance(2, 200.0)
    # Deterministic: asking again (and in the other order) gives the same answer.
    assert t.paths("n0.g3", "n100.g5") == ps
    assert [p.switches for p in t.paths("n100.g5", "n0.g3")] == [("A6", "B3"), ("B37", "A0")]


def test_zcube_shared_switch_gives_one_hop_path_first(zcube16k: Topology) -> None:
    # n0.g1 (x=1: A0,B1) and n15.g7 (x=127: A0,B127) share A0.
    ps = zcube16k.paths("n0.g1", "n15.g7")
    assert ps[0].name == "zcube-a" and ps[0].switches == ("A0",) and ps[0].hops == 1
    assert {p.name for p in ps[1:]} == {"zcube-path1", "zcube-path2"}
    # n0.g0 (A0,B0) and n16.g0 (x=128: A1,B0) share B0.
    assert zcube16k.paths("n0.g0", "n16.g0")[0].name == "zcube-b"


def test_zcube_seed_cell_table() -> None:
    # §5: 1024 GPUs = ZCube(32,2): 32·32 GPUs, 2n/k = 2·1024/32 = 64 switches, k + n/k = 32 + 32 = 64 ports.
    t = load_topology("zcube:n=32,k=2")
    assert (t.num_gpus, len(t.nodes), t.num_switches) == (1024, 128, 64)
    assert t.summary()["switch_ports"] == {"min": 64, "max": 64}
    # links: 2·1024 access + 32·32 bipartite = 3072
    assert t.num_links == 3072
    # 4096 GPUs = ZCube(64,2): 128 switches of 64 + 64 = 128 ports, half of them GPU downlinks (§5, §8:
    # "with the same 128 switches ZCube uses 2 ports per GPU, 50% for interconnection, capping at 4,096")
    t4 = load_topology("zcube:n=64,k=2")
    assert (t4.num_gpus, len(t4.nodes), t4.num_switches) == (4096, 512, 128)
    assert t4.summary()["switch_ports"] == {"min": 128, "max": 128}
    assert t4.summary()["link_kinds"]["inter-switch"] * 2 == 128 * 64  # 64 of 128 ports per switch


def test_zcube_k3_figures_and_bfs_diameter() -> None:
    # ZCube(3,3): 3^3 = 27 GPUs, 3 layers × 3^2 = 27 switches, 3 ports per GPU.
    # Links: 27·3 access + 2 layer gaps × 27 (one per GPU) = 81 + 54 = 135.
    # Ports: outer layers 3 GPUs + 3 up/down = 6 (=2n); middle layer 3 + 3 + 3 = 9 (=3n).
    t = load_topology("zcube:n=3,k=3,gpus_per_node=1")
    assert (t.num_gpus, t.num_switches, t.num_links) == (27, 27, 135)
    assert t.summary()["switch_ports"] == {"min": 6, "max": 9}
    assert t.switch_degree("A0") == 6 and t.switch_degree("B0") == 9 and t.switch_degree("C0") == 6
    assert t.diameter_hops() == 3 == t.diameter_hops_bfs()
    # GPUs 0 = (0,0,0) and 26 = (2,2,2) differ in every digit: 3 switches, ascending and descending chains.
    ps = t.paths("n0.g0", "n26.g0")
    assert ps[0].hops == 3 and {p.switches[0][0] for p in ps if p.hops == 3} == {"A", "C"}


def test_zcube_small_bfs_agrees_with_formula() -> None:
    t = load_topology("zcube:n=4,k=2,gpus_per_node=2")
    assert t.diameter_hops() == t.diameter_hops_bfs() == 2


# ------------------------------------------------------------------------------------------------ fat-tree
def test_fattree_k4_figures() -> None:
    # k=4: k^3/4 = 16 hosts; k pods × (k/2 edge + k/2 agg) = 16 + (k/2)^2 = 4 cores → 20 switches;
    # links: 16 host + k·(k/2)^2 = 16 edge-agg + k·(k/2)·(k/2) = 16 agg-core → 48; every switch uses k = 4 ports.
    t = load_topology("fattree:k=4")
    assert (t.num_gpus, t.num_switches, t.num_links) == (16, 20, 48)
    assert t.summary()["switch_ports"] == {"min": 4, "max": 4}
    assert t.diameter_hops() == 5 == t.diameter_hops_bfs()
    # hosts 0,1 on e0.0; 2,3 on e0.1 (pod 0); 4.. pod 1
    assert t.distance("n0.g0", "n1.g0").hops == 1
    same_pod = t.paths("n0.g0", "n2.g0")
    assert [p.hops for p in same_pod] == [3, 3] and {p.name for p in same_pod} == {"up-down-0", "up-down-1"}
    other_pod = t.paths("n0.g0", "n15.g0")
    # (k/2)^2 = 4 equal-cost core routes, all listed
    assert len(other_pod) == 4 and all(p.hops == 5 for p in other_pod)
    assert len({p.switches[2] for p in other_pod}) == 4


def test_fattree_oversub_lowers_uplinks() -> None:
    t = load_topology("fattree:k=4,oversub=4,gbps=100")
    assert t.distance("n0.g0", "n15.g0") == Distance(5, 25.0)
    assert t.distance("n0.g0", "n1.g0") == Distance(1, 100.0)


# ------------------------------------------------------------------------------------------------ loopback
def test_loopback_two_paths_shm_and_tcp() -> None:
    t = load_topology("loopback:gpus=4")
    assert t.nodes == ["n0"] and t.num_gpus == 4
    ps = t.paths("n0.g0", "n0.g3")
    assert [p.name for p in ps] == ["shm", "tcp"]
    assert [p.bottleneck_gbps for p in ps] == [100.0, 25.0]
    assert ps[0].src_nic == "n0.g0.shm" and ps[1].dst_nic == "n0.g3.tcp"
    assert t.locality("n0.g0", "n0.g3") is Locality.SAME_NODE
    assert t.summary()["diameter_hops"] == 1 and t.num_links == 8


# ------------------------------------------------------------------------------------------------ errors
def test_bad_queries_and_specs_name_the_problem() -> None:
    t = load_topology("loopback:gpus=2")
    with pytest.raises(TopologyError, match="unknown GPU 'n9.g0'"):
        t.paths("n9.g0", "n0.g0")
    with pytest.raises(TopologyError, match="to itself"):
        t.paths("n0.g0", "n0.g0")
    with pytest.raises(TopologyError, match="unknown link"):
        t.link("nope")
    with pytest.raises(TopologyError, match="unknown generator 'zcub'"):
        load_topology("zcub:n=4")
    with pytest.raises(TopologyError, match="unknown parameter 'm'"):
        load_topology("zcube:m=4")
    with pytest.raises(TopologyError, match="missing required parameter 'n'"):
        load_topology("zcube:k=2")
    with pytest.raises(TopologyError, match="parameter n='x' is not a valid int"):
        load_topology("zcube:n=x")
    with pytest.raises(TopologyError, match="do not split into nodes"):
        load_topology("zcube:n=3,k=2")


def test_help_lists_every_generator_and_parameter() -> None:
    text = generators_help()
    for g in GENERATORS.values():
        assert g.name + ":" in text
        for p in g.params:
            assert f"    {p.name}: " in text


# ------------------------------------------------------------------------------------------------ locality
def test_locality_order_and_tiles() -> None:
    t = load_topology("zcube:n=4,k=2,gpus_per_node=2")   # 16 GPUs, 8 nodes; A switch = 2 nodes
    assert [loc.rank for loc in Locality] == [0, 1, 2, 3, 4]
    assert t.locality("n0.g0", "n0.g1") is Locality.SAME_NODE
    assert t.locality("n0.g0", "n5.g0") is Locality.SAME_CELL      # no tiles yet
    # tiles: 0 = {n0, n1} (both on A0), 1 = {n2} (A1), 2 = {n4} (A2)
    for node, tile in (("n0", 0), ("n1", 0), ("n2", 1), ("n4", 2)):
        t.set_node_attrs(node, tile=tile)
    assert t.locality("n0.g0", "n1.g1") is Locality.SAME_TILE
    # n0 = GPUs 0,1 → B0,B1; n2 = GPUs 4,5 → B0,B1 : share B0 → adjacent
    assert t.locality("n0.g0", "n2.g0") is Locality.ADJACENT_TILE
    assert t.tiles_adjacent(0, 1) and t.tiles_adjacent(1, 2)
    t.set_node_attrs("n7", cell=1)
    assert t.locality("n0.g0", "n7.g0") is Locality.CROSS_CELL
