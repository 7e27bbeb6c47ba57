"""Credit ledger: capacity is never exceeded, nothing is freed twice, every lease ends."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule
from kvlane.policy.config import CreditConfig
from kvlane.policy.credits import CreditLedger, Denial, Lease

LINKS = {"l0": 100.0, "l1": 100.0, "l2": 400.0}


def ledger(**kw) -> CreditLedger:
    return CreditLedger(CreditConfig(**kw), LINKS.__getitem__)


def grant(led: CreditLedger, n: int, decode="D", holder="P", nbytes=1 << 30, links=None, now=0.0,
          klass="reserved") -> Lease | Denial:
    return led.acquire(lease_id=f"L{n}", transfer_id=f"t{n}", holder=holder, decode=decode, nbytes=nbytes,
                       klass=klass, link_rates=links or {}, now=now, expected_seconds=0.5)


def test_fourth_stream_denied_with_reason_then_granted_after_release():
    led = ledger(max_streams=3)
    leases = [grant(led, i) for i in range(3)]
    assert all(isinstance(x, Lease) for x in leases)
    denied = grant(led, 3, now=0.1)
    assert isinstance(denied, Denial)
    assert denied.reason == "decode D has 3/3 large KV streams in flight"
    # The earliest lease should finish at 0.5 s: retry in 0.4 s.
    assert denied.retry_after == pytest.approx(0.4)
    assert led.release("L0", now=0.2) == "released"
    assert isinstance(grant(led, 4, now=0.2), Lease)
    assert led.streams_in_use("D") == 3


def test_release_is_idempotent_and_expired_leases_are_refused():
    led = ledger(lease_ttl_s=10.0, lease_ttl_floor_gbps=8.0)  # ttl = 10 + 2^30·8/8e9 = 11.07 s
    lease = grant(led, 0)
    assert lease.expires_at == pytest.approx(10 + (1 << 30) / 1e9)
    assert led.release("L0", 1.0) == "released"
    assert led.release("L0", 1.0) == "already_ended"
    assert led.release("nope", 1.0) == "unknown"
    grant(led, 1, now=2.0)
    assert led.release("L1", 2.0 + lease.expires_at) == "expired"  # past expiry: refused, but freed
    assert led.release("L1", 100.0) == "already_ended"
    assert led.streams_in_use("D") == 0 and led.active() == []


def test_expire_sweep_returns_expired_leases_once():
    led = ledger(lease_ttl_s=1.0, lease_ttl_floor_gbps=1e6)
    grant(led, 0, now=0.0)
    grant(led, 1, now=0.5)
    assert [x.lease_id for x in led.expire(1.2)] == ["L0"]
    assert led.expire(1.2) == []
    assert [x.lease_id for x in led.expire(5.0)] == ["L1"]
    assert led.release("L1", 5.0) == "already_ended"


def test_renewal_moves_the_expiry_up_to_the_cap_and_never_revives_an_expired_lease():
    led = ledger(lease_ttl_s=1.0, lease_ttl_floor_gbps=1e9, lease_max_s=3.0)  # ttl = 1 s + ~0
    grant(led, 0, now=0.0)  # expires at ~1.0
    assert led.renew("L0", 0.8).expires_at == pytest.approx(1.8)
    assert led.expire(1.5) == []  # the old expiry's heap entry is stale, not an expiry
    assert led.renew("L0", 1.6).expires_at == pytest.approx(2.6)
    assert led.renew("L0", 2.5).expires_at == pytest.approx(3.0)  # capped at granted_at + lease_max_s
    assert led.renew("L0", 2.9).expires_at == pytest.approx(3.0)
    assert [x.lease_id for x in led.expire(3.0)] == ["L0"]
    assert led.renew("L0", 3.0) is None and led.renew("nope", 3.0) is None
    grant(led, 1, now=10.0)
    assert led.renew("L1", 11.5) is None  # already past its expiry: ended as expired, credits freed
    assert led.ended_state("L1") == "expired" and led.streams_in_use("D") == 0
    assert led.release("L1", 11.5) == "already_ended"


def test_holder_death_and_decode_death_end_their_leases():
    led = ledger(max_streams=4)
    grant(led, 0, holder="P1", decode="D1", links={"l0": 10.0})
    grant(led, 1, holder="P1", decode="D2")
    grant(led, 2, holder="P2", decode="D1")
    assert sorted(x.lease_id for x in led.drop_holder("P1", 1.0)) == ["L0", "L1"]
    assert led.link_reserved("l0") == 0.0
    assert [x.lease_id for x in led.drop_decode("D1", 1.0)] == ["L2"]
    assert led.active() == [] and led.release("L2", 1.0) == "already_ended"


def test_link_quota_and_ingress_bytes():
    led = ledger(max_streams=8, ingress_bytes=3 << 30, reservable_fraction=0.8)  # l0: 80 Gbps reservable
    assert isinstance(grant(led, 0, decode="D1", links={"l0": 50.0}), Lease)
    denied = grant(led, 1, decode="D2", links={"l0": 40.0, "l2": 10.0})
    assert isinstance(denied, Denial)
    assert denied.reason == "link l0 quota: 50.0 Gbps reserved + 40.0 > 80.0 Gbps reservable"
    assert led.link_reserved("l2") == 0.0  # all or nothing
    assert isinstance(grant(led, 2, decode="D2", links={"l0": 30.0}), Lease)
    assert led.link_fraction("l0") == pytest.approx(1.0)
    # A lone stream asking for more than a link can carry is clamped, not refused.
    solo = grant(led, 3, decode="D3", links={"l2": 1000.0})
    assert isinstance(solo, Lease) and solo.link_rates == {"l2": pytest.approx(320.0)}
    # Ingress bytes: 2 GiB + 2 GiB > 3 GiB is refused; a lone 5 GiB transfer is admitted.
    assert isinstance(grant(led, 4, decode="D4", nbytes=2 << 30), Lease)
    denied = grant(led, 5, decode="D4", nbytes=2 << 30)
    assert isinstance(denied, Denial) and denied.reason.startswith("decode D4 ingress budget")
    assert isinstance(grant(led, 6, decode="D5", nbytes=5 << 30), Lease)


def test_best_effort_takes_no_stream_credit_but_is_bounded():
    led = ledger(max_streams=1, best_effort_max_streams=2)
    assert isinstance(grant(led, 0), Lease)
    assert isinstance(grant(led, 1, klass="best_effort", nbytes=1000, links={"l0": 5.0}), Lease)
    assert isinstance(grant(led, 2, klass="best_effort", nbytes=1000), Lease)
    denied = grant(led, 3, klass="best_effort", nbytes=1000)
    assert isinstance(denied, Denial) and denied.reason == "decode D has 2/2 best-effort transfers in flight"
    assert led.streams_in_use("D") == 1 and led.best_effort_in_use("D") == 2
    assert led.link_reserved("l0") == 0.0  # best effort reserves nothing


def test_lease_ids_cannot_be_reused():
    led = ledger()
    grant(led, 0)
    led.release("L0", 0.0)
    with pytest.raises(ValueError, match="already used"):
        grant(led, 0)


class LedgerMachine(RuleBasedStateMachine):
    """Random interleavings of acquire / release / double release / expire / holder and decode death."""

    leases = Bundle("leases")

    def __init__(self):
        super().__init__()
        self.cfg = CreditConfig(max_streams=2, ingress_bytes=5 << 30, best_effort_max_streams=2,
                                lease_ttl_s=2.0, lease_ttl_floor_gbps=8.0, reservable_fraction=0.8, lease_max_s=6.0)
        self.led = CreditLedger(self.cfg, LINKS.__getitem__)
        self.now = 0.0
        self.n = 0
        self.ended: set[str] = set()
        self.max_ttl = self.cfg.lease_ttl_s + (4 << 30) * 8 / 8e9

    @rule(target=leases, decode=st.sampled_from(["D1", "D2"]), holder=st.sampled_from(["P1", "P2", "P3"]),
          nbytes=st.integers(0, 4 << 30), best_effort=st.booleans(),
          links=st.dictionaries(st.sampled_from(sorted(LINKS)), st.floats(1.0, 500.0), max_size=3))
    def acquire(self, decode, holder, nbytes, best_effort, links):
        self.n += 1
        lid = f"L{self.n}"
        out = self.led.acquire(lease_id=lid, transfer_id=f"t{self.n}", holder=holder, decode=decode,
                               nbytes=nbytes, klass="best_effort" if best_effort else "reserved",
                               link_rates=links, now=self.now, expected_seconds=0.3)
        if isinstance(out, Denial):
            assert out.reason and out.retry_after >= self.cfg.min_retry_s
        return lid

    @rule(lid=leases)
    def release(self, lid):
        was_active = self.led.get(lid) is not None
        res = self.led.release(lid, self.now)
        if lid in self.ended:
            assert res == "already_ended"
        elif was_active:
            assert res in ("released", "expired")
        if self.led.ended_state(lid) is not None:
            self.ended.add(lid)

    @rule(lid=consumes(leases))
    def double_release(self, lid):
        first = self.led.release(lid, self.now)
        assert self.led.release(lid, self.now) in ("already_ended", "unknown")
        if first != "unknown":
            self.ended.add(lid)

    @rule(dt=st.floats(0.0, 3.0))
    def advance_and_expire(self, dt):
        self.now += dt
        for lease in self.led.expire(self.now):
            assert lease.expires_at <= self.now and lease.lease_id not in self.ended
            self.ended.add(lease.lease_id)

    @rule(lid=leases)
    def renew(self, lid):
        before = self.led.get(lid)
        old = before.expires_at if before is not None else None
        out = self.led.renew(lid, self.now)
        if out is None:  # not live: it was unknown/ended, or ended here as expired
            assert old is None or old <= self.now
            if old is not None:
                self.ended.add(lid)
        else:
            assert lid not in self.ended and out.expires_at >= old > self.now
            assert out.expires_at <= max(old, out.granted_at + self.cfg.lease_max_s)

    @rule(holder=st.sampled_from(["P1", "P2", "P3"]))
    def holder_dies(self, holder):
        for lease in self.led.drop_holder(holder, self.now):
            assert lease.holder == holder and lease.lease_id not in self.ended
            self.ended.add(lease.lease_id)

    @rule(decode=st.sampled_from(["D1", "D2"]))
    def decode_dies(self, decode):
        for lease in self.led.drop_decode(decode, self.now):
            self.ended.add(lease.lease_id)

    @invariant()
    def never_over_capacity_and_books_balance(self):
        active = self.led.active()
        assert not ({x.lease_id for x in active} & self.ended)
        for d in ("D1", "D2"):
            mine = [x for x in active if x.decode == d]
            reserved = [x for x in mine if x.klass == "reserved"]
            best = [x for x in mine if x.klass == "best_effort"]
            assert len(reserved) == self.led.streams_in_use(d) <= self.cfg.max_streams
            assert len(best) == self.led.best_effort_in_use(d) <= self.cfg.best_effort_max_streams
            total = sum(x.bytes for x in reserved)
            assert total == self.led.bytes_in_flight(d)
            assert len(reserved) <= 1 or total <= self.cfg.ingress_bytes
        for link, gbps in LINKS.items():
            booked = sum(x.link_rates.get(link, 0.0) for x in active)
            assert self.led.link_reserved(link) == pytest.approx(booked, abs=1e-6)
            assert booked <= gbps * self.cfg.reservable_fraction + 1e-6

    def teardown(self):
        # Every lease ends: past the longest ttl or renewal cap, nothing is held.
        self.led.expire(self.now + max(self.max_ttl, self.cfg.lease_max_s) + 1)
        assert self.led.active() == []
        assert self.led.links_in_use() == {} and self.led.decodes_in_use() == {}


TestLedgerMachine = LedgerMachine.TestCase
TestLedgerMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
