"""Switch/link failures in the simulator (`kvlane.policy.sim.failure`) on small fabrics worked by hand: a failed
switch's links carry nothing, a pair whose every path crossed it is re-routed, a GPU that lost its only NIC is
relayed over NVLink (and then shares its sibling's NIC: half rate) or drained, and the policy never pairs a
drained engine."""

import pytest
from kvlane.policy.sim import CostModel, SimConfig, SimError, Simulator, make_policy, synchronized
from kvlane.policy.sim.failure import degrade, parse_failures
from kvlane.policy.topology import Topology, TopologyError, load_topology

COST = CostModel(prefill_tokens_per_s=10_000.0, prefill_overhead_s=0.0, decode_tokens_per_s=100.0,
                 kv_bytes_per_token=1000, decode_kv_bytes=1 << 40)


def leaf_spine() -> Topology:
    """Two leaves, two spines; P n0, n1 on leaf l0 and D n2, n3 on leaf l1 (one GPU each). Access links
    80 Gbps, leaf-spine links 8 Gbps (1e9 B/s), so a cross-leaf transfer is limited by one uplink."""
    t = Topology("leaf-spine")
    for s in ("l0", "l1", "s0", "s1"):
        t.add_switch(s)
    for i, role in enumerate(["prefill", "prefill", "decode", "decode"]):
        t.add_node(f"n{i}", 1, role_hint=role)
        t.add_port(f"n{i}.g0", "p0", "l0" if i < 2 else "l1", 80.0)
    for leaf in ("l0", "l1"):
        for spine in ("s0", "s1"):
            t.add_link(leaf, spine, 8.0)
    return t


def two_rail(nodes: int, roles: list[str]) -> Topology:
    """Rail fabric without a spine: every node has 2 GPUs, GPU r on rail switch r (8 Gbps = 1e9 B/s ports)."""
    t = Topology("two-rail")
    t.add_switch("r0")
    t.add_switch("r1")
    for m in range(nodes):
        gs = t.add_node(f"n{m}", 2, role_hint=roles[m])
        for r, g in enumerate(gs):
            t.add_port(g, "p0", f"r{r}", 8.0)
    return t


def used_cables(sim: Simulator) -> set[str]:
    return {key[0] for key, st in sim.network.links.items() if st.carried > 0}


@pytest.mark.parametrize("policy", ["kvlane", "fixed"])
def test_failed_spine_carries_nothing_and_the_survivor_is_shared(policy):
    # Spine s0 fails: both transfers (n0->n2, n1->n3, 5e6 B each, starting together) must cross l0->s1->l1;
    # they share the 1e9 B/s l0--s1 uplink max-min fairly: 0.5e9 B/s each -> 10 ms (5 ms alone).
    topo = degrade(leaf_spine(), ["s0"])
    assert set(topo.failure.links) == {"l0--s0", "l1--s0"}
    assert topo.down_gpus == frozenset()
    sim = Simulator(topo, make_policy(policy, topo), SimConfig(cost=COST))
    res = sim.run(synchronized(2, prompt_tokens=5_000, output_tokens=10))
    assert res.summary["completed"] == 2
    assert sorted(r.decode for r in sim.requests) == ["n2", "n3"]
    assert [r.kv_transfer_s for r in sim.requests] == [pytest.approx(0.01)] * 2
    cables = used_cables(sim)
    assert not cables & {"l0--s0", "l1--s0"}
    assert {"l0--s1", "l1--s1"} <= cables


def test_original_topology_is_untouched_and_unaffected_pairs_keep_their_paths():
    base = load_topology("zcube:n=4,k=2,gpus_per_node=1")
    deg = degrade(base, ["A0"])
    # GPUs 8 (A2,B0) and 15 (A3,B3): neither path crosses A0, so both candidates are kept as they were.
    assert deg.paths("n8.g0", "n15.g0") == base.paths("n8.g0", "n15.g0")
    # GPU 0 (A0,B0) -> GPU 15 (A3,B3): path1 leaves on p0 into A0 and is gone; path2 (B0 -> A3) survives
    # unchanged and stays first; the alternatives added for the lost diversity are B0 -> A_x -> B3 (3 switches,
    # x != 0), none touching A0.
    assert [p.name for p in base.paths("n0.g0", "n15.g0")] == ["zcube-path1", "zcube-path2"]
    got = deg.paths("n0.g0", "n15.g0")
    assert got[0] == next(p for p in base.paths("n0.g0", "n15.g0") if p.name == "zcube-path2")
    assert {p.switches for p in got[1:]} <= {("B0", f"A{x}", "B3") for x in (1, 2, 3)} and len(got) > 1
    assert all("A0" not in p.switches and p.src_nic == "n0.g0.p1" for p in got)
    assert "n0.g0.p0" in base.ports_of("n0.g0") and deg.ports_of("n0.g0") == ["n0.g0.p1"]


