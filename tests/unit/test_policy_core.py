"""The `Policy` facade on real topology generators: what a router, a connector or an operator notices."""

from __future__ import annotations

import json

import msgpack
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from kvlane.policy.config import CreditConfig, PolicyConfig, SelectionConfig, SessionConfig
from kvlane.policy.core import Policy, rank_map
from kvlane.policy.topology import load_topology
from kvlane.policy.types import (
    EngineInfo,
    InvalidRequest,
    LeaseDenied,
    LeaseGrant,
    LeaseRequest,
    LoadReport,
    NoPairAvailable,
    PairRequest,
    RankOutcome,
    Role,
    TransferOutcome,
    UnknownEngine,
)

GB = 10**9


def loopback_policy(config: PolicyConfig | None = None, decodes: int = 2) -> Policy:
    """loopback:gpus=4: P0 on g0, (P1 on g1 when decodes < 3), D0.. on the next GPUs; TP=1, one node."""
    pol = Policy(load_topology("loopback:gpus=4"), config)
    pol.register_engine(EngineInfo(engine_id="P0", role=Role.PREFILL, gpus=["n0.g0"]), 0.0)
    for i in range(decodes):
        pol.register_engine(EngineInfo(engine_id=f"D{i}", role=Role.DECODE, gpus=[f"n0.g{i + 1}"]), 0.0)
    return pol


