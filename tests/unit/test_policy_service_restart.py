"""Policy-service restart on the same port: clients (async and sync) fail fast while it is down, reconnect by
themselves afterwards, and see exactly the state loss docs/reliability.md describes (engines, leases, announces
gone; old lease ids answer False; new lease ids never collide with old ones)."""

from __future__ import annotations

import asyncio
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


async def test_async_client_reconnects_after_a_restart_and_old_state_is_gone():
    clock = FakeClock(1000.0)
    srv = PolicyServer(fresh_service(clock), "127.0.0.1", 0)
    await srv.start()
    port = srv.port
    async with PolicyClient(srv.address, timeout=5.0, secret=None) as c:
        for info in ENGINES:
            await c.register_engine(info)
        old = await c.acquire_lease(lease_req("t1"))
        assert isinstance(old, LeaseGrant)
        await c.announce("t1", {"block_ids": [1, 2]})

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
            assert await c.engines() == []  # engines must register again
            assert await c.release_lease(old.lease_id) is False  # the old lease is unknown: no double free
            with pytest.raises(AnnounceTimeout):
                await c.await_announce("t1", 0.0)  # announces are gone too
            for info in ENGINES:
                await c.register_engine(info)
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
        assert await asyncio.to_thread(client.engines) == []
        await asyncio.to_thread(client.register_engine, ENGINES[0])
        assert [e.engine_id for e in await asyncio.to_thread(client.engines)] == ["p0"]
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
