"""The policy service over real TCP on 127.0.0.1: every op round-trips, bad input gets clear errors and costs
only the offending connection, HMAC auth, the expiry sweep, the announce rendezvous, the sync client."""

from __future__ import annotations

import asyncio
import os
import struct
import threading

import aiohttp
import msgpack
import pytest
from kvlane.integration.policy_service import (
    AnnounceTimeout,
    AuthFailed,
    BadRequest,
    Busy,
    CallTimeout,
    EmbeddedPolicy,
    PayloadTooLarge,
    PolicyClient,
    PolicyServer,
    PolicyService,
    SyncPolicyClient,
    UnknownOp,
    parse_address,
)
from kvlane.integration.policy_service import protocol as P
from kvlane.policy.config import CreditConfig, PolicyConfig
from kvlane.policy.core import Policy
from kvlane.policy.topology import load_topology
from kvlane.policy.types import (
    EngineInfo,
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


class FakeClock:
    """The service clock, driven by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_policy(lease_ttl_s: float = 10.0) -> Policy:
    """The real policy on a 4-GPU loopback fabric (GPUs n0.g0 .. n0.g3)."""
    config = PolicyConfig(credits=CreditConfig(lease_ttl_s=lease_ttl_s))
    return Policy(load_topology("loopback:gpus=4"), config)


def _engines() -> list[EngineInfo]:
    return [
        EngineInfo(engine_id="p0", role=Role.PREFILL, gpus=["n0.g0"], kv_bytes_per_token=1024),
        EngineInfo(engine_id="d0", role=Role.DECODE, gpus=["n0.g1"], kv_bytes_per_token=1024),
    ]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)


@pytest.fixture
async def server(clock):
    svc = PolicyService(make_policy(lease_ttl_s=2.0), clock=clock, sweep_interval=0.02, announce_ttl=5.0)
    async with PolicyServer(svc, "127.0.0.1", 0) as srv:
        yield srv


@pytest.fixture
async def client(server):
    async with PolicyClient(server.address, timeout=10.0) as c:
        yield c


# ---------------------------------------------------------------------------------------------- raw helpers


class Raw:
    """A hand-driven connection, to send what a well-behaved client never would."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hello: dict):
        self.reader, self.writer, self.hello = reader, writer, hello

    @classmethod
    async def open(cls, address: str) -> Raw:
        host, port = parse_address(address)
        reader, writer = await asyncio.open_connection(host, port)
        hello = msgpack.unpackb(await P.read_frame(reader, 1 << 20))["hello"]
        return cls(reader, writer, hello)

    async def send_bytes(self, body: bytes) -> None:
        self.writer.write(struct.pack(">I", len(body)) + body)
        await self.writer.drain()

    async def send(self, obj) -> None:
        await self.send_bytes(msgpack.packb(obj, use_bin_type=True))

    async def recv(self) -> dict:
        return msgpack.unpackb(await asyncio.wait_for(P.read_frame(self.reader, 1 << 20), 10.0))

    async def closed(self) -> bool:
        """True when the server closed the connection (EOF within 10 s)."""
        data = await asyncio.wait_for(self.reader.read(1), 10.0)
        return data == b""

    def close(self) -> None:
        self.writer.close()


# ---------------------------------------------------------------------------------------------- round trips


async def test_every_op_round_trips_over_tcp(client, clock):
    assert await client.ping() == 1000.0
    for info in _engines():
        await client.register_engine(info)
    assert sorted(e.engine_id for e in await client.engines()) == ["d0", "p0"]
    await client.report_load(LoadReport(engine_id="d0", queue_depth=3, memory_pressure=0.5))

    decision = await client.select_pair(PairRequest(request_id="r1", prompt_tokens=100))
    assert (decision.request_id, decision.prefill, decision.decode) == ("r1", "p0", "d0")

    grant = await client.acquire_lease(LeaseRequest(transfer_id="t1", prefill="p0", decode="d0", bytes=1 << 20))
    assert isinstance(grant, LeaseGrant)
    assert (grant.transfer_id, grant.prefill, grant.decode, grant.bytes) == ("t1", "p0", "d0", 1 << 20)
    assert grant.granted_at == 1000.0 and grant.expires_at > 1000.0
    outcome = TransferOutcome(lease_id=grant.lease_id, ok=True, bytes=1 << 20, seconds=0.01)
    assert await client.release_lease(grant.lease_id, outcome) is True
    assert await client.release_lease(grant.lease_id) is False  # idempotent: the second release is a no-op

    snap = await client.snapshot()
    assert isinstance(snap, dict) and snap

    expires = await client.announce("t1", {"blocks": [1, 2, 3], "rank_addr": b"\x00\x01"})
    assert expires == 1005.0
    assert await client.await_announce("t1", timeout_s=1.0) == {"blocks": [1, 2, 3], "rank_addr": b"\x00\x01"}

    await client.register_rank("d0", 1, b"ucx-addr-1")
    await client.register_rank("d0", 0, b"\xff" * 100)
    assert await client.get_ranks("d0") == {0: b"\xff" * 100, 1: b"ucx-addr-1"}
    assert await client.get_ranks("nobody") == {}

    assert await client.remove_engine("d0") is True
    assert await client.get_ranks("d0") == {}  # an engine's descriptors leave with it
    assert [e.engine_id for e in await client.engines()] == ["p0"]


async def test_tp2_lease_on_zcube_carries_one_path_per_rank(clock):
    svc = PolicyService(Policy(load_topology("zcube:n=8,k=2")), clock=clock)
    async with PolicyServer(svc, "127.0.0.1", 0) as srv, PolicyClient(srv.address) as c:
        await c.register_engine(EngineInfo(engine_id="p0", role=Role.PREFILL, gpus=["n0.g0", "n0.g1"]))
        await c.register_engine(EngineInfo(engine_id="d0", role=Role.DECODE, gpus=["n1.g0", "n1.g1"]))
        decision = await c.select_pair(PairRequest(request_id="r1", session_id="s1", prompt_tokens=1000))
        assert (decision.prefill, decision.decode, decision.sticky) == ("p0", "d0", False)
        again = await c.select_pair(PairRequest(request_id="r2", session_id="s1", prompt_tokens=1200))
        assert (again.decode, again.sticky) == ("d0", True)  # the session's home decode engine
        grant = await c.acquire_lease(LeaseRequest(transfer_id="t1", prefill="p0", decode="d0", bytes=512 << 20,
                                                   best_effort_ok=False))
        assert isinstance(grant, LeaseGrant) and grant.klass == "reserved"
        assert [g.rank for g in grant.paths] == [0, 1]
        for g in grant.paths:  # TP rank i -> TP rank i, over two-hop (B) or three-hop (A-B) ZCube paths
            assert g.src_nic.startswith(f"n0.g{g.rank}.") and g.dst_nic.startswith(f"n1.g{g.rank}.")
            assert 2 <= len(g.links) <= 3
        ranks = [RankOutcome(rank=g.rank, path=g.path, bytes=256 << 20, seconds=0.5, ok=True) for g in grant.paths]
        outcome = TransferOutcome(lease_id=grant.lease_id, ok=True, bytes=512 << 20, seconds=0.5, ranks=ranks)
        assert await c.release_lease(grant.lease_id, outcome) is True
        snap = await c.snapshot()
        assert len(snap["paths"]) == 2  # one estimate per rank's path, fed by the outcome
        assert {tuple(p["links"]) for p in snap["paths"]} == {tuple(g.links) for g in grant.paths}
        assert len((await c.snapshot(max_paths=1))["paths"]) == 1
        with pytest.raises(BadRequest, match="max_paths"):
            await c.snapshot(max_paths=0)


async def test_policy_errors_come_back_typed(client):
    with pytest.raises(NoPairAvailable) as exc:
        await client.select_pair(PairRequest(request_id="r1"))
    assert exc.value.code == "no_pair"
    with pytest.raises(UnknownEngine) as exc2:
        await client.report_load(LoadReport(engine_id="ghost"))
    assert "ghost" in str(exc2.value)
    assert await client.ping() == 1000.0  # the connection survived both


async def test_lease_denied_comes_back_as_lease_denied(client):
    for info in _engines():
        await client.register_engine(info)
    grants = []
    denied = None
    for i in range(20):  # reserved-class transfers: D ingress streams run out
        req = LeaseRequest(transfer_id=f"t{i}", prefill="p0", decode="d0", bytes=1 << 30, best_effort_ok=False)
        res = await client.acquire_lease(req)
        if isinstance(res, LeaseDenied):
            denied = res
            break
        grants.append(res)
    assert denied is not None and denied.transfer_id == f"t{len(grants)}" and denied.retry_after > 0
    assert len({g.lease_id for g in grants}) == len(grants) >= 1


async def test_concurrent_calls_share_one_connection(client):
    for info in _engines():
        await client.register_engine(info)
    results = await asyncio.gather(*(client.ping() for _ in range(50)))
    assert results == [1000.0] * 50


# ---------------------------------------------------------------------------------------------- bad input


async def test_oversized_frame_closes_only_that_connection(server, client):
    raw = await Raw.open(server.address)
    # Only the length prefix: a server that tried to read the 2 MiB body would wait forever.
    raw.writer.write(struct.pack(">I", 2 << 20))
    await raw.writer.drain()
    reply = await raw.recv()
    assert reply["ok"] is False and reply["error"]["code"] == "frame_too_large"
    assert str(2 << 20) in reply["error"]["message"]
    assert await raw.closed()
    raw.close()
    assert await client.ping() == 1000.0  # another connection is unaffected
    raw2 = await Raw.open(server.address)  # and new ones are accepted
    await raw2.send({"v": 1, "id": 7, "op": "ping", "body": {}})
    assert (await raw2.recv())["ok"] is True
    raw2.close()


async def test_configured_frame_limit_applies(clock):
    svc = PolicyService(make_policy(), clock=clock)
    async with PolicyServer(svc, "127.0.0.1", 0, max_frame=4096) as srv:
        async with PolicyClient(srv.address) as c:
            with pytest.raises(P.FrameTooLarge):  # refused client-side, before sending
                await c.announce("t", {"x": "y" * 5000})
        raw = await Raw.open(srv.address)
        assert raw.hello["max_frame"] == 4096
        await raw.send({"v": 1, "id": 1, "op": "announce", "body": {"transfer_id": "t", "payload": {"x": "y" * 5000}}})
        assert (await raw.recv())["error"]["code"] == "frame_too_large"
        assert await raw.closed()
        raw.close()


async def test_stalled_frame_body_closes_the_connection(clock):
    svc = PolicyService(make_policy(), clock=clock)
    async with PolicyServer(svc, "127.0.0.1", 0, frame_timeout=0.2) as srv:
        raw = await Raw.open(srv.address)
        raw.writer.write(struct.pack(">I", 100) + b"\x80" * 10)  # announces 100 bytes, sends 10, stalls
        await raw.writer.drain()
        reply = await raw.recv()
        assert reply["id"] == 0 and reply["error"]["code"] == "frame_timeout" and "100 bytes" in reply["error"]["message"]
        assert await raw.closed()
        raw.close()
        idle = await Raw.open(srv.address)  # an idle connection (no frame started) is not timed out
        await asyncio.sleep(0.4)
        await idle.send({"v": 1, "id": 1, "op": "ping", "body": {}})
        assert (await idle.recv())["ok"] is True
        idle.close()


async def test_garbage_msgpack_is_an_error_and_the_connection_stays(server):
    raw = await Raw.open(server.address)
    await raw.send_bytes(b"\xc1\xc1\xc1")  # 0xc1 is never valid msgpack
    reply = await raw.recv()
    assert reply["ok"] is False and reply["error"]["code"] == "bad_request"
    assert "msgpack" in reply["error"]["message"]
    await raw.send([1, 2, 3])  # valid msgpack, not an envelope
    reply = await raw.recv()
    assert reply["error"]["code"] == "bad_request" and "envelope" in reply["error"]["message"]
    await raw.send({"v": 1, "id": "seven", "op": "ping", "body": {}})
    reply = await raw.recv()
    assert reply["error"]["code"] == "bad_request" and "id" in reply["error"]["message"]
    await raw.send({"v": 2, "id": 3, "op": "ping", "body": {}})
    reply = await raw.recv()
    assert reply["id"] == 3 and "version 2" in reply["error"]["message"]
    await raw.send({"v": 1, "id": 4, "op": "ping", "body": {}})
    reply = await raw.recv()
    assert reply["id"] == 4 and reply["ok"] is True and reply["body"]["server_time"] == 1000.0
    raw.close()


async def test_unknown_op_is_named(server, client):
    raw = await Raw.open(server.address)
    await raw.send({"v": 1, "id": 9, "op": "launch_missiles", "body": {}})
    reply = await raw.recv()
    assert reply["id"] == 9 and reply["error"]["code"] == "unknown_op"
    assert "launch_missiles" in reply["error"]["message"]
    raw.close()
    with pytest.raises(UnknownOp, match="frobnicate"):
        await client._call("frobnicate", {})


async def test_wrong_body_field_is_named(server, client):
    raw = await Raw.open(server.address)
    await raw.send({"v": 1, "id": 1, "op": "select_pair", "body": {"request_id": "r", "prompt_tokens": "lots"}})
    reply = await raw.recv()
    assert reply["error"]["code"] == "bad_request" and "prompt_tokens" in reply["error"]["message"]
    await raw.send({"v": 1, "id": 2, "op": "report_load", "body": {"engine_id": "d0", "colour": "red"}})
    reply = await raw.recv()
    assert reply["error"]["code"] == "bad_request" and "colour" in reply["error"]["message"]
    await raw.send({"v": 1, "id": 3, "op": "register_rank", "body": {"engine_id": "d0", "rank": 0, "descriptor": "str"}})
    reply = await raw.recv()
    assert "descriptor" in reply["error"]["message"]
    await raw.send({"v": 1, "id": 4, "op": "ping", "body": {}})
    assert (await raw.recv())["ok"] is True
    raw.close()
    with pytest.raises(BadRequest, match="timeout_s"):
        await client._call("await_announce", {"transfer_id": "t", "timeout_s": -1})
    with pytest.raises(BadRequest, match="descriptor"):
        await client.register_rank("d0", 0, b"x" * (P.MAX_RANK_DESCRIPTOR + 1))


# ---------------------------------------------------------------------------------------------- auth


@pytest.fixture
async def secure_server(clock):
    svc = PolicyService(make_policy(), clock=clock)
    async with PolicyServer(svc, "127.0.0.1", 0, secret=b"s3cret") as srv:
        yield srv


async def test_right_secret_works(secure_server):
    async with PolicyClient(secure_server.address, secret=b"s3cret") as c:
        assert await c.ping() == 1000.0
        for info in _engines():
            await c.register_engine(info)
        assert len(await c.engines()) == 2
        # pipelined calls: ids must reach the server in increasing order, or auth would refuse them
        assert await asyncio.gather(*(c.ping() for _ in range(30))) == [1000.0] * 30


async def test_client_takes_the_secret_from_the_environment(secure_server, monkeypatch):
    monkeypatch.setenv("KVLANE_SECRET", "s3cret")
    async with PolicyClient(secure_server.address) as c:
        assert await c.ping() == 1000.0
    c = PolicyClient(secure_server.address, secret=None)  # explicitly none: refused
    with pytest.raises(AuthFailed):
        await c.ping()
    await c.close()


async def test_wrong_secret_is_auth_failed(secure_server):
    async with PolicyClient(secure_server.address, secret=b"guess") as c:
        with pytest.raises(AuthFailed) as exc:
            await c.ping()
        assert exc.value.code == "auth_failed"


async def test_missing_secret_is_refused(secure_server):
    c = PolicyClient(secure_server.address)
    with pytest.raises(AuthFailed, match="secret"):
        await c.ping()  # the hello says auth is required: the client refuses before sending
    await c.close()
    raw = await Raw.open(secure_server.address)
    assert raw.hello["auth"] is True
    await raw.send({"v": 1, "id": 1, "op": "ping", "body": {}})
    reply = await raw.recv()
    assert reply["error"]["code"] == "auth_failed" and "missing" in reply["error"]["message"]
    assert await raw.closed()
    raw.close()


async def test_wrong_mac_closes_and_replay_is_refused(secure_server):
    raw = await Raw.open(secure_server.address)
    mac = P.compute_mac(b"s3cret", raw.hello["nonce"], 5, "ping", {})
    frame = {"v": 1, "id": 5, "op": "ping", "body": {}, "auth": mac}
    await raw.send(frame)
    assert (await raw.recv())["ok"] is True
    await raw.send(frame)  # same id again on the same connection
    reply = await raw.recv()
    assert reply["error"]["code"] == "auth_failed" and "replay" in reply["error"]["message"]
    assert await raw.closed()
    raw.close()

    raw2 = await Raw.open(secure_server.address)  # a new connection has a new nonce
    assert raw2.hello["nonce"] != raw.hello["nonce"]
    await raw2.send(frame)
    assert (await raw2.recv())["error"]["code"] == "auth_failed"
    assert await raw2.closed()
    raw2.close()

    raw3 = await Raw.open(secure_server.address)  # a MAC for another body does not cover this one
    good = P.compute_mac(b"s3cret", raw3.hello["nonce"], 1, "ping", {})
    await raw3.send({"v": 1, "id": 1, "op": "snapshot", "body": {}, "auth": good})
    assert (await raw3.recv())["error"]["code"] == "auth_failed"
    assert await raw3.closed()
    raw3.close()


async def test_junk_from_an_unauthenticated_peer_closes(secure_server):
    raw = await Raw.open(secure_server.address)
    await raw.send_bytes(b"\xc1")
    reply = await raw.recv()
    assert reply["error"]["code"] == "bad_request" and "msgpack" in reply["error"]["message"]
    assert await raw.closed()
    raw.close()


async def test_no_secret_means_no_auth(server):
    raw = await Raw.open(server.address)
    assert raw.hello["auth"] is False
    await raw.send({"v": 1, "id": 1, "op": "ping", "body": {}})
    assert (await raw.recv())["ok"] is True
    raw.close()


def test_load_secret(tmp_path):
    f = tmp_path / "secret"
    f.write_bytes(b"  abc\n")
    assert P.load_secret(str(f), env={}) == b"abc"
    assert P.load_secret(None, env={"KVLANE_SECRET": "xyz"}) == b"xyz"
    assert P.load_secret(None, env={}) is None
    f.write_bytes(b"\n")
    with pytest.raises(ValueError, match="empty"):
        P.load_secret(str(f), env={})


# ---------------------------------------------------------------------------------------------- sweep


def expired_count(server: PolicyServer) -> float:
    return server.service.metrics.registry.get_sample_value("kvlane_policy_leases_expired_total")


async def _one_lease(client: PolicyClient) -> LeaseGrant:
    for info in _engines():
        await client.register_engine(info)
    grant = await client.acquire_lease(LeaseRequest(transfer_id="t1", prefill="p0", decode="d0", bytes=1 << 20,
                                                    best_effort_ok=False))
    assert isinstance(grant, LeaseGrant)
    return grant


async def _swept(server: PolicyServer, expired: int) -> None:
    for _ in range(500):  # the sweep runs every 20 ms; allow a loaded machine 10 s
        if expired_count(server) == expired:
            return
        await asyncio.sleep(0.02)
    assert expired_count(server) == expired


async def test_unreleased_lease_expires_via_the_sweep(server, client, clock):
    grant = await _one_lease(client)
    await asyncio.sleep(0.1)  # several sweeps with the clock standing still: nothing expires
    assert expired_count(server) == 0
    clock.now = grant.expires_at + 0.001
    await _swept(server, 1)
    assert await client.release_lease(grant.lease_id) is False  # expired: cannot be released any more


async def test_a_renewed_lease_outlives_its_ttl_and_an_expired_one_cannot_be_renewed(server, client, clock):
    grant = await _one_lease(client)
    ttl = grant.expires_at - grant.granted_at
    for _ in range(3):  # the holder renews before each expiry: the sweep never ends it
        clock.now += 0.9 * ttl
        assert await client.renew_lease(grant.lease_id) == pytest.approx(clock.now + ttl)
        await asyncio.sleep(0.06)
        assert expired_count(server) == 0
    renewed = server.service.metrics.registry.get_sample_value("kvlane_policy_leases_renewed_total")
    assert renewed == 3
    clock.now += ttl + 0.001  # the holder stops renewing (died): the lease expires
    await _swept(server, 1)
    assert await client.renew_lease(grant.lease_id) is None  # gone: renewing does not bring it back
    assert await client.release_lease(grant.lease_id) is False
    assert await client.renew_lease("L-unknown") is None


# ---------------------------------------------------------------------------------------------- rendezvous


async def test_waiter_gets_payload_announced_later(server):
    async with PolicyClient(server.address) as prefill, PolicyClient(server.address) as decode:
        waiter = asyncio.create_task(prefill.await_announce("xfer-9", timeout_s=3.0))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        assert await prefill.ping() == 1000.0  # the long poll does not block the connection
        await decode.announce("xfer-9", {"rank0": {"blocks": [4, 5]}})
        assert await asyncio.wait_for(waiter, 3.0) == {"rank0": {"blocks": [4, 5]}}


async def test_long_polls_per_connection_are_bounded(clock):
    svc = PolicyService(make_policy(), clock=clock)
    async with PolicyServer(svc, "127.0.0.1", 0, max_waiters=2) as srv, PolicyClient(srv.address) as c:
        waiters = [asyncio.create_task(c.await_announce(f"t{i}", timeout_s=3.0)) for i in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(Busy, match="limit 2"):
            await c.await_announce("t2", timeout_s=3.0)
        assert await c.ping() == 1000.0  # ordinary ops are not held up behind the long polls
        await c.announce("t0", {"n": 0})
        await c.announce("t1", {"n": 1})
        assert await asyncio.gather(*waiters) == [{"n": 0}, {"n": 1}]
        assert await c.await_announce("t0", timeout_s=0.1) == {"n": 0}  # slots are free again


async def test_await_announce_timeout_is_clear(client):
    with pytest.raises(AnnounceTimeout, match="xfer-0") as exc:
        await client.await_announce("xfer-0", timeout_s=0.05)
    assert exc.value.code == "announce_timeout"
    with pytest.raises(CallTimeout):  # the client's own deadline, shorter than the server's wait
        await client.await_announce("xfer-0", timeout_s=5.0, timeout=0.05)
    assert await client.ping() == 1000.0


async def test_oversized_announce_refused(client):
    with pytest.raises(PayloadTooLarge, match="65536"):
        await client.announce("t", {"kv": b"x" * (64 * 1024)})
    await client.announce("t", {"kv": b"x" * (60 * 1024)})


async def test_announce_expires_after_ttl(server, client, clock):
    await client.announce("t", {"a": 1})
    clock.now += 5.0  # ttl is 5 s
    with pytest.raises(AnnounceTimeout):
        await client.await_announce("t", timeout_s=0.05)


async def test_decode_learns_which_transfers_ended_without_their_kv(server, client, clock):
    for info in _engines():
        await client.register_engine(info)
    assert await client.transfer_status(["t-ok", "t-bad", "t-gone", "t-drop"]) == {}

    async def lease(tid: str) -> LeaseGrant:
        g = await client.acquire_lease(LeaseRequest(transfer_id=tid, prefill="p0", decode="d0", bytes=1 << 10))
        assert isinstance(g, LeaseGrant)
        return g

    ok, bad = await lease("t-ok"), await lease("t-bad")
    await client.release_lease(ok.lease_id, TransferOutcome(lease_id=ok.lease_id, ok=True, bytes=1 << 10, seconds=0.01))
    await client.release_lease(bad.lease_id, TransferOutcome(lease_id=bad.lease_id, ok=False, bytes=0, seconds=10.0,
                                                             error="PeerError: handshake timed out"))
    await lease("t-gone")  # P dies holding it: the lease (ttl 2 s here) expires
    await client.abort_transfer("t-drop", "announce_mismatch: 3 blocks announced, 2 held")
    await client.abort_transfer("t-drop", "a second reason is ignored")
    clock.now += 2.5
    await asyncio.sleep(0.1)  # the sweep (every 20 ms) expires the lease
    got = await client.transfer_status(["t-ok", "t-bad", "t-gone", "t-drop", "t-unknown"])
    assert sorted(got) == ["t-bad", "t-drop", "t-gone"]
    assert "handshake timed out" in got["t-bad"] and "expired" in got["t-gone"]
    assert got["t-drop"] == "prefill gave the transfer up: announce_mismatch: 3 blocks announced, 2 held"
    clock.now += 5.0  # the board's ttl (announce_ttl, 5 s here)
    await asyncio.sleep(0.1)
    assert await client.transfer_status(["t-bad", "t-gone", "t-drop"]) == {}
    with pytest.raises(P.BadRequest, match="transfer_ids"):
        await client.transfer_status([f"t{i}" for i in range(P.MAX_STATUS_IDS + 1)])


# ---------------------------------------------------------------------------------------------- clients


async def test_sync_client_from_a_plain_thread(server):
    out: dict = {}

    def worker() -> None:
        with SyncPolicyClient(server.address, timeout=3.0) as c:
            out["ping"] = c.ping()
            for info in _engines():
                c.register_engine(info)
            out["pair"] = c.select_pair(PairRequest(request_id="r1"))
            c.announce("t7", {"k": 1})
            out["payload"] = c.await_announce("t7", timeout_s=1.0)
            try:
                c.await_announce("none", timeout_s=0.05)
            except AnnounceTimeout as exc:
                out["timeout"] = exc.code

    t = threading.Thread(target=worker)
    t.start()
    await asyncio.to_thread(t.join, 10.0)
    assert out["ping"] == 1000.0
    assert (out["pair"].prefill, out["pair"].decode) == ("p0", "d0")
    assert out["payload"] == {"k": 1}
    assert out["timeout"] == "announce_timeout"


async def test_client_reconnects_after_a_dropped_connection(server, client):
    assert await client.ping() == 1000.0
    for task in list(server._conns):  # the server drops every connection
        task.cancel()
    await asyncio.sleep(0.05)
    assert await client.ping() == 1000.0  # idempotent: reconnects and goes through
    assert len(server._conns) == 1


async def test_unreachable_server_is_connection_lost():
    srv = PolicyServer(PolicyService(make_policy()), "127.0.0.1", 0)
    await srv.start()
    address = srv.address
    await srv.close()
    c = PolicyClient(address, timeout=1.0)
    with pytest.raises(P.ConnectionLost, match="cannot connect"):
        await c.ping()
    await c.close()


async def test_embedded_policy_same_api(clock):
    async with EmbeddedPolicy(make_policy(), clock=clock) as emb:
        assert await emb.ping() == 1000.0
        for info in _engines():
            await emb.register_engine(info)
        decision = await emb.select_pair(PairRequest(request_id="r1"))
        assert (decision.prefill, decision.decode) == ("p0", "d0")
        with pytest.raises(BadRequest, match="prompt_tokens"):
            await emb._call("select_pair", {"request_id": "r", "prompt_tokens": -1})
        await emb.announce("t", {"x": b"\x00"})
        assert await emb.await_announce("t", 0.1) == {"x": b"\x00"}


def test_sync_client_over_embedded_policy():
    with SyncPolicyClient(factory=lambda: EmbeddedPolicy(make_policy(), clock=lambda: 5.0)) as c:
        assert c.ping() == 5.0
        for info in _engines():
            c.register_engine(info)
        assert sorted(e.engine_id for e in c.engines()) == ["d0", "p0"]


def test_sync_client_refuses_use_after_close_and_in_a_forked_child():
    c = SyncPolicyClient(factory=lambda: EmbeddedPolicy(make_policy(), clock=lambda: 5.0))
    assert c.ping() == 5.0
    pid = os.fork()
    if pid == 0:  # child: the loop thread did not survive the fork; the call must fail at once, not hang
        try:
            c.ping(timeout=30.0)
        except P.ServiceError as exc:
            os._exit(0 if exc.code == "wrong_process" else 1)
        os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert c.ping() == 5.0  # the parent's client is unaffected
    c.close()
    with pytest.raises(P.ConnectionLost, match="closed"):
        c.ping()


def test_parse_address():
    assert parse_address("tcp://127.0.0.1:7000") == ("127.0.0.1", 7000)
    assert parse_address("tcp://[::1]:7000") == ("::1", 7000)
    for bad in ("127.0.0.1:7000", "tcp://host", "tcp://:80", "tcp://h:99999", "http://h:1"):
        with pytest.raises(ValueError):
            parse_address(bad)


# ---------------------------------------------------------------------------------------------- metrics


async def test_metrics_endpoint(clock):
    svc = PolicyService(make_policy(), clock=clock)
    async with PolicyServer(svc, "127.0.0.1", 0, metrics_port=0) as srv:
        async with PolicyClient(srv.address) as c:
            for info in _engines():
                await c.register_engine(info)
            await c.select_pair(PairRequest(request_id="r1"))
            await c.acquire_lease(LeaseRequest(transfer_id="t", prefill="p0", decode="d0", bytes=100))
            with pytest.raises(UnknownEngine):
                await c.report_load(LoadReport(engine_id="ghost"))
        assert srv.metrics_address is not None and srv.metrics_port != 0
        async with aiohttp.ClientSession() as http, http.get(srv.metrics_address) as resp:
            assert resp.status == 200
            text = await resp.text()
    assert 'kvlane_policy_requests_total{op="register_engine"} 2.0' in text
    assert 'kvlane_policy_requests_total{op="select_pair"} 1.0' in text
    assert "kvlane_policy_leases_granted_total" in text
    assert 'kvlane_policy_errors_total{code="unknown_engine"} 1.0' in text
    assert 'kvlane_policy_decision_seconds_count{op="select_pair"} 1.0' in text