def zcube_policy(config: PolicyConfig | None = None) -> Policy:
    """zcube:n=8,k=2 (64 GPUs, 8 nodes of 8): one TP=8 engine per node; tiles of two nodes (n0,n1), (n2,n3),
    ...; even nodes prefill, odd nodes decode. Every pair of ZCube nodes shares B switches, so all other
    tiles are adjacent tiles."""
    topo = load_topology("zcube:n=8,k=2")
    for i, node in enumerate(topo.nodes):
        topo.set_node_attrs(node, tile=i // 2)
    pol = Policy(topo, config)
    for i, node in enumerate(topo.nodes):
        pol.register_engine(EngineInfo(engine_id=node.upper(), role=Role.DECODE if i % 2 else Role.PREFILL,
                                       gpus=topo.gpus_of(node), kv_bytes_per_token=89_856), 0.0)
    return pol


def zero_loads(pol: Policy, now: float = 0.0) -> None:
    for e in pol.engines():
        pol.report_load(LoadReport(engine_id=e.engine_id), now)


def lease(pol: Policy, tid: str, p: str, d: str, nbytes: int = GB, now: float = 0.0, **kw):
    return pol.acquire_lease(LeaseRequest(transfer_id=tid, prefill=p, decode=d, bytes=nbytes, **kw), now)


# ---- credits through the facade -------------------------------------------------------------------------


def test_fourth_large_stream_to_one_decode_is_denied_then_granted_after_release():
    pol = loopback_policy()
    grants = [lease(pol, f"t{i}", "P0", "D0") for i in range(3)]
    assert all(isinstance(g, LeaseGrant) and g.klass == "reserved" for g in grants)
    denied = lease(pol, "t3", "P0", "D0", now=0.01)
    assert isinstance(denied, LeaseDenied)
    assert denied.reason == "decode D0 has 3/3 large KV streams in flight"
    assert denied.retry_after > 0
    assert isinstance(lease(pol, "t4", "P0", "D1", now=0.01), LeaseGrant)  # another D is not affected
    assert pol.release_lease(grants[0].lease_id, None, 0.02) is True
    again = lease(pol, "t3", "P0", "D0", now=0.02)
    assert isinstance(again, LeaseGrant)
    snap = pol.snapshot(0.02)
    assert snap["credits"]["decode"]["D0"]["streams"] == 3
    assert snap["counters"]["denials"] == 1


def test_release_is_idempotent_and_expired_lease_is_refused():
    pol = loopback_policy(PolicyConfig(credits=CreditConfig(lease_ttl_s=5.0, lease_ttl_floor_gbps=8.0)))
    g = lease(pol, "t0", "P0", "D0")
    assert g.expires_at == pytest.approx(5.0 + 1.0)  # 5 s slack + 8e9 bits at the 8 Gbps floor
    assert pol.release_lease(g.lease_id, None, 1.0) is True
    assert pol.release_lease(g.lease_id, None, 1.0) is False
    assert pol.release_lease("L-999", None, 1.0) is False
    g2 = lease(pol, "t1", "P0", "D0", now=2.0)
    assert pol.expire(7.9) == []
    assert pol.expire(8.0) == [g2.lease_id]
    assert pol.release_lease(g2.lease_id, None, 8.0) is False
    assert pol.snapshot(8.0)["leases"] == []


def test_small_transfers_go_best_effort_without_stream_credit():
    pol = loopback_policy()
    for i in range(3):
        assert isinstance(lease(pol, f"big{i}", "P0", "D0"), LeaseGrant)
    small = lease(pol, "small", "P0", "D0", nbytes=1 << 20)
    assert isinstance(small, LeaseGrant) and small.klass == "best_effort"
    # Not allowed best-effort: the same small transfer needs a stream credit, and there is none.
    strict = lease(pol, "small2", "P0", "D0", nbytes=1 << 20, best_effort_ok=False)
    assert isinstance(strict, LeaseDenied) and "3/3 large KV streams" in strict.reason


def test_retrying_a_transfer_returns_the_same_grant():
    pol = loopback_policy()
    g = lease(pol, "t0", "P0", "D0")
    assert lease(pol, "t0", "P0", "D0", now=0.5) == g
    with pytest.raises(InvalidRequest, match="already holds lease"):
        lease(pol, "t0", "P0", "D1")


def test_tp_mismatch_refused_with_clear_message():
    pol = Policy(load_topology("loopback:gpus=4"))
    pol.register_engine(EngineInfo(engine_id="P", role=Role.PREFILL, gpus=["n0.g0", "n0.g1"]), 0.0)
    pol.register_engine(EngineInfo(engine_id="D", role=Role.DECODE, gpus=["n0.g2"]), 0.0)
    with pytest.raises(InvalidRequest) as err:
        lease(pol, "t", "P", "D")
    assert str(err.value).startswith("TP size mismatch: prefill P has TP=2, decode D has TP=1")
    assert "heterogeneous_tp" in str(err.value)
    # select_pair never proposes such a pair.
    with pytest.raises(NoPairAvailable, match="matching TP size"):
        pol.select_pair(PairRequest(request_id="r"), 0.0)


def test_heterogeneous_tp_maps_ranks_when_enabled():
    assert rank_map(2, 4) == [(0, 0), (0, 1), (1, 2), (1, 3)]
    assert rank_map(4, 2) == [(0, 0), (1, 0), (2, 1), (3, 1)]
    with pytest.raises(InvalidRequest, match="neither is a multiple"):
        rank_map(2, 3)
    topo = load_topology("zcube:n=8,k=2")
    pol = Policy(topo, PolicyConfig(selection=SelectionConfig(heterogeneous_tp=True)))
    pol.register_engine(EngineInfo(engine_id="P", role=Role.PREFILL, gpus=["n0.g0", "n0.g1"]), 0.0)
    pol.register_engine(EngineInfo(engine_id="D", role=Role.DECODE, gpus=[f"n5.g{i}" for i in range(4)]), 0.0)
    g = lease(pol, "t", "P", "D", nbytes=4 * GB)
    assert isinstance(g, LeaseGrant)
    # One stream per D rank j, from P rank j // 2.
    assert [(x.rank, x.src_nic.rsplit(".", 1)[0], x.dst_nic.rsplit(".", 1)[0]) for x in g.paths] == [
        (0, "n0.g0", "n5.g0"), (1, "n0.g0", "n5.g1"), (2, "n0.g1", "n5.g2"), (3, "n0.g1", "n5.g3")]
    assert pol.select_pair(PairRequest(request_id="r"), 0.0).decode == "D"


def test_zcube_ranks_split_over_two_paths_rank_i_to_rank_i():
    pol = zcube_policy()
    g = lease(pol, "t", "N0", "N3", nbytes=8 * GB)
    assert isinstance(g, LeaseGrant) and len(g.paths) == 8
    for x in g.paths:  # rank i → rank i
        assert x.src_nic.startswith(f"n0.g{x.rank}.") and x.dst_nic.startswith(f"n3.g{x.rank}.")
    # Rank i of every node shares switch B_i, so rank i -> rank i has three candidates: 'zcube-b' (1 hop) and
    # the two 2-hop ZCube paths. Even ranks take the best, odd ranks the second (ties: the topology's order).
    assert {x.path for x in g.paths if x.rank % 2 == 0} == {"zcube-b"}
    assert {x.path for x in g.paths if x.rank % 2 == 1} == {"zcube-path1"}
    links = pol.snapshot(0.0)["credits"]["links"]
    # 1 GB per rank over the 0.5 s target = 16 Gbps reserved on every link of every rank's path.
    assert links and all(v["reserved_gbps"] == pytest.approx(16.0) for k, v in links.items() if "--" in k and
                          k.startswith("n0."))


def test_the_less_loaded_path_goes_first():
    pol = zcube_policy(PolicyConfig(credits=CreditConfig(max_streams=8)))
    # Load rank 0's 'zcube-b' links (N0 g0 <-> B0) with another transfer from N0 to N5 (64 Gbps per rank).
    busy = lease(pol, "busy", "N0", "N5", nbytes=32 * GB)
    assert busy.paths[0].path == "zcube-b" and "n0.g0.p1--B0" in busy.paths[0].links
    g = lease(pol, "t", "N0", "N3", nbytes=8 * GB)
    # 'zcube-b' of rank 0 shares the loaded NIC link: now 'zcube-path1' is better and takes the even ranks.
    assert g.paths[0].path == "zcube-path1"
    assert {x.path for x in g.paths if x.rank % 2 == 1} == {"zcube-b"}


def test_holder_death_frees_its_leases():
    pol = loopback_policy()
    g = lease(pol, "t0", "P0", "D0")
    pol.remove_engine("P0", 1.0)
    assert pol.release_lease(g.lease_id, None, 1.0) is False
    assert pol.snapshot(1.0)["credits"] == {"decode": {}, "links": {}}
    with pytest.raises(UnknownEngine):
        pol.engine("P0")


# ---- pair selection ---------------------------------------------------------------------------------------


def test_breakdown_sums_to_score_and_only_the_nearest_tier_is_scored():
    pol = zcube_policy()  # tiles: (N0 P, N1 D), (N2 P, N3 D), ...
    d = pol.select_pair(PairRequest(request_id="r0", prompt_tokens=32_768), 0.0)
    assert d.score == pytest.approx(sum(d.breakdown.values()))
    assert set(d.breakdown) == {"qp", "qd", "tkv", "hpath", "md", "acache"}
    assert d.locality == "same_tile"
    assert int(d.decode[1:]) == int(d.prefill[1:]) + 1  # its tile's D
    # The 2 shortlisted (least-loaded) P engines × their one same-tile D: nothing else was scored.
    assert d.candidates_scored == 2


def test_falls_to_adjacent_tile_when_own_tile_decode_has_no_credit():
    pol = zcube_policy(PolicyConfig(selection=SelectionConfig(prefill_shortlist=1)))
    for i in range(3):  # N1 (tile of N0) takes 3 large streams: no credit left
        lease(pol, f"t{i}", "N2", "N1")
    d = pol.select_pair(PairRequest(request_id="r", prompt_tokens=1000), 0.0)
    assert (d.prefill, d.locality) == ("N0", "adjacent_tile") and d.decode != "N1"


def test_leaf_mate_with_a_faster_path_competes_with_the_same_tile_decode():
    # fattree k=4, 4:1: n0 and n1 hang off edge switch 0, n2 and n3 off edge switch 1 (100G host ports,
    # 25G uplinks). Tile 0 = {n0 P, n2 D}, tile 1 = {n1 D, n3}: P's same-tile D sits behind the uplinks.
    topo = load_topology("fattree:k=4,oversub=4,gpus_per_node=1")
    for node, tile in [("n0", 0), ("n2", 0), ("n1", 1), ("n3", 1)]:
        topo.set_node_attrs(node, tile=tile)
    pol = Policy(topo)
    for eid, role, gpu in [("P", Role.PREFILL, "n0.g0"), ("Dtile", Role.DECODE, "n2.g0"),
                           ("Dleaf", Role.DECODE, "n1.g0")]:
        pol.register_engine(EngineInfo(engine_id=eid, role=role, gpus=[gpu]), 0.0)
    req = PairRequest(request_id="r", kv_bytes=2_500_000_000)  # 20 Gbit: 0.2 s at 100G, 0.8 s at 25G
    d = pol.select_pair(req, 0.0)
    assert (d.decode, d.locality, d.candidates_scored) == ("Dleaf", "adjacent_tile", 2)
    assert d.breakdown["tkv"] == pytest.approx(10 * 0.2) and d.breakdown["hpath"] == pytest.approx(0.25)
    # The score decides, not a rule: 7 queued requests (+7) outweigh the 0.6 s (+6) and 2 hops (+0.5) saved.
    pol.report_load(LoadReport(engine_id="Dleaf", queue_depth=7), 0.0)
    zero = [pol.report_load(LoadReport(engine_id=e), 0.0) for e in ("P", "Dtile")]
    assert len(zero) == 2
    d = pol.select_pair(PairRequest(request_id="r2", kv_bytes=2_500_000_000), 0.0)
    assert (d.decode, d.locality) == ("Dtile", "same_tile")
    assert d.breakdown["tkv"] == pytest.approx(10 * 0.8) and d.breakdown["hpath"] == pytest.approx(0.75)


def test_a_prefill_engine_busy_with_a_prefill_counts_as_loaded():
    pol = zcube_policy(PolicyConfig(selection=SelectionConfig(prefill_shortlist=1)))
    zero_loads(pol)
    d = pol.select_pair(PairRequest(request_id="r0", prompt_tokens=1000), 0.0)
    assert d.prefill == "N0"  # all idle: the first registered
    zero_loads(pol)
    # N0 reports an empty queue but one prefill running: an idle P goes first, and Qp counts the running one.
    pol.report_load(LoadReport(engine_id="N0", queue_depth=0, running=1), 0.0)
    d = pol.select_pair(PairRequest(request_id="r1", prompt_tokens=1000), 0.0)
    assert d.prefill == "N2" and d.breakdown["qp"] == 0.0
    for e in ("N2", "N4", "N6"):
        pol.report_load(LoadReport(engine_id=e, queue_depth=1), 0.0)
    d = pol.select_pair(PairRequest(request_id="r2", prompt_tokens=1000), 0.0)
    # Everyone has 1 (N0: its running prefill); ties go to the least recently picked, never-picked N4 first.
    assert d.prefill == "N4" and d.breakdown["qp"] == 1.0


def test_measured_slow_path_changes_the_chosen_pair():
    pol = loopback_policy()
    req = PairRequest(request_id="r", kv_bytes=GB)
    first = pol.select_pair(req, 0.0)
    assert first.decode == "D0"  # tie: registration order
    zero_loads(pol)
    g = lease(pol, "t", "P0", "D0")
    assert [x.path for x in g.paths] == ["shm"]
    # The shm path to D0 crawls: 1 GB in 2 s = 4 Gbps (static says 100).
    pol.release_lease(g.lease_id, TransferOutcome(
        lease_id=g.lease_id, ok=True, bytes=GB, seconds=2.0,
        ranks=[RankOutcome(rank=0, path="shm", bytes=GB, seconds=2.0, ok=True)]), 2.0)
    again = pol.select_pair(req, 2.0)
    assert again.decode == "D1"
    assert again.breakdown["tkv"] == pytest.approx(10 * 8 / 100)  # D1 over shm at static 100 Gbps
    # D0 is now predicted over tcp (25 Gbps beats the measured 4): 0.32 s, worse than D1's 0.08 s.
    hot = pol.snapshot(2.0)["hottest"]["paths_by_slowdown"]
    assert hot[0]["path"] == "shm" and hot[0]["slowdown"] == pytest.approx(25.0)


def test_assignments_spread_load_between_reports():
    pol = loopback_policy()
    picks = [pol.select_pair(PairRequest(request_id=f"r{i}"), 0.0).decode for i in range(4)]
    assert picks == ["D0", "D1", "D0", "D1"]


def test_no_pair_reasons():
    pol = Policy(load_topology("loopback:gpus=4"))
    with pytest.raises(NoPairAvailable, match="no prefill engine registered"):
        pol.select_pair(PairRequest(request_id="r"), 0.0)
    pol.register_engine(EngineInfo(engine_id="P", role=Role.PREFILL, gpus=["n0.g0"]), 0.0)
    with pytest.raises(NoPairAvailable, match="no decode engine registered"):
        pol.select_pair(PairRequest(request_id="r"), 0.0)
    pol.register_engine(EngineInfo(engine_id="D", role=Role.DECODE, gpus=["n0.g1"]), 0.0)
    pol.report_load(LoadReport(engine_id="D", memory_pressure=0.99), 0.0)
    with pytest.raises(NoPairAvailable, match="none of 1 decode engines is admissible"):
        pol.select_pair(PairRequest(request_id="r"), 0.0)


def test_register_validation():
    pol = loopback_policy()
    with pytest.raises(InvalidRequest, match="GPU 'n9.g0' is not in the topology"):
        pol.register_engine(EngineInfo(engine_id="X", role=Role.DECODE, gpus=["n9.g0"]), 0.0)
    with pytest.raises(InvalidRequest, match="already belongs to engine P0"):
        pol.register_engine(EngineInfo(engine_id="X", role=Role.DECODE, gpus=["n0.g0"]), 0.0)
    with pytest.raises(UnknownEngine, match="'nope'"):
        pol.report_load(LoadReport(engine_id="nope"), 0.0)


# ---- sessions ----------------------------------------------------------------------------------------------


def test_sticky_session_returns_home_and_reverse_selects_p():
    pol = zcube_policy()
    first = pol.select_pair(PairRequest(request_id="r0", session_id="s", prompt_tokens=1000), 0.0)
    assert not first.sticky and first.home_moved_from is None
    for i in range(1, 5):
        pol.report_load(LoadReport(engine_id=first.decode, queue_depth=5), float(i))  # busier than others
        d = pol.select_pair(PairRequest(request_id=f"r{i}", session_id="s", prompt_tokens=1000,
                                        expected_cache_hit=0.9), float(i))
        assert (d.decode, d.sticky, d.locality, d.home_moved_from) == (first.decode, True, "sticky", None)
        assert d.breakdown["acache"] == pytest.approx(-2 * 0.9)
    # P is reverse-selected from the home's own tile first.
    home_tile = pol.snapshot(5.0)["engines"]
    tile_of = {e["engine_id"]: e["tile"] for e in home_tile}
    assert tile_of[d.prefill] == tile_of[first.decode]


def test_home_move_is_reported_when_home_is_removed():
    pol = zcube_policy()
    first = pol.select_pair(PairRequest(request_id="r0", session_id="s"), 0.0)
    pol.remove_engine(first.decode, 1.0)
    d = pol.select_pair(PairRequest(request_id="r1", session_id="s"), 2.0)
    assert d.home_moved_from == first.decode and d.decode != first.decode and not d.sticky
    d2 = pol.select_pair(PairRequest(request_id="r2", session_id="s"), 3.0)
    assert d2.sticky and d2.decode == d.decode and d2.home_moved_from is None


def test_home_moves_when_overloaded_and_says_so():
    pol = zcube_policy(PolicyConfig(sessions=SessionConfig(move_memory_pressure=0.9)))
    first = pol.select_pair(PairRequest(request_id="r0", session_id="s"), 0.0)
    pol.report_load(LoadReport(engine_id=first.decode, memory_pressure=0.89), 1.0)
    assert pol.select_pair(PairRequest(request_id="r1", session_id="s"), 1.0).decode == first.decode
    pol.report_load(LoadReport(engine_id=first.decode, memory_pressure=0.92), 2.0)
    moved = pol.select_pair(PairRequest(request_id="r2", session_id="s"), 2.0)
    assert moved.home_moved_from == first.decode and moved.decode != first.decode
    assert pol.snapshot(2.0)["counters"]["home_moves"] == 1


def test_idle_sessions_are_forgotten():
    pol = loopback_policy(PolicyConfig(sessions=SessionConfig(idle_ttl_s=10.0)))
    pol.select_pair(PairRequest(request_id="r0", session_id="s"), 0.0)
    assert pol.snapshot(0.0)["sessions"] == 1
    pol.expire(11.0)
    assert pol.snapshot(11.0)["sessions"] == 0


# ---- snapshot --------------------------------------------------------------------------------------------


def test_snapshot_is_json_and_msgpack_safe():
    pol = zcube_policy()
    d = pol.select_pair(PairRequest(request_id="r0", prompt_tokens=1000), 0.0)
    g = lease(pol, "t", d.prefill, d.decode, nbytes=8 * GB)
    pol.release_lease(g.lease_id, TransferOutcome(lease_id=g.lease_id, ok=False, bytes=0, seconds=0.1,
                                                  error="peer reset"), 0.5)
    lease(pol, "t2", d.prefill, d.decode)
    snap = pol.snapshot(1.0)
    assert json.loads(json.dumps(snap)) == snap
    assert msgpack.unpackb(msgpack.packb(snap), strict_map_key=False) == snap
    assert len(snap["engines"]) == 8 and len(snap["leases"]) == 1 and snap["sessions"] == 0
    assert all(p["failures"] == 1 for p in snap["paths"])
    assert snap["paths"] and pol.snapshot(1.0, max_paths=0)["paths"] == []


def test_cross_cell_is_the_last_resort():
    # Dragonfly groups are cells: n0..n3 in group 0, n4..n7 in group 1.
    pol = Policy(load_topology("dragonfly:routers=2,hosts=2,global=1"))
    for eid, role, gpu in [("P", Role.PREFILL, "n0.g0"), ("Dnear", Role.DECODE, "n2.g0"),
                           ("Dfar", Role.DECODE, "n4.g0")]:
        pol.register_engine(EngineInfo(engine_id=eid, role=role, gpus=[gpu]), 0.0)
    pol.report_load(LoadReport(engine_id="Dnear", queue_depth=20), 0.0)  # busy, but in the cell
    d = pol.select_pair(PairRequest(request_id="r0"), 0.0)
    assert (d.decode, d.locality) == ("Dnear", "same_cell")
    for i in range(3):  # no stream credit left in the cell: overflow across cells
        assert isinstance(lease(pol, f"t{i}", "P", "Dnear", nbytes=100_000_000), LeaseGrant)
    d = pol.select_pair(PairRequest(request_id="r1"), 0.0)
    assert (d.decode, d.locality) == ("Dfar", "cross_cell")
    # Nobody has a credit: the nearest admissible D is still chosen (the lease will wait, not the pair).
    for i in range(3):
        assert isinstance(lease(pol, f"u{i}", "P", "Dfar", nbytes=100_000_000), LeaseGrant)
    d = pol.select_pair(PairRequest(request_id="r2"), 0.0)
    assert (d.decode, d.locality) == ("Dnear", "same_cell")


class PolicyMachine(RuleBasedStateMachine):
    """Any interleaving of pair selection, leases, releases (twice), expiry and engine death through the
    facade: credits never exceed capacity and every lease ends."""

    def __init__(self):
        super().__init__()
        self.cfg = PolicyConfig(credits=CreditConfig(max_streams=2, ingress_bytes=6 * GB, lease_ttl_s=1.0,
                                                     best_effort_max_bytes=1 << 20))
        self.pol = zcube_policy(self.cfg)
        self.now = 0.0
        self.n = 0
        self.grants: list[str] = []
        self.released: set[str] = set()

    def alive(self, role: Role) -> list[str]:
        return sorted(e.engine_id for e in self.pol.engines() if e.role == role)

    @rule(data=st.data(), nbytes=st.sampled_from([1000, 2 * GB, 5 * GB]))
    def pair_and_lease(self, data, nbytes):
        self.n += 1
        try:
            d = self.pol.select_pair(PairRequest(request_id=f"r{self.n}", session_id=data.draw(
                st.sampled_from([None, "s1", "s2"])), kv_bytes=nbytes), self.now)
        except NoPairAvailable:
            assert not self.alive(Role.PREFILL) or not self.alive(Role.DECODE)
            return
        g = self.pol.acquire_lease(LeaseRequest(transfer_id=f"t{self.n}", prefill=d.prefill, decode=d.decode,
                                                bytes=nbytes), self.now)
        if isinstance(g, LeaseGrant):
            assert g.expires_at > self.now and len(g.paths) == 8
            self.grants.append(g.lease_id)
        else:
            assert g.reason and g.retry_after > 0

    @rule(data=st.data(), twice=st.booleans())
    def release(self, data, twice):
        if not self.grants:
            return
        lid = data.draw(st.sampled_from(self.grants))
        first = self.pol.release_lease(lid, None, self.now)
        if lid in self.released:
            assert first is False
        if first:
            self.released.add(lid)
        if twice:
            assert self.pol.release_lease(lid, None, self.now) is False
            self.released.add(lid)

    @rule(dt=st.floats(0.0, 2.0))
    def advance(self, dt):
        self.now += dt
        self.pol.expire(self.now)

    @rule(data=st.data())
    def engine_dies(self, data):
        ids = [e.engine_id for e in self.pol.engines()]
        if len(ids) > 2:
            self.pol.remove_engine(data.draw(st.sampled_from(ids)), self.now)

    @invariant()
    def within_capacity(self):
        snap = self.pol.snapshot(self.now)
        for use in snap["credits"]["decode"].values():
            assert use["streams"] <= 2
            assert use["streams"] <= 1 or use["bytes"] <= 6 * GB
        led = self.pol.ledger
        for link, v in snap["credits"]["links"].items():
            assert v["reserved_gbps"] <= led.link_capacity(link) + 1e-6
        alive = {e.engine_id for e in self.pol.engines()}
        assert all(x["prefill"] in alive and x["decode"] in alive for x in snap["leases"])

    def teardown(self):
        self.pol.expire(self.now + 100.0)
        snap = self.pol.snapshot(self.now + 100.0)
        assert snap["leases"] == [] and snap["credits"] == {"decode": {}, "links": {}}


TestPolicyMachine = PolicyMachine.TestCase
TestPolicyMachine.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)


