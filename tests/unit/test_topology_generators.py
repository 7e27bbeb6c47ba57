"""Every generator's figures against numbers derived by hand (arithmetic in the comments), plus scale."""

from __future__ import annotations

import pytest
from kvlane.policy.topology import Distance, Locality, Topology, TopologyError, load_topology


@pytest.fixture(scope="module")
def roft16k() -> Topology:
    return load_topology("roft:nodes=2048,rails=8,radix=128")


# ------------------------------------------------------------------------------------------------ ROFT
def test_roft_16k_matches_seed_table6(roft16k: Topology) -> None:
    # 2048 nodes × 8 rails = 16,384 GPUs, radix 128 → a leaf has h = 64 downlinks + 64 uplinks.
    # rail groups = 2048/64 = 32 → leaves = 32 × 8 = 256 > radix → 3 tiers; pods = 256/64 = 4,
    # spines = 4 × 64 = 256; cores = 256 spines × 64 uplinks / 128 ports = 128. 256+256+128 = 640 switches.
    # cables: 16,384 GPU + 256×64 leaf-spine + 256×64 spine-core = 3 × 16,384 = 49,152 (seed: 640, 49,152×400G).
    t = roft16k
    assert (t.num_gpus, t.num_switches, t.num_links) == (16_384, 640, 49_152)
    assert t.summary()["switch_ports"] == {"min": 128, "max": 128}
    assert t.params["tiers"] == 3 and t.params["pods"] == 4
    assert t.diameter_hops() == 5
    ps = t.paths("n0.g3", "n2047.g3")                 # different pods → leaf-spine-core-spine-leaf
    assert ps[0].hops == 5 and ps[0].name == "up-down-0" and ps[0].bottleneck_gbps == 400.0
    assert t.paths("n0.g3", "n63.g3")[0].name == "rail3"   # same rail group: one leaf


def test_roft_two_tier() -> None:
    # 64 nodes, radix 64: h = 32, groups = 2, leaves = 16 <= 64 → 2 tiers with 32 spines.
    # links: 512 GPU + 16 leaves × 32 spines = 1024; switches 16 + 32 = 48; leaf ports 32 + 32 = 64.
    t = load_topology("roft:nodes=64,rails=8,radix=64")
    assert (t.num_gpus, t.num_switches, t.num_links) == (512, 48, 1024)
    assert t.switch_degree("l0.r0") == 64 and t.switch_degree("s0") == 16
    assert t.diameter_hops() == 3 == t.diameter_hops_bfs()
    assert [p.name for p in t.paths("n0.g1", "n1.g1")] == ["rail1"]
    cross = t.paths("n0.g1", "n40.g1")                # group 0 vs group 1 → leaf-spine-leaf, 4 ECMP listed
    assert [p.hops for p in cross] == [3, 3, 3, 3]


def test_roft_three_tier_small_bfs_agrees() -> None:
    # 16 nodes, radix 8: h = 4, groups 4, leaves 32 > 8 → pods 8, block = 8/8 = 1, cores = 4 × 4 = 16.
    t = load_topology("roft:nodes=16,rails=8,radix=8")
    assert (t.num_switches, t.num_links) == (32 + 32 + 16, 128 * 3)
    assert t.diameter_hops() == 5 == t.diameter_hops_bfs()


def test_roft_oversub() -> None:
    t = load_topology("roft:nodes=64,rails=8,radix=64,oversub=2")
    assert t.distance("n0.g1", "n40.g1") == Distance(3, 200.0)


