"""The credit-accounting invariants used after fault tests: consistent at every step of any sequence of grants,
releases, re-releases, early and normal expiries and engine removals; drained at the end; and a tampered
ledger is caught (so the checks can fail)."""

from __future__ import annotations

import contextlib

from hypothesis import given, settings
from hypothesis import strategies as st
from kvlane.policy.config import CreditConfig, PolicyConfig
from kvlane.policy.core import Policy
from kvlane.policy.invariants import drained_violations, ledger_violations, overdue_leases
from kvlane.policy.topology import load_topology
from kvlane.policy.types import EngineInfo, LeaseGrant, LeaseRequest, Role, UnknownEngine

MIB = 1 << 20


def policy() -> Policy:
    p = Policy(load_topology("loopback:gpus=4"), PolicyConfig(credits=CreditConfig(lease_ttl_s=5.0)))
    for name, role, gpu in (("p0", Role.PREFILL, "n0.g0"), ("p1", Role.PREFILL, "n0.g1"),
                            ("d0", Role.DECODE, "n0.g2"), ("d1", Role.DECODE, "n0.g3")):
        p.register_engine(EngineInfo(engine_id=name, role=role, gpus=[gpu], kv_bytes_per_token=1024), 0.0)
    return p


def grant(p: Policy, tid: str, nbytes: int, src: str = "p0", dst: str = "d0", now: float = 0.0) -> LeaseGrant:
    g = p.acquire_lease(LeaseRequest(transfer_id=tid, prefill=src, decode=dst, bytes=nbytes), now)
    assert isinstance(g, LeaseGrant), g
    return g


def test_fresh_policy_is_drained():
    assert drained_violations(policy()) == []


def test_grants_are_consistent_outstanding_until_released_and_overdue_after_expiry():
    p = policy()
    big = grant(p, "t-big", 100 * MIB)
    small = grant(p, "t-small", MIB)
    assert (big.klass, small.klass) == ("reserved", "best_effort")
    assert p.ledger.links_in_use()  # the reserved lease holds link bandwidth
    assert ledger_violations(p) == []
    drained = drained_violations(p)
    assert any("2 lease(s) still outstanding" in v for v in drained), drained
    assert overdue_leases(p, 1.0) == []
    assert overdue_leases(p, max(big.expires_at, small.expires_at)) == sorted([big.lease_id, small.lease_id])
    assert p.release_lease(big.lease_id, None, 1.0) is True
    assert p.expire_lease(small.lease_id, 1.0) is True
    assert drained_violations(p) == []


def test_a_tampered_ledger_is_caught():
    p = policy()
    grant(p, "t1", 100 * MIB)
    p.ledger._decode["d0"].streams += 1  # a double count
    [v] = ledger_violations(p)
    assert v.startswith("decode d0:") and "'streams': 2" in v
    p.ledger._decode["d0"].streams -= 1
    link = next(iter(p.ledger.links_in_use()))
    p.ledger._link_reserved[link] += 5.0  # a reservation nobody holds
    [v] = ledger_violations(p)
    assert v.startswith(f"link {link}:")
    p.ledger._link_reserved[link] -= 5.0
    assert ledger_violations(p) == []


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(st.tuples(
    st.sampled_from(["acquire", "release", "release", "expire_early", "tick", "remove_decode"]),
    st.integers(0, 7), st.sampled_from([MIB, 64 * MIB, 300 * MIB, 20 << 30])), min_size=1, max_size=40))
def test_any_sequence_stays_consistent_and_drains(steps):
    p = policy()
    now = 0.0
    granted: list[str] = []
    for i, (action, k, nbytes) in enumerate(steps):
        if action == "acquire":
            src, dst = ("p0", "d0") if k % 2 else ("p1", "d1")
            try:
                g = p.acquire_lease(LeaseRequest(transfer_id=f"t{i}", prefill=src, decode=dst, bytes=nbytes), now)
            except Exception as exc:  # an engine removed earlier in the sequence
                assert getattr(exc, "code", "") == "unknown_engine", exc
                continue
            if isinstance(g, LeaseGrant):
                granted.append(g.lease_id)
        elif action == "release" and granted:
            p.release_lease(granted[k % len(granted)], None, now)
        elif action == "expire_early" and granted:
            p.expire_lease(granted[k % len(granted)], now)
        elif action == "tick":
            now += 2.0 * (k + 1)
            p.expire(now)
            assert overdue_leases(p, now) == []
        elif action == "remove_decode":
            with contextlib.suppress(UnknownEngine):  # removed already
                p.remove_engine("d0" if k % 2 else "d1", now)
        assert ledger_violations(p) == [], (i, action)
    p.expire(now + 1e9)
    assert drained_violations(p) == []
