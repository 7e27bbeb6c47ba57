"""Fault injection: the seeded FaultPlan decides deterministically, and the policy service applies it (drop a
request, drop or delay a reply, expire a lease early) over TCP and embedded, with the lease accounting back
to zero afterwards."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest
from kvlane.integration.policy_service import (
    CallTimeout,
    EmbeddedPolicy,
    PolicyClient,
    PolicyServer,
    PolicyService,
)
from kvlane.integration.policy_service.app import load_fault_plan
from kvlane.policy.faults import FAULTS, FaultPlan, FaultPlanError, parse_plan, unit_hash
from kvlane.policy.invariants import drained_violations
from kvlane.policy.types import LeaseGrant, PairRequest
from policy_raw import ENGINES, FakeClock, lease_req, make_policy

# ---------------------------------------------------------------------------------------------- the plan


def test_default_plan_injects_nothing():
    plan = FaultPlan()
    assert not plan.enabled
    assert not any(plan.should(f, f"k{i}") for f in FAULTS for i in range(200))
    assert plan.message_fault("acquire_lease", "acquire_lease:1") is None


def test_decisions_are_deterministic_and_follow_the_probability():
    plan = FaultPlan(seed=7, fail_transfer={"probability": 0.05})
    keys = [f"t{i}" for i in range(10_000)]
    hits = [k for k in keys if plan.should("fail_transfer", k)]
    # Same plan, same keys: the same decisions (a chaos run is replayed by its seed).
    assert hits == [k for k in keys if FaultPlan(seed=7, fail_transfer={"probability": 0.05}).should(
        "fail_transfer", k)]
    # 5 % of 10 000 = 500; the hash is uniform, so within 4 standard deviations (sqrt(475) ~ 21.8).
    assert 413 < len(hits) < 587
    other = [k for k in keys if FaultPlan(seed=8, fail_transfer={"probability": 0.05}).should("fail_transfer", k)]
    assert other != hits and 413 < len(other) < 587
    # The fault kind is part of the hash: another fault with the same probability hits other keys.
    other_kind = FaultPlan(seed=7, expire_lease={"probability": 0.05})
    assert [k for k in keys if other_kind.should("expire_lease", k)] != hits


def test_unit_hash_is_in_the_unit_interval_and_probability_edges():
    values = [unit_hash(3, "drop_reply", f"k{i}") for i in range(1000)]
    assert all(0.0 <= v < 1.0 for v in values)
    always = FaultPlan(drop_reply={"probability": 1.0})
    assert all(always.should("drop_reply", f"k{i}") for i in range(100))
    assert not any(always.should("drop_request", f"k{i}") for i in range(100))
    with pytest.raises(ValueError, match="unknown fault 'explode'"):
        always.should("explode", "k")  # type: ignore[arg-type]


def test_message_fault_filters_ops_and_orders_faults():
    plan = FaultPlan(drop_reply={"probability": 1.0, "ops": ["acquire_lease"]},
                     delay_reply={"probability": 1.0, "delay_s": 0.25})
    assert plan.message_fault("acquire_lease", "acquire_lease:1") == ("drop_reply", 0.0)
    assert plan.message_fault("ping", "ping:1") == ("delay_reply", 0.25)
    both = FaultPlan(drop_request={"probability": 1.0}, drop_reply={"probability": 1.0})
    assert both.message_fault("ping", "ping:1") == ("drop_request", 0.0)


def test_parse_plan_names_the_bad_field():
    assert parse_plan('{"seed": 3, "drop_reply": {"probability": 0.1}}').drop_reply.probability == 0.1
    assert parse_plan("seed: 4\nexpire_lease: {probability: 1, after_s: 2}\n").expire_lease.after_s == 2.0
    assert not parse_plan("").enabled
    with pytest.raises(FaultPlanError, match=r"drop_reply\.probability"):
        parse_plan('{"drop_reply": {"probability": 1.5}}')
    with pytest.raises(FaultPlanError, match="kill_everything"):
        parse_plan('{"kill_everything": true}')
    with pytest.raises(FaultPlanError, match="must be a map"):
        parse_plan("[1, 2]")


def test_load_fault_plan_from_env_inline_or_file(tmp_path):
    assert load_fault_plan({}) is None
    assert load_fault_plan({"KVLANE_FAULTS": '{"seed": 1}'}) is None  # a plan that injects nothing is off
    plan = load_fault_plan({"KVLANE_FAULTS": '{"seed": 1, "drop_reply": {"probability": 0.5}}'})
    assert plan is not None and plan.seed == 1 and plan.drop_reply.probability == 0.5
    f = tmp_path / "faults.yaml"
    f.write_text("seed: 9\nexpire_lease:\n  probability: 0.2\n")
    plan = load_fault_plan({"KVLANE_FAULTS": str(f)})
    assert plan is not None and plan.seed == 9 and plan.expire_lease.probability == 0.2


# ---------------------------------------------------------------------------------------------- in the service


async def _served(plan: FaultPlan, clock: FakeClock | None = None):
    svc = PolicyService(make_policy(), clock=clock or FakeClock(), sweep_interval=3600.0, faults=plan)
    srv = PolicyServer(svc, "127.0.0.1", 0)
    await srv.start()
    return svc, srv


def injected(svc: PolicyService, fault: str) -> float:
    return svc.metrics.registry.get_sample_value("kvlane_policy_faults_injected_total", {"fault": fault}) or 0.0


async def test_dropped_reply_times_out_but_the_op_ran_and_the_lease_expires():
    clock = FakeClock(1000.0)
    svc, srv = await _served(FaultPlan(seed=1, drop_reply={"probability": 1.0, "ops": ["acquire_lease"]}), clock)
    try:
        async with PolicyClient(srv.address, timeout=5.0, secret=None) as c:
            for info in ENGINES:
                await c.register_engine(info)
            with pytest.raises(CallTimeout):
                await c.acquire_lease(lease_req("t1"), timeout=0.3)
            # The grant happened; only its answer was lost: the credits are held by nobody who knows.
            [lease] = svc.policy.ledger.active()
            assert lease.transfer_id == "t1"
            assert injected(svc, "drop_reply") == 1.0
            assert await c.ping() == 1000.0  # the connection still serves
            clock.now = lease.expires_at
            assert svc.sweep_once() == [lease.lease_id]
            assert drained_violations(svc.policy) == []  # leases 0, D credits back, no link held
    finally:
        await srv.close()


async def test_dropped_request_never_runs():
    svc, srv = await _served(FaultPlan(drop_request={"probability": 1.0, "ops": ["select_pair"]}))
    try:
        async with PolicyClient(srv.address, timeout=5.0, secret=None) as c:
            for info in ENGINES:
                await c.register_engine(info)
            with pytest.raises(CallTimeout):
                await c.select_pair(PairRequest(request_id="r1", prompt_tokens=10), timeout=0.3)
            assert svc.policy.counters["decisions"] == 0
            assert len(await c.engines()) == 2
    finally:
        await srv.close()


async def test_delayed_reply_arrives_late():
    svc, srv = await _served(FaultPlan(delay_reply={"probability": 1.0, "ops": ["ping"], "delay_s": 0.3}))
    try:
        async with PolicyClient(srv.address, timeout=5.0, secret=None) as c:
            t0 = time.perf_counter()
            await c.ping()
            assert time.perf_counter() - t0 >= 0.3
            t0 = time.perf_counter()
            await c.engines()  # another op: not delayed
            assert time.perf_counter() - t0 < 0.3
            assert injected(svc, "delay_reply") == 1.0
    finally:
        await srv.close()


async def test_seeded_drops_hit_exactly_the_planned_calls():
    plan = FaultPlan(seed=42, drop_reply={"probability": 0.3, "ops": ["list_engines"]})
    expected = [n for n in range(1, 21) if plan.should("drop_reply", f"list_engines:{n}")]
    assert 0 < len(expected) < 20
    svc, srv = await _served(plan)
    try:
        async with PolicyClient(srv.address, timeout=5.0, secret=None) as c:
            lost = []
            for n in range(1, 21):
                try:
                    await c.engines(timeout=0.15)
                except CallTimeout:
                    lost.append(n)
            assert lost == expected
    finally:
        await srv.close()


async def test_lease_expired_early_frees_credits_and_release_says_false(caplog):
    clock = FakeClock(1000.0)
    svc, srv = await _served(FaultPlan(expire_lease={"probability": 1.0, "after_s": 0.5}), clock)
    try:
        async with PolicyClient(srv.address, timeout=5.0, secret=None) as c:
            for info in ENGINES:
                await c.register_engine(info)
            grant = await c.acquire_lease(lease_req("t1"))
            assert isinstance(grant, LeaseGrant) and grant.expires_at > 1010.0  # promised ~10 s
            clock.now = 1000.4
            assert svc.sweep_once() == []
            clock.now = 1000.5
            with caplog.at_level(logging.WARNING, logger="kvlane.policy_service"):
                assert svc.sweep_once() == [grant.lease_id]
            assert "expired early" in caplog.text
            assert drained_violations(svc.policy) == []  # leases 0, D credits back, no link held
            assert await c.release_lease(grant.lease_id) is False  # never a double free
            assert (await c.snapshot())["ledger_violations"] == []  # what an out-of-process chaos test checks
            assert injected(svc, "expire_lease") == 1.0
            assert svc.metrics.registry.get_sample_value("kvlane_policy_leases_expired_total") == 1.0
            # A lease released in time is not expired afterwards.
            g2 = await c.acquire_lease(lease_req("t2"))
            assert isinstance(g2, LeaseGrant)
            assert await c.release_lease(g2.lease_id) is True
            clock.now = 1002.0
            assert svc.sweep_once() == []
    finally:
        await srv.close()


async def test_embedded_policy_applies_the_same_plan():
    plan = FaultPlan(drop_reply={"probability": 1.0, "ops": ["acquire_lease"]},
                     delay_reply={"probability": 1.0, "ops": ["ping"], "delay_s": 0.2})
    async with EmbeddedPolicy(make_policy(), clock=FakeClock(), faults=plan) as c:
        for info in ENGINES:
            await c.register_engine(info)
        with pytest.raises(CallTimeout):
            await c.acquire_lease(lease_req("t1"), timeout=0.2)
        assert len(c.service.policy.ledger.active()) == 1
        t0 = time.perf_counter()
        await c.ping()
        assert time.perf_counter() - t0 >= 0.2


async def test_no_plan_no_faults_and_no_overhead_state():
    svc = PolicyService(make_policy(), clock=FakeClock(), faults=FaultPlan(seed=5))
    assert svc.faults is None  # an empty plan is off
    assert svc.message_fault("ping") is None
    await asyncio.sleep(0)


def test_fault_plan_round_trips_as_json():
    plan = FaultPlan(seed=3, delay_reply={"probability": 0.1, "delay_s": 1.5, "ops": ["acquire_lease"]})
    assert parse_plan(json.dumps(plan.model_dump())) == plan