# ------------------------------------------------------------------------------------------------ rail-only
def test_railonly_relays_cross_rail_over_nvlink() -> None:
    # 4 nodes (= radix) × 8 rails; links: 32 GPU + 4 nodes × C(8,2) = 28 NVLink = 112 → 144.
    t = load_topology("railonly:rails=8,radix=4")
    assert (t.num_gpus, t.num_switches, t.num_links) == (32, 8, 144)
    assert t.summary()["link_kinds"] == {"gpu-access": 32, "nvlink": 112}
    assert [p.name for p in t.paths("n0.g1", "n1.g1")] == ["rail1"]
    ps = {p.name: p for p in t.paths("n0.g1", "n1.g2")}
    assert set(ps) == {"rail2-relay-src", "rail1-relay-dst"}
    assert ps["rail2-relay-src"].links[0] == "n0.g1--n0.g2" and ps["rail2-relay-src"].src_nic == "n0.g2.p0"
    assert ps["rail1-relay-dst"].links[-1] == "n1.g1--n1.g2" and ps["rail1-relay-dst"].switches == ("rail1",)
    assert t.paths("n0.g1", "n0.g5")[0].name == "nvlink" and t.distance("n0.g1", "n0.g5").hops == 0
    assert t.diameter_hops() == 1
    with pytest.raises(TopologyError, match="exceed the rail switch radix"):
        load_topology("railonly:radix=4,nodes=5")


# ------------------------------------------------------------------------------------------------ RailFly
@pytest.mark.parametrize(("radix", "hosts", "gpus"), [
    (128, 121, 968),     # 8× fixed 51.2T: 128 - 7 inter-group ports = 121 per rail → 121 × 8 = 968
    (576, 569, 4552),    # 8× Arista 7800R3: 576 - 7 = 569 → 4,552
    (768, 761, 6088),    # 8× H3C S12500R: 768 - 7 = 761 → 6,088
])
def test_railfly_seed_scale_table(radix: int, hosts: int, gpus: int) -> None:
    t = load_topology(f"railfly:rails=8,radix={radix}")
    # K = 8 rail switches fully interconnected: 8·7/2 = 28 inter-group links, independent of scale.
    assert (len(t.nodes), t.num_gpus, t.num_switches) == (hosts, gpus, 8)
    assert t.summary()["link_kinds"] == {"gpu-access": gpus, "inter-group": 28}
    assert t.summary()["switch_ports"] == {"min": radix, "max": radix}
    assert t.diameter_hops() == 2
    # "With the same 128 switches ... ~15,488 GPUs": 128 / 8 = 16 RailFly units × 968 = 15,488.
    if radix == 128:
        assert 128 // 8 * t.num_gpus == 15_488


def test_railfly_paths() -> None:
    t = load_topology("railfly:rails=8,radix=128")
    assert [(p.name, p.switches) for p in t.paths("n0.g3", "n7.g3")] == [("rail3", ("rail3",))]
    x = t.paths("n0.g1", "n5.g6")
    assert [(p.name, p.switches, p.links[1]) for p in x] == [("xrail", ("rail1", "rail6"), "rail1--rail6")]
    t2 = load_topology("railfly:rails=4,radix=16,isl_links=2")
    # 4 rails: 6 pairs × 2 cables = 12 inter-group links; 16 - 3×2 = 10 hosts
    assert t2.summary()["link_kinds"]["inter-group"] == 12 and len(t2.nodes) == 10
    assert [p.name for p in t2.paths("n0.g0", "n1.g2")] == ["xrail-0", "xrail-1"]


def test_railfly_bfs_agrees() -> None:
    assert load_topology("railfly:rails=4,radix=8").diameter_hops_bfs() == 2


# ------------------------------------------------------------------------------------------------ Rail-Fabric
def test_railfabric_1024_cell_matches_seed() -> None:
    # 64 switches, 32 GPU downlinks each: 64 × 32 / 2 ports per GPU = 1024 GPUs = 128 nodes.
    # links: 2048 access + 64·8/2 = 256 expander + 64·8/2 = 256 fast lane = 2560; ports 32+8+8 = 48.
    t = load_topology("railfabric:switches=64,down=32,expander=8,fastlane=8")
    assert (t.num_gpus, len(t.nodes), t.num_switches, t.num_links) == (1024, 128, 64, 2560)
    assert t.summary()["link_kinds"] == {"expander": 256, "fastlane": 256, "gpu-access": 2048}
    assert t.summary()["switch_ports"] == {"min": 48, "max": 48}
    ps = {p.name: p for p in t.paths("n0.g0", "n127.g7")}
    assert set(ps) == {"fastlane", "base"}
    assert all(t.link(lid).kind in ("fastlane", "gpu-access") for lid in ps["fastlane"].links)
    assert all(t.link(lid).kind in ("expander", "gpu-access") for lid in ps["base"].links)
    # same switch → a one-switch "local" path only (n0.g0 and n0.g1 share s0)
    assert [p.name for p in t.paths("n0.g0", "n0.g1")] == ["local"]
    # each plane alone has diameter: hops through an 8-regular expander on 64 switches is small
    assert 2 <= t.diameter_hops() <= 4


