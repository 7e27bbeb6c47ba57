"""Affinity tiles (seed §6): tile/flex counts of the seed's table and per-switch P/D balance."""

from __future__ import annotations

import pytest
from kvlane.policy.topology import Locality, Topology, TopologyError, load_topology, plan_tiles
from kvlane.policy.topology.placement import parse_ratio


@pytest.fixture(scope="module")
def cell() -> Topology:
    # the seed's 1024-GPU cell: ZCube(32,2) = 128 nodes of 8 GPUs, 32 A switches (4 nodes × 8 ports each)
    # and 32 B switches (one port from each of 32 nodes)
    return load_topology("zcube:n=32,k=2")


@pytest.mark.parametrize(("ratio", "tile", "tiles", "flex", "p", "d"), [
    ("3:2", None, 25, 3, 75, 50),      # 128 // 5 = 25 tiles, 128 - 125 = 3 flex → 75P + 50D + 3 flex
    ("5:3", None, 16, 0, 80, 48),      # 128 // 8 = 16, no flex → 80P / 48D (the §5 table's row)
    ("1:1", "4P+4D", 16, 0, 64, 64),   # balanced 4P+4D: 128 // 8 = 16
    ("4:4", None, 16, 0, 64, 64),      # the same tile written as a ratio
])
def test_seed_tile_table(cell: Topology, ratio: str, tile: str | None, tiles: int, flex: int, p: int, d: int
                         ) -> None:
    pl = plan_tiles(cell, nodes=128, ratio=ratio, tile=tile)
    info = pl.to_dict()
    assert (info["tiles"], info["flex"], info["prefill_nodes"], info["decode_nodes"]) == (tiles, flex, p, d)
    tp, td = pl.ratio
    assert all(len(t.prefill) == tp and len(t.decode) == td for t in pl.tiles)
    members = [n for t in pl.tiles for n in t.nodes] + pl.flex
    assert sorted(members) == sorted(cell.nodes)          # every node exactly once


def test_flex_nodes_spread_across_the_topology(cell: Topology) -> None:
    pl = plan_tiles(cell, ratio="3:2")
    # flex at ⌊(i + ½)·128/3⌋ = 21, 64, 106 → A switches 21//4, 64//4, 106//4 = 5, 16, 26 (all different)
    assert pl.flex == ["n21", "n64", "n106"]
    assert len({next(iter(sorted(cell.switches_of_node(n)))) for n in pl.flex}) == 3


def test_every_switch_within_one_node_of_the_global_ratio(cell: Topology) -> None:
    pl = plan_tiles(cell, ratio="3:2")
    assert pl.method == "flow"
    # Bound: with floor/ceil rounding a switch holding n planned nodes gets ⌊0.6·n⌋ or ⌈0.6·n⌉ prefill
    # nodes, so |P_ports − 0.6·ports| < one node's ports on it: < 8 on an A switch (8 ports per node),
    # < 1 on a B switch (1 port per node).
    assert len(pl.switches) == 64
    for s in pl.switches:
        per_node = 8 if s.switch.startswith("A") else 1
        assert abs(s.excess_ports) < per_node, s
    # B switches see 31 or 32 planned nodes: P fraction within 1/31 of 0.6
    assert max(s.deviation for s in pl.switches if s.switch.startswith("B")) < 1 / 31
    # A switches: 4 nodes → 2 or 3 P (0.5 / 0.75); 3 nodes (a flex one) → 1 or 2 P (1/3 / 2/3): dev ≤ 0.6 - 1/3
    assert pl.max_deviation <= 0.6 - 1 / 3 + 1e-9
    assert all(0 < s.p_fraction < 1 for s in pl.switches)


def test_no_p_zone_and_d_zone(cell: Topology) -> None:
    # the seed's "wrong approach" would put all P on one half of the A switches
    pl = plan_tiles(cell, ratio="3:2")
    first_half = [pl.roles[f"n{i}"] for i in range(64)]
    assert 0.5 < first_half.count("prefill") / (64 - first_half.count("flex")) < 0.7


