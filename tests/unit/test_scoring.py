"""Pair scoring on a real (loopback) topology: each term by hand, breakdown sums, feedback and congestion."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kvlane.policy.config import CreditConfig, FeedbackConfig, ScoringWeights
from kvlane.policy.credits import CreditLedger, Lease
from kvlane.policy.feedback import PathFeedback
from kvlane.policy.scoring import TERMS, EngineState, PairScorer
from kvlane.policy.topology import load_topology
from kvlane.policy.types import EngineInfo, Role

GB = 10**9


def engine(eid: str, role: Role, gpus: list[str], **state) -> EngineState:
    info = EngineInfo(engine_id=eid, role=role, gpus=gpus)
    e = EngineState(info=info, engine_id=eid, tp=len(gpus), gpu0=gpus[0], can_prefill=role.can_prefill(),
                    can_decode=role.can_decode())
    for k, v in state.items():
        setattr(e, k, v)
    return e


@pytest.fixture()
def setup():
    # loopback:gpus=4 — every GPU pair has two 1-hop paths: 'shm' (100 Gbps) and 'tcp' (25 Gbps).
    topo = load_topology("loopback:gpus=4")
    ledger = CreditLedger(CreditConfig(reservable_fraction=0.8), lambda link: topo.link(link).gbps)
    fb = PathFeedback(FeedbackConfig(ewma_alpha=1.0))
    scorer = PairScorer(topo, ledger, fb, ScoringWeights())
    p = engine("P", Role.PREFILL, ["n0.g0"], queue=2)
    d = engine("D", Role.DECODE, ["n0.g1"], queue=1, pending=2, memory=0.5)
    return topo, ledger, fb, scorer, p, d


def test_terms_by_hand(setup):
    _, _, _, scorer, p, d = setup
    score, t = scorer.score(p, d, kv_bytes=GB)
    # Qp = 2; Qd = 1 reported + 2 assigned since; Tkv = 8e9 bits / 100 Gbps (shm) = 0.08 s; Hpath = 1 hop.
    assert (t.qp, t.qd, t.tkv, t.hpath, t.md, t.acache) == (2, 3, pytest.approx(0.08), 1.0, 0.5, 0.0)
    assert [x.name for x in t.paths] == ["shm"]
    bd = scorer.breakdown(t)
    assert list(bd) == list(TERMS)
    # α=1, β=1, γ=10, δ=0.25, ε=4: 2 + 3 + 0.8 + 0.25 + 2.0
    assert bd == {"qp": 2.0, "qd": 3.0, "tkv": pytest.approx(0.8), "hpath": 0.25, "md": 2.0, "acache": -0.0}
    assert score == pytest.approx(sum(bd.values())) == pytest.approx(8.05)


def test_cache_hit_lowers_score_and_shrinks_the_transfer(setup):
    _, _, _, scorer, p, d = setup
    base, _ = scorer.score(p, d, kv_bytes=GB)
    hit, t = scorer.score(p, d, kv_bytes=GB, acache=0.75)
    assert t.tkv == pytest.approx(0.02)  # only the 25% delta moves
    assert scorer.breakdown(t)["acache"] == pytest.approx(-1.5)
    assert hit == pytest.approx(base - 0.6 - 1.5)


def test_measured_bandwidth_replaces_static(setup):
    _, _, fb, scorer, p, d = setup
    shm = scorer.path_infos("n0.g0", "n0.g1")[0]
    fb.observe(shm.key, shm.static_gbps, nbytes=GB, seconds=1.0, ok=True, now=0.0)  # 8 Gbps measured
    _, t = scorer.score(p, d, kv_bytes=GB)
    # shm now looks like 8 Gbps, tcp still 25 Gbps static: the transfer is predicted on tcp.
    assert [x.name for x in t.paths] == ["tcp"]
    assert t.tkv == pytest.approx(8 / 25)


def test_congestion_adds_to_hpath(setup):
    topo, ledger, _, scorer, p, d = setup
    shm = scorer.path_infos("n0.g0", "n0.g1")[0]
    # Reserve 40 of the 80 reservable Gbps on the source shm link (another transfer from the same GPU).
    lease = ledger.acquire(lease_id="L1", transfer_id="t1", holder="X", decode="Y", nbytes=GB, klass="reserved",
                           link_rates={shm.links[0]: 40.0}, now=0.0, expected_seconds=0.1)
    assert isinstance(lease, Lease)
    _, t = scorer.score(p, d, kv_bytes=GB)
    assert scorer.congestion(shm) == pytest.approx(0.5)
    # shm's goodness 100·0.5 = 50 still beats tcp's 25: Hpath = 1 hop + 4 × 0.5.
    assert [x.name for x in t.paths] == ["shm"] and t.hpath == pytest.approx(3.0)


def test_two_streams_use_two_paths_and_wait_for_the_slower(setup):
    _, _, _, scorer, _, _ = setup
    p2 = engine("P2", Role.PREFILL, ["n0.g0", "n0.g1"])
    d2 = engine("D2", Role.DECODE, ["n0.g2", "n0.g3"])
    _, t = scorer.score(p2, d2, kv_bytes=GB)
    # Two ranks, split over shm and tcp: each carries 0.5 GB; tcp (25 Gbps) finishes last at 0.16 s.
    assert [x.name for x in t.paths] == ["shm", "tcp"]
    assert t.tkv == pytest.approx(0.16)


def test_custom_weights():
    w = ScoringWeights(alpha=2.0, zeta=0.0)
    assert (w.alpha, w.beta, w.zeta) == (2.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="alpha"):
        ScoringWeights(alpha=-1.0)


@settings(max_examples=60, deadline=None)
@given(qp=st.integers(0, 500), qd=st.integers(0, 500), mem=st.floats(0, 1), hit=st.floats(0, 1),
       kv=st.integers(0, 1 << 40), alpha=st.floats(0, 10), zeta=st.floats(0, 10))
def test_breakdown_always_sums_to_the_score(qp, qd, mem, hit, kv, alpha, zeta):
    topo = load_topology("loopback:gpus=2")
    ledger = CreditLedger(CreditConfig(), lambda link: topo.link(link).gbps)
    scorer = PairScorer(topo, ledger, PathFeedback(FeedbackConfig()), ScoringWeights(alpha=alpha, zeta=zeta))
    p = engine("P", Role.PREFILL, ["n0.g0"], queue=qp)
    d = engine("D", Role.DECODE, ["n0.g1"], queue=qd, memory=mem)
    score, t = scorer.score(p, d, kv_bytes=kv, acache=hit)
    assert sum(scorer.breakdown(t).values()) == pytest.approx(score, rel=1e-9, abs=1e-9)
    assert t.tkv == pytest.approx(kv * (1 - hit) * 8 / 100e9)