def test_railfabric_d_heavy_and_determinism() -> None:
    # 16 D-heavy switches with 12 fast-lane links: 4 extra each → 16·4/2 = 32 more links; ports 48 or 52.
    spec = "railfabric:switches=64,down=32,dheavy=16,dheavy_fastlane=12"
    t = load_topology(spec)
    assert t.summary()["link_kinds"]["fastlane"] == 256 + 32
    assert t.summary()["switch_ports"] == {"min": 48, "max": 52}
    assert sorted(t.switch_degree(s) for s in t.params["dheavy_switches"]) == [52] * 16
    again = load_topology(spec)
    assert [(ln.id, ln.kind) for ln in again.links] == [(ln.id, ln.kind) for ln in t.links]
    other = load_topology(spec + ",seed=5")
    assert {ln.id for ln in other.links} != {ln.id for ln in t.links}


# ------------------------------------------------------------------------------------------------ Dragonfly
def test_dragonfly_balanced() -> None:
    # a=4 routers, p=2 hosts, h=2 global → g = a·h + 1 = 9 groups, 36 routers, 72 hosts.
    # links: 72 host + 9 × C(4,2) = 54 local + C(9,2) = 36 global = 162; router ports 2 + 3 + 2 = 7.
    t = load_topology("dragonfly:routers=4,hosts=2,global=2")
    assert (t.num_gpus, t.num_switches, t.num_links) == (72, 36, 162)
    assert t.summary()["link_kinds"] == {"global": 36, "gpu-access": 72, "local": 54}
    assert t.summary()["switch_ports"] == {"min": 7, "max": 7}
    assert t.summary()["cells"] == 9
    assert t.diameter_hops() == 4 == t.diameter_hops_bfs()
    assert t.locality("n0.g0", "n71.g0") is Locality.CROSS_CELL
    assert t.locality("n0.g0", "n7.g0") is Locality.SAME_CELL


# ------------------------------------------------------------------------------------------------ torus
@pytest.mark.parametrize(("dims", "links", "diameter"), [
    ("4x4", 16 + 32, 2 + 2 + 1),            # 2 dims × 4 rings × 4 links
    ("4x4x4", 64 + 192, 2 + 2 + 2 + 1),     # 3 dims × 16 rings × 4 links
    ("3x2x4", 24 + 60, 1 + 1 + 2 + 1),      # 8 rings of 3 (24) + 12 pairs (12) + 6 rings of 4 (24)
])
def test_torus(dims: str, links: int, diameter: int) -> None:
    t = load_topology(f"torus:dims={dims}")
    assert t.num_links == links
    assert t.diameter_hops() == diameter == t.diameter_hops_bfs()


# ------------------------------------------------------------------------------------------------ scale
def test_16k_fabric_builds_without_all_pairs_work(roft16k: Topology) -> None:
    t = load_topology("zcube:n=128,k=2")
    # No BFS ran during construction, and the ZCube closed-form router needs none either.
    assert t._bfs_cached.cache_info().currsize == 0
    for dst in ("n2047.g7", "n1024.g0", "n3.g3"):
        assert t.paths("n0.g0", dst)
    assert t._bfs_cached.cache_info().currsize == 0
    assert t._paths_cached.cache_info().currsize == 3
    # a generic-router 16K fabric runs one BFS per destination switch, not per pair
    r = load_topology("roft:nodes=64,rails=8,radix=64")
    assert r._bfs_cached.cache_info().currsize == 0
    # roft16k: GPUs on the same destination leaf share one BFS (n2047 and n2046 are both on leaf l31.r0)
    before = roft16k._bfs_cached.cache_info().currsize
    roft16k.paths("n0.g0", "n2047.g0")
    roft16k.paths("n1.g0", "n2046.g0")
    assert roft16k._bfs_cached.cache_info().currsize - before <= 1