def test_mixed_tp_pools_pair_within_their_tp_size():
    pol = Policy(load_topology("loopback:gpus=8"))
    pol.register_engine(EngineInfo(engine_id="P1a", role=Role.PREFILL, gpus=["n0.g0"]), 0.0)
    pol.register_engine(EngineInfo(engine_id="P1b", role=Role.PREFILL, gpus=["n0.g1"]), 0.0)
    pol.register_engine(EngineInfo(engine_id="P2", role=Role.PREFILL, gpus=["n0.g2", "n0.g3"]), 0.0)
    pol.register_engine(EngineInfo(engine_id="D2", role=Role.DECODE, gpus=["n0.g4", "n0.g5"]), 0.0)
    pol.report_load(LoadReport(engine_id="P2", queue_depth=9), 0.0)  # busier than both TP=1 engines
    # The TP=1 prefill engines are less loaded, but only P2 matches D2's TP size.
    d = pol.select_pair(PairRequest(request_id="r"), 0.0)
    assert (d.prefill, d.decode) == ("P2", "D2")


def test_assignments_count_until_reported_leased_or_stale():
    pol = loopback_policy()

    def pending() -> dict[str, int]:
        return {e["engine_id"]: e["pending"] for e in pol.snapshot(0.0)["engines"]}

    for i in range(3):
        pol.select_pair(PairRequest(request_id=f"r{i}"), 0.0)
    assert pending() == {"P0": 3, "D0": 2, "D1": 1}
    g = lease(pol, "t", "P0", "D0")  # P0 finished one prefill
    assert pending()["P0"] == 2
    pol.release_lease(g.lease_id, None, 0.1)  # D0 received it
    assert pending()["D0"] == 1
    pol.report_load(LoadReport(engine_id="D1", queue_depth=4), 0.2)
    assert pending()["D1"] == 0
    # No report for longer than pending_ttl_s (5 s): old assignments are forgotten, not counted forever.
    d = pol.select_pair(PairRequest(request_id="r9"), 6.0)
    assert pending() == {"P0": 1, "D0": 1 if d.decode == "D0" else 0, "D1": 1 if d.decode == "D1" else 0}
    assert d.breakdown["qp"] == 0.0


