"""LeaseKeeper (the holder side of lease renewal) against a real embedded policy service: a held lease outlives
its ttl, a dropped or past-`until` one expires on time, a lease the service no longer knows is reported gone,
and a failing service is retried."""

from __future__ import annotations

import time

import pytest
from kvlane.integration.policy_service.app import build_policy
from kvlane.integration.policy_service.client import EmbeddedPolicy, SyncPolicyClient
from kvlane.integration.policy_service.leases import LeaseKeeper
from kvlane.policy.types import EngineInfo, LeaseGrant, LeaseRequest, Role

TTL = 1.0  # s; renewals every TTL/3, so a loaded machine has ~0.6 s of slack


@pytest.fixture
def client():
    c = SyncPolicyClient(factory=lambda: EmbeddedPolicy(build_policy("loopback:gpus=2", lease_ttl_s=TTL),
                                                        sweep_interval=0.02))
    c.register_engine(EngineInfo(engine_id="p0", role=Role.PREFILL, gpus=["n0.g0"]))
    c.register_engine(EngineInfo(engine_id="d0", role=Role.DECODE, gpus=["n0.g1"]))
    yield c
    c.close()


def _grant(client, tid: str) -> LeaseGrant:
    g = client.acquire_lease(LeaseRequest(transfer_id=tid, prefill="p0", decode="d0", bytes=1 << 10))
    assert isinstance(g, LeaseGrant)
    return g


def _live(client) -> set[str]:
    return {x["lease_id"] for x in client.snapshot()["leases"]}


def test_held_leases_outlive_their_ttl_dropped_and_overdue_ones_expire(client):
    keeper = LeaseKeeper(client)
    kept, dropped, bounded, unheld = (_grant(client, f"t{i}") for i in range(4))
    now = time.monotonic()
    keeper.hold(kept, until=now + 60)
    keeper.hold(dropped, until=now + 60)
    keeper.hold(bounded, until=now + 2 * TTL)  # the transfer's own deadline: no renewal after it
    keeper.drop(dropped.lease_id)
    time.sleep(5 * TTL)
    assert _live(client) == {kept.lease_id}
    assert client.transfer_status([unheld.transfer_id, bounded.transfer_id, kept.transfer_id]).keys() == {
        unheld.transfer_id, bounded.transfer_id}  # D hears of the expired ones, not of the kept one
    assert keeper.held() == [kept.lease_id]
    keeper.drop(kept.lease_id)
    assert client.release_lease(kept.lease_id) is True
    keeper.close()


def test_a_lease_the_service_ended_is_reported_gone_once(client):
    gone: list[str] = []
    keeper = LeaseKeeper(client, on_gone=lambda g: gone.append(g.lease_id))
    g = _grant(client, "t-gone")
    assert client.release_lease(g.lease_id) is True  # ended behind the keeper's back (an operator revoke)
    keeper.hold(g, until=time.monotonic() + 60)
    time.sleep(3 * TTL)
    assert gone == [g.lease_id] and keeper.held() == []
    keeper.close()


def test_renewal_errors_are_retried(client):
    calls: list[str] = []

    class Flaky:
        def renew_lease(self, lease_id):
            calls.append(lease_id)
            if len(calls) <= 2:
                raise ConnectionError("policy service restarting")
            return client.renew_lease(lease_id)

    keeper = LeaseKeeper(Flaky())
    g = _grant(client, "t-flaky")
    keeper.hold(g, until=time.monotonic() + 60)
    time.sleep(0.8 * TTL)  # the first tries fail; one succeeds before the lease's expiry
    time.sleep(4 * TTL)
    assert len(calls) > 3 and _live(client) == {g.lease_id}
    keeper.close()
    time.sleep(2 * TTL)
    assert _live(client) == set()  # closed: nobody renews any more
