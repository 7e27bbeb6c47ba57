"""Policy-service restart on the same port: clients (async and sync) fail fast while it is down, reconnect by
themselves afterwards, register their engines, ranks and recent announces again on the new service, and see exactly the state
loss docs/reliability.md describes (leases gone, announces only where their client re-sends them; old lease
ids answer False; new lease ids never collide with old ones)."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from kvlane.integration.policy_service import (
    AnnounceTimeout,
    ConnectionLost,
    PolicyClient,
    PolicyServer,
    PolicyService,
    SyncPolicyClient,
)
from kvlane.integration.policy_service.app import start_prefix
from kvlane.policy.config import CreditConfig, PolicyConfig
from kvlane.policy.core import Policy
from kvlane.policy.faults import FaultPlan
from kvlane.policy.topology import load_topology
from kvlane.policy.types import LeaseGrant, PairRequest
from policy_raw import ENGINES, FakeClock, lease_req


def fresh_service(clock: FakeClock, faults: FaultPlan | None = None) -> PolicyService:
    """What `kvlane policy serve` builds on each start: a new policy with a per-start lease-id prefix."""
    config = PolicyConfig(credits=CreditConfig(lease_ttl_s=10.0), lease_id_prefix=start_prefix(clock.now))
    return PolicyService(Policy(load_topology("loopback:gpus=4"), config), clock=clock, faults=faults)


async def restart(srv: PolicyServer, clock: FakeClock) -> PolicyServer:
    await srv.close()
    clock.now += 1.0
    new = PolicyServer(fresh_service(clock), "127.0.0.1", srv.port)
    await new.start()
    return new


def registrations(srv: PolicyServer) -> float:
    return srv.service.metrics.registry.get_sample_value("kvlane_policy_requests_total",
                                                         {"op": "register_engine"}) or 0.0


async def test_async_client_reconnects_after_a_restart_and_registers_again():
    clock = FakeClock(1000.0)
    srv = PolicyServer(fresh_service(clock), "127.0.0.1", 0)
    await srv.start()
    port = srv.port
    async with PolicyClient(srv.address, timeout=5.0, secret=None) as c:
        for info in ENGINES:
            await c.register_engine(info)
        await c.register_rank("p0", 0, b"rank0-address")
        old = await c.acquire_lease(lease_req("t1"))
        assert isinstance(old, LeaseGrant)
        await c.announce("t1", {"block_ids": [1, 2]})
        await c.announce("t-done", {"block_ids": [3]})
        c.forget_announce("t-done")  # that transfer ended: not worth telling a new service
        async with PolicyClient(srv.address, timeout=5.0, secret=None) as other:
            await other.announce("t-other", {"x": 1})  # closed before the restart: nobody re-announces it

        await srv.close()  # the service goes away ...
        t0 = time.perf_counter()
        with pytest.raises(ConnectionLost):
            await c.ping()
        assert time.perf_counter() - t0 < 2.0  # ... and callers learn it at once, not at their deadline

        clock.now += 1.0
        srv = PolicyServer(fresh_service(clock), "127.0.0.1", port)
        await srv.start()
        try:
            assert await c.ping() == 1001.0  # reconnected by itself, same client object
            assert c.restarts_seen == 1
            # What this client registered is registered again, before its first request to the new service.
            assert await c.engines() == ENGINES
            assert await c.get_ranks("p0") == {0: b"rank0-address"}
            assert registrations(srv) == 2.0
            assert await c.release_lease(old.lease_id) is False  # the old lease is unknown: no double free
            # The announce this client made is on the new board again (D's blocks are still armed, so P can
            # still find them); one nobody re-announces is gone.
            assert await c.await_announce("t1", 0.0) == {"block_ids": [1, 2]}
            with pytest.raises(AnnounceTimeout):
                await c.await_announce("t-other", 0.0)
            with pytest.raises(AnnounceTimeout):
                await c.await_announce("t-done", 0.0)
            new = await c.acquire_lease(lease_req("t1"))  # the same transfer may ask again
            assert isinstance(new, LeaseGrant) and new.lease_id != old.lease_id
            assert new.lease_id.split("-")[0] != old.lease_id.split("-")[0]  # a new per-start prefix
            decision = await c.select_pair(PairRequest(request_id="r1", prompt_tokens=10))
            assert (decision.prefill, decision.decode) == ("p0", "d0")
        finally:
            await srv.close()


async def test_sync_client_survives_a_restart():
    clock = FakeClock(1000.0)
    srv = PolicyServer(fresh_service(clock), "127.0.0.1", 0)
    await srv.start()
    client = SyncPolicyClient(srv.address, timeout=5.0, secret=None)
    try:
        assert await asyncio.to_thread(client.ping) == 1000.0
        await asyncio.to_thread(client.register_engine, ENGINES[0])
        srv = await restart(srv, clock)
        await asyncio.sleep(0.05)  # the client's reader notices the drop
        assert await asyncio.to_thread(client.ping) == 1001.0
        assert [e.engine_id for e in await asyncio.to_thread(client.engines)] == ["p0"]  # registered again
    finally:
        await asyncio.to_thread(client.close)
        await srv.close()


async def test_a_call_in_flight_when_the_service_dies_fails_fast():
    """A non-idempotent call whose reply never came (the fault plan drops it) is answered ConnectionLost as soon
    as the connection drops, not at its deadline: the caller cannot know whether it ran, and is told so."""
    clock = FakeClock(1000.0)
    plan = FaultPlan(drop_reply={"probability": 1.0, "ops": ["acquire_lease"]})
    srv = PolicyServer(fresh_service(clock, plan), "127.0.0.1", 0)
    await srv.start()
    async with PolicyClient(srv.address, timeout=30.0, secret=None) as c:
        for info in ENGINES:
            await c.register_engine(info)
        call = asyncio.ensure_future(c.acquire_lease(lease_req("t1")))
        await asyncio.sleep(0.1)
        assert not call.done()
        t0 = time.perf_counter()
        srv = await restart(srv, clock)
        try:
            with pytest.raises(ConnectionLost):
                await call
            assert time.perf_counter() - t0 < 5.0
            assert await c.ping() == 1001.0
        finally:
            await srv.close()


async def test_many_restarts_keep_lease_ids_unique():
    clock = FakeClock(1000.0)
    srv = PolicyServer(fresh_service(clock), "127.0.0.1", 0)
    await srv.start()
    seen: set[str] = set()
    async with PolicyClient(srv.address, timeout=5.0, secret=None) as c:
        try:
            for _ in range(4):
                for info in ENGINES:
                    await c.register_engine(info)
                for i in range(3):
                    g = await c.acquire_lease(lease_req(f"t{i}"))
                    assert isinstance(g, LeaseGrant) and g.lease_id not in seen
                    seen.add(g.lease_id)
                srv = await restart(srv, clock)
                await asyncio.sleep(0.02)
        finally:
            await srv.close()
    assert len(seen) == 12


async def test_reregistration_only_on_a_new_service_and_forgets_removed_or_refused_engines(caplog):
    clock = FakeClock(1000.0)
    srv = PolicyServer(fresh_service(clock), "127.0.0.1", 0)
    await srv.start()
    p3 = ENGINES[0].model_copy(update={"engine_id": "p3", "gpus": ["n0.g3"]})
    async with PolicyClient(srv.address, timeout=5.0, secret=None) as c, \
            PolicyClient(srv.address, timeout=5.0, secret=None, reregister=False) as plain:
        for info in [*ENGINES, p3]:
            await c.register_engine(info)
        await plain.ping()
        for task in list(srv._conns):  # a dropped connection to the same service: nothing to register again
            task.cancel()
        await asyncio.sleep(0.05)
        assert await c.ping() == 1000.0 and c.restarts_seen == 0
        assert registrations(srv) == 3.0
        assert await c.remove_engine("d0") is True  # removed: not resurrected by a restart

        await srv.close()
        clock.now += 1.0
        # The new service runs a one-GPU fabric: p0 (n0.g0) fits, p3 (n0.g3) is refused.
        small = PolicyService(Policy(load_topology("loopback:gpus=1"), PolicyConfig(lease_id_prefix="Lnew")),
                              clock=clock)
        srv = PolicyServer(small, "127.0.0.1", srv.port)
        await srv.start()
        try:
            with caplog.at_level(logging.WARNING, logger="kvlane.policy_client"):
                assert await c.ping() == 1001.0  # the refusal does not fail the caller's call
            assert "p3" in caplog.text and "refused" in caplog.text
            assert [e.engine_id for e in await c.engines()] == ["p0"]
            assert await plain.ping() == 1001.0 and plain.restarts_seen == 1  # reregister=False: tells nothing
            assert c.restarts_seen == 1
        finally:
            await srv.close()
        assert list(c._engines) == ["p0"]  # p3 forgotten: a later restart will not try it again


async def test_an_idle_client_registers_again_in_the_background():
    """An engine that makes no call after the restart is still registered with the new service (otherwise no
    router would pick it, and it would never get the traffic that makes it call)."""
    clock = FakeClock(1000.0)
    srv = PolicyServer(fresh_service(clock), "127.0.0.1", 0)
    await srv.start()
    async with PolicyClient(srv.address, timeout=5.0, secret=None) as c:
        await c.register_engine(ENGINES[0])
        await srv.close()
        await asyncio.sleep(0.3)  # down for a while: the background reconnects back off
        clock.now += 1.0
        srv = PolicyServer(fresh_service(clock), "127.0.0.1", srv.port)
        await srv.start()
        try:
            for _ in range(100):  # backoff is at most 2 s
                if srv.service.policy.engines():
                    break
                await asyncio.sleep(0.05)
            assert [e.engine_id for e in srv.service.policy.engines()] == ["p0"]
            assert c.restarts_seen == 1
        finally:
            await srv.close()
    assert c._reconnector is None  # close() stopped the background reconnects