def test_apply_sets_tiles_and_locality(cell: Topology) -> None:
    t = load_topology("zcube:n=32,k=2")
    pl = plan_tiles(t, ratio="3:2")
    pl.apply(t)
    tile0 = pl.tiles[0]
    a, b = tile0.prefill[0], tile0.decode[0]
    assert t.locality(f"{a}.g0", f"{b}.g3") is Locality.SAME_TILE
    assert t.node_attrs(a)["role_hint"] == "prefill" and t.node_attrs(b)["role_hint"] == "decode"
    assert t.node_attrs(pl.flex[0]) == {"tile": None, "cell": 0, "role_hint": "flex"}
    other = next(tl for tl in pl.tiles[1:] if t.tiles_adjacent(tile0.id, tl.id))
    assert t.locality(f"{a}.g0", f"{other.decode[0]}.g0") is Locality.ADJACENT_TILE
    assert t.locality(f"{a}.g0", f"{pl.flex[0]}.g0") is Locality.SAME_CELL
    assert t.summary()["tiles"] == 25


def test_tiles_are_neighbours_in_node_order(cell: Topology) -> None:
    pl = plan_tiles(cell, ratio="3:2")
    # each tile's members come from a short run of consecutive nodes (5 members among ≤ 9 nodes)
    for t in pl.tiles:
        idx = sorted(int(n[1:]) for n in t.nodes)
        assert idx[-1] - idx[0] <= 9, t


def test_16k_cell_plan() -> None:
    t = load_topology("zcube:n=128,k=2")
    pl = plan_tiles(t, ratio="3:2")
    # 2048 // 5 = 409 tiles, 2048 - 2045 = 3 flex → 1227P + 818D
    assert (len(pl.tiles), len(pl.flex)) == (409, 3)
    assert all(abs(s.excess_ports) < (8 if s.switch[0] == "A" else 1) for s in pl.switches)


def test_bad_ratios() -> None:
    assert parse_ratio("3:2") == (3, 2) and parse_ratio("1:1", "4P+4D") == (4, 4)
    for bad in ("3", "3:0", "a:b", "-1:2"):
        with pytest.raises(TopologyError, match="ratio must look like P:D"):
            parse_ratio(bad)
    with pytest.raises(TopologyError, match="does not have the ratio"):
        parse_ratio("3:2", "4P+4D")
    with pytest.raises(TopologyError, match="cannot hold one tile"):
        plan_tiles(load_topology("loopback:gpus=2"), ratio="3:2")
    with pytest.raises(TopologyError, match="nodes must be between 1 and the topology's 128 nodes"):
        plan_tiles(load_topology("zcube:n=32,k=2"), nodes=200)


def test_greedy_fallback_for_three_port_fabrics() -> None:
    # ZCube(4,3): a node (2 GPUs) touches switches of 3 layers → not a rows × columns structure
    t = load_topology("zcube:n=4,k=3,gpus_per_node=2")    # 64 GPUs, 32 nodes
    pl = plan_tiles(t, ratio="3:2")
    assert pl.method == "greedy"
    assert (len(pl.tiles), len(pl.flex)) == (6, 2)        # 32 // 5 = 6, 32 - 30 = 2
    assert sum(r == "prefill" for r in pl.roles.values()) == 18


def test_tiles_spec_parameter_applies_a_placement() -> None:
    t = load_topology("zcube:n=32,k=2,tiles=3:2")
    assert t.summary()["tiles"] == 25 and t.params["tiles"] == "3:2"
    roles = [t.node_attrs(n)["role_hint"] for n in t.nodes]
    assert (roles.count("prefill"), roles.count("decode"), roles.count("flex")) == (75, 50, 3)
    with pytest.raises(TopologyError, match="ratio must look like P:D"):
        load_topology("zcube:n=32,k=2,tiles=three")