# ------------------------------------------------------------------------------------------------ Hybrid ZRail
def test_zrail_four_1024_gpu_cells() -> None:
    # Seed Tier 2: 4 × 1024-GPU cells. Per cell ZCube(32,2): 1024 GPUs, 64 switches, 2048 access + 1024
    # bipartite links. Ring of 4 cells, depth 1: 4 cell pairs × 64 same-index switch pairs = 256 inter-cell.
    # Total 4·3072 + 256 = 12,544 links; ports 32 GPU + 32 bipartite + 2 inter-cell = 66.
    # Diameter: opposite cells are 2 ring steps apart → A_p, one switch per step, then B_d: 2 + 2 = 4.
    t = load_topology("zrail:cells=4,n=32,xcell=1")
    assert (t.num_gpus, len(t.nodes), t.num_switches, t.num_links) == (4096, 512, 256, 12_544)
    assert t.summary()["link_kinds"] == {"gpu-access": 8192, "inter-cell": 256, "inter-switch": 4096}
    assert t.summary()["switch_ports"] == {"min": 66, "max": 66} and t.summary()["cells"] == 4
    assert t.diameter_hops() == 4
    # n0 and n100 are in cell 0 (nodes 0-127): the ZCube closed form, with cell-prefixed switches
    assert [p.switches for p in t.paths("n0.g0", "n100.g3")] == [("c0.A0", "c0.B3"), ("c0.B0", "c0.A25")]
    # n200 is in cell 1: 3-switch cross-cell routes first
    x = t.paths("n0.g0", "n200.g3")
    assert x[0].hops == 3 and x[0].name.startswith("xcell-")
    assert any(t.link(lid).kind == "inter-cell" for lid in x[0].links)
    assert t.locality("n0.g0", "n200.g3") is Locality.CROSS_CELL
    assert t.locality("n0.g0", "n100.g3") is Locality.SAME_CELL


@pytest.mark.parametrize("spec", ["zrail:cells=5,n=4,gpus_per_node=2", "zrail:cells=6,n=3,xcell=2,gpus_per_node=1",
                                  "zrail:cells=2,n=4,gpus_per_node=2"])
def test_zrail_formula_agrees_with_bfs(spec: str) -> None:
    t = load_topology(spec)
    assert t.diameter_hops() == t.diameter_hops_bfs()


# ------------------------------------------------------------------------------------------------ D-centric
def test_dexpander_seed_variant() -> None:
    # 64 switches, 16 D-heavy: 48 × 32 + 16 × 24 = 1,920 GPUs = 240 nodes; expander links
    # (48 × 8 + 16 × 16) / 2 = 320; every switch uses 40 ports (32 + 8 or 24 + 16).
    t = load_topology("dexpander:switches=64,down=32,expander=8,dheavy=16,dheavy_down=24,dheavy_expander=16")
    assert (t.num_gpus, len(t.nodes), t.num_switches, t.num_links) == (1920, 240, 64, 1920 + 320)
    assert t.summary()["switch_ports"] == {"min": 40, "max": 40}
    heavy = t.params["dheavy_switches"]
    assert len(heavy) == 16 and heavy[:2] == ["s0", "s4"]
    expander_deg = {s: t.switch_degree(s) - (24 if s in heavy else 32) for s in t.switches}
    assert {expander_deg[s] for s in heavy} == {16} and set(expander_deg.values()) == {8, 16}
    roles = [t.node_attrs(n)["role_hint"] for n in t.nodes]
    assert roles.count("decode") == 16 * 24 // 8 == 48
    assert t.diameter_hops() == t.diameter_hops_bfs() >= 3
    assert t.paths("n0.g0", "n239.g7")[0].name == "base-0"