def test_grants_carry_parallel_link_ids():
    # Rail-Fabric wires some switch pairs with parallel cables ("s3--s29#2"); grants must carry those ids.
    topo = load_topology("railfabric")
    pol = Policy(topo)
    pol.register_engine(EngineInfo(engine_id="P", role=Role.PREFILL, gpus=topo.gpus_of("n124")), 0.0)
    pol.register_engine(EngineInfo(engine_id="D", role=Role.DECODE, gpus=topo.gpus_of("n119")), 0.0)
    g = lease(pol, "t", "P", "D", nbytes=8 * GB)
    assert isinstance(g, LeaseGrant)
    assert LeaseGrant.from_msgpack(g.to_msgpack()) == g
    assert any("#" in link for x in g.paths for link in x.links)


def test_outcome_on_another_candidate_path_updates_that_path():
    pol = loopback_policy()
    g = lease(pol, "t", "P0", "D0")
    assert g.paths[0].path == "shm"
    # The transport fell back to tcp for rank 0 and it failed: tcp's estimate moves, shm's does not.
    pol.release_lease(g.lease_id, TransferOutcome(lease_id=g.lease_id, ok=False, bytes=0, seconds=1.0,
                                                  ranks=[RankOutcome(rank=0, path="tcp", bytes=0, seconds=1.0,
                                                                     ok=False)]), 1.0)
    paths = {p["path"]: p for p in pol.snapshot(1.0)["paths"]}
    assert set(paths) == {"tcp"} and paths["tcp"]["failures"] == 1
    assert paths["tcp"]["gbps"] == pytest.approx(25 * (0.7 + 0.3 * 0.5))  # EWMA with a half-speed sample
    with pytest.raises(InvalidRequest, match="outcome is for lease"):
        pol.release_lease("L-1", TransferOutcome(lease_id="L-2", ok=True, bytes=0, seconds=0.0), 1.0)