def test_pair_whose_every_path_crossed_the_failed_switch_is_rerouted():
    # ZCube(2,2): GPU x on A(x//2) and B(x%2). n0 (A0,B0) -> n1 (A0,B1): all three candidates cross A0
    # (path1 A0->B1, path2 B0->A0, zcube-a on A0). With A0 down the only way is p1: B0 -> A1 -> B1 -> n1.p1.
    base = load_topology("zcube:n=2,k=2,gpus_per_node=1")
    assert all("A0" in p.switches for p in base.paths("n0.g0", "n1.g0"))
    deg = degrade(base, ["A0"])
    (p,) = deg.paths("n0.g0", "n1.g0")  # ZCube(2,2) has a single other A switch: one route
    assert p.switches == ("B0", "A1", "B1") and p.hops == 3
    assert p.links == ("n0.g0.p1--B0", "A1--B0", "A1--B1", "n1.g0.p1--B1")
    # In the simulator (P n0 -> D n1, 200 Gbps everywhere = 25e9 B/s): 5e6 B in 0.2 ms on exactly those cables.
    cfg = SimConfig(cost=COST, pd_ratio=(1, 1))
    sim = Simulator(deg, make_policy("fixed", deg), cfg)
    sim.run(synchronized(1, prompt_tokens=5_000, output_tokens=10))
    (req,) = sim.requests
    assert (req.prefill, req.decode) == ("n0", "n1")
    assert req.kv_transfer_s == pytest.approx(5e6 / 25e9)
    assert used_cables(sim) == set(p.links)


def test_gpu_that_lost_its_only_nic_is_relayed_and_shares_the_sibling_nic():
    # P n0 and D n1, TP=2: rank r goes n0.g<r> -> rail r -> n1.g<r>. 5e6 B = 2.5e6 B per rank.
    # Healthy: each rank alone on its rail at 1e9 B/s -> 2.5 ms. Rail r0 down: both g0 relay over NVLink through
    # g1, so both ranks cross n0.g1.p0 -> r1 -> n1.g1.p0 and share it: 0.5e9 B/s each -> 5 ms.
    roles = ["prefill", "decode"]
    healthy = two_rail(2, roles)
    sim = Simulator(healthy, make_policy("kvlane", healthy), SimConfig(cost=COST))
    sim.run(synchronized(1, prompt_tokens=5_000, output_tokens=10))
    assert sim.requests[0].kv_transfer_s == pytest.approx(2.5e-3)
    deg = degrade(healthy, ["r0"])
    assert deg.failure.relayed == {"n0.g0": "n0.g1", "n1.g0": "n1.g1"}
    (p,) = deg.paths("n0.g0", "n1.g0")
    assert p.links == ("n0.g0--n0.g1", "n0.g1.p0--r1", "n1.g1.p0--r1", "n1.g0--n1.g1")
    sim = Simulator(deg, make_policy("kvlane", deg), SimConfig(cost=COST))
    res = sim.run(synchronized(1, prompt_tokens=5_000, output_tokens=10))
    assert res.summary["completed"] == 1
    assert sim.requests[0].kv_transfer_s == pytest.approx(5e-3)
    assert "n0.g0.p0--r0" not in used_cables(sim)


def test_drained_engines_are_never_paired():
    # roft 4 nodes x 2 rails, radix 4: nodes n0, n1 on leaves l0.r*, n2, n3 on l1.r*; roles P, D, P, D.
    # Leaf l0.r0 down without relay: n0.g0 and n1.g0 have no NIC, so engines n0 and n1 are out; every
    # request then runs n2 -> n3.
    topo = load_topology("roft:nodes=4,rails=2,radix=4")
    deg = degrade(topo, ["l0.r0"], relay="none")
    assert deg.down_gpus == {"n0.g0", "n1.g0"}
    cfg = SimConfig(cost=COST, pd_ratio=(1, 1))
    sim = Simulator(deg, make_policy("kvlane", deg), cfg)
    res = sim.run(synchronized(4, prompt_tokens=2_000, output_tokens=5))
    assert sim.down_engines == ["n0", "n1"]
    assert res.summary["engines_down"] == 2 and res.summary["completed"] == 4
    assert {(r.prefill, r.decode) for r in sim.requests} == {("n2", "n3")}
    # With the relay, nothing is drained and the policy may use all four engines.
    assert degrade(topo, ["l0.r0"]).down_gpus == frozenset()


def test_every_engine_drained_is_a_clear_error():
    deg = degrade(two_rail(2, ["prefill", "decode"]), ["r0"], relay="none")
    with pytest.raises(SimError, match="engines are down"):
        Simulator(deg, make_policy("kvlane", deg), SimConfig(cost=COST))


def test_gpus_cut_off_from_the_fabric_are_down():
    # leaf l1 hangs off the spine by one link; failing that link leaves n2 alone behind l1 (networkx: the
    # smaller component), while n0, n1 behind l0 stay up.
    t = Topology("stub")
    for s in ("l0", "l1", "s"):
        t.add_switch(s)
    for i in range(3):
        t.add_node(f"n{i}", 1)
        t.add_port(f"n{i}.g0", "p0", "l0" if i < 2 else "l1", 100.0)
    t.add_link("l0", "s", 100.0)
    cut = t.add_link("l1", "s", 100.0)
    deg = degrade(t, links=[cut])
    assert deg.down_gpus == {"n2.g0"}
    assert deg.paths("n0.g0", "n2.g0") == []
    assert [p.switches for p in deg.paths("n0.g0", "n1.g0")] == [("l0",)]


def test_bad_failures_are_refused_by_name():
    topo = leaf_spine()
    with pytest.raises(TopologyError, match="unknown switch 'x9'"):
        degrade(topo, ["x9"])
    with pytest.raises(TopologyError, match="unknown link"):
        degrade(topo, links=["l0--s7"])
    with pytest.raises(TopologyError, match="relay must be one of"):
        degrade(topo, ["s0"], relay="carrier-pigeon")  # type: ignore[arg-type]
    assert parse_failures(["switch:A0,link:A1--B2", "l0.r0"]) == (["A0", "l0.r0"], ["A1--B2"])
    with pytest.raises(TopologyError, match="expected switch:<id> or link:<id>"):
        parse_failures(["port:x"])