def test_engines_of_different_kinds_never_pair():
    """A pool mixing vLLM engines (no `engine` endpoint) with SGLang ones: every pair the policy proposes is of
    one kind, and a lease across kinds is refused with both kinds named."""
    pol = Policy(load_topology("loopback:gpus=4"))
    sg = {"engine": "sglang"}
    pol.register_engine(EngineInfo(engine_id="vP", role=Role.PREFILL, gpus=["n0.g0"]), 0.0)
    pol.register_engine(EngineInfo(engine_id="sP", role=Role.PREFILL, gpus=["n0.g1"], endpoints=sg), 0.0)
    pol.register_engine(EngineInfo(engine_id="vD", role=Role.DECODE, gpus=["n0.g2"]), 0.0)
    pol.register_engine(EngineInfo(engine_id="sD", role=Role.DECODE, gpus=["n0.g3"], endpoints=sg), 0.0)
    kinds = {"vP": "", "vD": "", "sP": "sglang", "sD": "sglang"}
    seen = set()
    for i in range(40):
        dec = pol.select_pair(PairRequest(request_id=f"r{i}"), float(i))
        assert kinds[dec.prefill] == kinds[dec.decode], dec
        seen.add((dec.prefill, dec.decode))
    assert seen == {("vP", "vD"), ("sP", "sD")}  # both pools are used
    with pytest.raises(InvalidRequest, match="'sglang' engine, decode vD a 'unnamed' one"):
        lease(pol, "t-x", "sP", "vD")
    assert isinstance(lease(pol, "t-ok", "sP", "sD"), LeaseGrant)
    # SGLang's decode full: its prefill is not offered vLLM's decode; only the vLLM pair is left.
    pol.report_load(LoadReport(engine_id="sD", queue_depth=10**6), 50.0)
    for i in range(20):
        dec = pol.select_pair(PairRequest(request_id=f"s{i}"), 60.0 + i)
        assert (dec.prefill, dec.decode) == ("vP", "vD"), dec
