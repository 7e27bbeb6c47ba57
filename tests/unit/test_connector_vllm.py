"""Unit tests of the kvlane vLLM connector's parts that run without an engine: request/config validation,
the ordered transfer state, worker->scheduler report aggregation, stats, and the workers' data path over
kvlane.transport (two in-process "ranks" over loopback TCP)."""

from __future__ import annotations

import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

# Importing vLLM alone costs ~10 s of CPU; the tests themselves take a few seconds.
pytestmark = pytest.mark.slow

from kvlane.connector.vllm.layers import PagedLayers  # noqa: E402
from kvlane.connector.vllm.meta import KVLaneStats, KVLaneWorkerMeta, RankReport  # noqa: E402
from kvlane.connector.vllm.params import (  # noqa: E402
    ParamsError,
    TransferState,
    parse_config,
    parse_params,
)

GOOD = {"kvlane": 1, "transfer_id": "t-1", "session_id": "s1", "prefill": "p0", "decode": "d0",
        "policy": "tcp://127.0.0.1:7000", "role": "decode"}


def test_params_valid_and_not_ours():
    p = parse_params(GOOD)
    assert p is not None and p.decode == "d0" and p.role == "decode"
    assert parse_params(None) is None
    assert parse_params({"do_remote_prefill": True}) is None  # another connector's params: not ours
    assert parse_params({**GOOD, "client_key": 1}) == p  # a client's own keys ride along, unchecked


@pytest.mark.parametrize(
    "change, field",
    [({"transfer_id": "has space"}, "transfer_id"), ({"policy": "http://x:1"}, "policy"),
     ({"role": "both"}, "role"), ({"kvlane": 2}, "kvlane"), ({"decode": ""}, "decode"), ({"session_id": 5}, "session_id")],
)
def test_params_malformed_name_the_field(change, field):
    with pytest.raises(ParamsError, match=field):
        parse_params({**GOOD, **change})


def test_params_not_a_map():
    with pytest.raises(ParamsError, match="must be an object"):
        parse_params(["kvlane"])


def test_config_defaults_and_errors():
    cfg = parse_config({"policy": "tcp://127.0.0.1:1", "role": "prefill", "engine_id": "p0"})
    assert cfg.gpu_ids(2) == ["n0.g0", "n0.g1"]
    assert cfg.fault_injection.corrupt_kv is False
    with pytest.raises(ValueError, match="tensor_parallel_size is 2"):
        parse_config({"policy": "tcp://h:1", "role": "prefill", "engine_id": "p0", "gpus": ["a"]}).gpu_ids(2)
    with pytest.raises(ValueError, match="bogus"):
        parse_config({"policy": "tcp://h:1", "role": "prefill", "engine_id": "p0", "bogus": 1})
    with pytest.raises(ValueError, match="role"):
        parse_config({"policy": "tcp://h:1", "role": "router", "engine_id": "p0"})


def test_group_state_is_the_min():
    S = TransferState
    assert S.of_group([S.DONE, S.DONE]) == S.DONE
    assert S.of_group([S.DONE, S.TRANSFERRING]) == S.TRANSFERRING
    assert S.of_group([S.DONE, S.FAILED, S.LEASED]) == S.FAILED


def test_worker_meta_aggregates_across_ranks():
    a = KVLaneWorkerMeta(armed={"r1": 1}, pushed={"r2": [RankReport(0, True, 10, 0.1, "p1")]})
    b = KVLaneWorkerMeta(armed={"r1": 1, "r3": 1}, pushed={"r2": [RankReport(1, False, 4, 0.2, "p2", "boom")]})
    c = a.aggregate(b)
    assert c.armed == {"r1": 2, "r3": 1}
    assert [r.rank for r in c.pushed["r2"]] == [0, 1]
    assert a.armed == {"r1": 1}  # inputs untouched


def test_stats_aggregate_and_reduce():
    s = KVLaneStats()
    assert s.is_empty()
    s.data["push_bytes"].append(2_000_000)
    s.data["push_seconds"].append(0.5)
    s.count("paths", "local")
    t = KVLaneStats(data={"push_bytes": [1_000_000], "push_seconds": [0.5], "paths": {"local": 2},
                          "failures": {"no_lease": 1}})
    s.aggregate(t)
    r = s.reduce()
    assert r["kvlane_pushes"] == 2 and r["kvlane_push_MB"] == 3.0
    assert r["kvlane_push_GBps"] == 0.003  # 3 MB in 1 s
    assert r["kvlane_path[local]"] == 3 and r["kvlane_failures"] == 1


# ------------------------------------------------------------------------- data path (kvlane.transport)

NUM_BLOCKS, HEADS, BS, HD2 = 16, 2, 32, 64
BLOCK_LAYER_BYTES = HEADS * BS * HD2 * 4


def _cache(seed: int, layers: int = 2, hd2: int = HD2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    buf = torch.randn((layers, NUM_BLOCKS, HEADS, BS, hd2), generator=g)
    return {f"model.layers.{i}.self_attn": buf[i] for i in range(layers)}


def _path(role: str, cache: dict[str, torch.Tensor], rank: int = 0, tp: int = 1, **knobs):
    import threading

    from kvlane.connector.vllm.worker import TransportPath

    cfg = parse_config({"policy": POLICY, "role": role, "engine_id": "p0" if role == "prefill" else "d0",
                        "transport": "tcp", **knobs})
    wake = threading.Event()
    return TransportPath(cfg, rank, tp, PagedLayers(cache, BS), wake), wake


def _order(tid: str, src: list[int], dst: list[int], peers: list[bytes], deadline_s: float = 20.0):
    from kvlane.connector.vllm.meta import PushOrder

    return PushOrder("r-" + tid, tid, src, dst, time.monotonic() + deadline_s, ["tcp"], peers)


@pytest.fixture
def pd_paths():
    src, dst = _cache(1), _cache(2)
    made = []

    def make(**d_knobs):
        p, _ = _path("prefill", src)
        d, wake = _path("decode", dst, **d_knobs)
        made.extend([p, d])
        return p, d, wake

    yield src, dst, make
    for x in made:
        x.close()


def test_push_copies_exactly_the_named_blocks_and_wakes_the_worker(pd_paths):
    src, dst, make = pd_paths
    p, d, wake = make()
    before = {k: v.clone() for k, v in dst.items()}
    d.arm("t1", [7, 3, 9], time.monotonic() + 20)
    assert not d.ready() and not wake.is_set()
    res = p.push(_order("t1", [0, 1, 2], [7, 3, 9], [d.descriptor()]), "tcp")
    assert res.ok, res.error
    assert res.bytes == 3 * 2 * BLOCK_LAYER_BYTES and res.path == "tcp"  # 3 blocks x 2 layers
    _until(wake.is_set)  # the worker's idle wait ends when the receive lands
    (r,) = _until(d.poll)
    assert r.ok and r.bytes == res.bytes
    for name in src:
        for s_b, d_b in ((0, 7), (1, 3), (2, 9)):
            assert torch.equal(dst[name][d_b], src[name][s_b])
        untouched = [b for b in range(NUM_BLOCKS) if b not in (7, 3, 9)]
        assert torch.equal(dst[name][untouched], before[name][untouched])


def test_corrupt_kv_flips_the_received_blocks_only(pd_paths):
    src, dst, make = pd_paths
    p, d, _ = make(fault_injection={"corrupt_kv": True})
    keep_src = {k: v.clone() for k, v in src.items()}
    keep_dst = {k: v.clone() for k, v in dst.items()}
    d.arm("t2", [4], time.monotonic() + 20)
    assert p.push(_order("t2", [5], [4], [d.descriptor()]), "tcp").ok
    (r,) = _until(d.poll)
    assert r.ok
    for name in src:
        assert torch.equal(src[name], keep_src[name])  # P's own cache intact
        got = dst[name][4].view(torch.uint8)
        assert torch.equal(got ^ 0x5A, src[name][5].view(torch.uint8))  # exactly the pushed bytes, flipped
        others = [b for b in range(NUM_BLOCKS) if b != 4]
        assert torch.equal(dst[name][others], keep_dst[name][others])


def test_corrupt_kv_is_a_decode_setting():
    with pytest.raises(ValueError, match="decode engine"):
        parse_config({"policy": POLICY, "role": "prefill", "engine_id": "p0", "fault_injection": {"corrupt_kv": True}})


def test_unarmed_push_fails_at_its_deadline_and_writes_nothing(pd_paths):
    src, dst, make = pd_paths
    p, d, _ = make()
    before = {k: v.clone() for k, v in dst.items()}
    res = p.push(_order("never-armed", [0], [1], [d.descriptor()], deadline_s=1.0), "tcp")
    assert not res.ok and "deadline" in res.error
    for name in dst:
        assert torch.equal(dst[name], before[name])


def test_layout_mismatch_is_refused_loudly():
    p, _ = _path("prefill", _cache(1, hd2=32))  # other head size
    d, _ = _path("decode", _cache(2))
    try:
        d.arm("t3", [1], time.monotonic() + 20)
        res = p.push(_order("t3", [0], [1], [d.descriptor()], deadline_s=5.0), "tcp")
        assert not res.ok and "layout" in res.error and "block_shape=2x32x32" in res.error, res.error
    finally:
        p.close()
        d.close()


def test_expired_receive_fails_and_cancel_reports_once(pd_paths):
    _, _, make = pd_paths
    _, d, _ = make()
    d.arm("t4", [2], time.monotonic() + 0.1)
    (r,) = _until(d.poll)
    assert not r.ok and "deadline" in r.error
    d.arm("t5", [3], time.monotonic() + 60)
    d.cancel("t5", "request aborted")
    (r,) = _until(d.poll)
    assert not r.ok and r.error == "request aborted"
    assert d.poll() == []


def test_push_to_a_closed_peer_fails_within_its_deadline(pd_paths):
    _, _, make = pd_paths
    p, d, _ = make()
    desc = d.descriptor()
    d.close()
    t0 = time.monotonic()
    res = p.push(_order("t6", [0], [0], [desc], deadline_s=3.0), "tcp")
    assert not res.ok and time.monotonic() - t0 < 3.0 + 10.0


def test_only_the_granted_path_is_handshaken_and_an_unknown_path_falls_back(pd_paths):
    _, _, make = pd_paths
    p, d, _ = make()
    seen: list[list[str] | None] = []
    real = p.t.connect
    p.t.connect = lambda key, paths=None, deadline=None: seen.append(paths) or real(key, paths=paths, deadline=deadline)
    d.arm("g1", [1], time.monotonic() + 20)
    d.arm("g2", [2], time.monotonic() + 20)
    r1 = p.push(_order("g1", [0], [1], [d.descriptor()]), "tcp")
    r2 = p.push(_order("g2", [0], [2], [d.descriptor()]), "rail7")  # a path this transport does not have
    assert r1.ok and r2.ok, (r1.error, r2.error)
    assert r2.path == "shm"  # the first configured path (the defaults are shm, tcp)
    assert seen == [["tcp"], ["shm"]]  # one handshake per path used, none for the rest


def test_a_timed_out_handshake_is_tried_again_while_the_deadline_allows(pd_paths):
    from kvlane.transport import HandshakeTimeout

    _, _, make = pd_paths
    p, d, _ = make()
    calls = []
    real = p.t._open

    async def flaky(path, desc):  # the first two handshakes time out, as a stalled peer's would
        calls.append(path)
        if len(calls) <= 2:
            raise HandshakeTimeout("handshake with d0/rank0 on path 'tcp' timed out after 10.0s")
        return await real(path, desc)

    p.t._open = flaky
    d.arm("h1", [3], time.monotonic() + 35)
    res = p.push(_order("h1", [0], [3], [d.descriptor()], deadline_s=32.0), "tcp")
    assert res.ok, res.error
    assert calls == ["tcp", "tcp", "tcp"]
    # a deadline too close for another full handshake: the timeout is the push's failure, no second try
    calls.clear()
    p._peers.clear()
    res = p.push(_order("h2", [0], [4], [d.descriptor()], deadline_s=5.0), "tcp")
    assert not res.ok and "HandshakeTimeout" in res.error and calls == ["tcp"]


def test_blockwire_is_gone_with_a_clear_error():
    with pytest.raises(ValueError, match="blockwire.*removed"):
        parse_config({"policy": POLICY, "role": "decode", "engine_id": "d0", "transport": "blockwire"})


# ------------------------------------------------------------------------------------ scheduler side

from types import SimpleNamespace  # noqa: E402

from kvlane.connector.vllm.meta import KVLaneMetadata  # noqa: E402
from kvlane.connector.vllm.scheduler import SchedulerSide  # noqa: E402

PAGE = 16384  # bytes of one block of one layer on one rank
POLICY = "tcp://127.0.0.1:1"


@pytest.fixture
def policy_client():
    from kvlane.integration.policy_service.app import build_policy
    from kvlane.integration.policy_service.client import EmbeddedPolicy, SyncPolicyClient

    policy = build_policy("loopback:gpus=2")
    client = SyncPolicyClient(factory=lambda: EmbeddedPolicy(policy))
    yield client
    client.close()


def _side(role: str, client, **knobs) -> SchedulerSide:
    vcfg = SimpleNamespace(cache_config=SimpleNamespace(block_size=32),
                           parallel_config=SimpleNamespace(tensor_parallel_size=1))
    kcfg = SimpleNamespace(kv_cache_groups=[SimpleNamespace(kv_cache_spec=SimpleNamespace(page_size_bytes=PAGE),
                                                            layer_names=["l0", "l1"])], num_blocks=100)
    eid, gpu = ("p0", "n0.g0") if role == "prefill" else ("d0", "n0.g1")
    cfg = parse_config({"policy": POLICY, "role": role, "engine_id": eid, "gpus": [gpu], **knobs})
    return SchedulerSide(vcfg, kcfg, cfg, client=client)


def _request(role: str, n: int, tid: str = "t-1", **over):
    from vllm.v1.request import RequestStatus

    params = {**GOOD, "transfer_id": tid, "policy": POLICY, "role": role, **over}
    return SimpleNamespace(request_id=f"req-{role}-{tid}", kv_transfer_params=params, num_prompt_tokens=n,
                           status=RequestStatus.FINISHED_LENGTH_CAPPED)


def _until(fn, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError("condition not reached")


def _out(meta=None, sending=(), recving=()):
    return SimpleNamespace(kv_connector_worker_meta=meta, finished_sending=set(sending),
                           finished_recving=set(recving))


def test_decode_claims_the_delta_arms_then_announces(policy_client):
    d = _side("decode", policy_client)
    req = _request("decode", 100)
    assert d.get_num_new_matched_tokens(req, 32) == (68, True)  # D holds the first block locally
    blocks = SimpleNamespace(get_block_ids=lambda: ([40, 41, 42, 43],))
    d.update_state_after_alloc(req, blocks, 68)
    assert d.get_num_new_matched_tokens(req, 32) == (0, False)  # consumed: a preemption does not reload
    meta = d.build_connector_meta(scheduled_tokens=0)
    assert meta.idle  # nothing scheduled: the workers may wait for a completion (worker.WorkerSide._idle_wait)
    (arm,) = meta.arm
    assert arm.dst_blocks == [41, 42, 43] and arm.transfer_id == "t-1"
    # Nothing is announced before the workers confirm the blocks are armed.
    d.update_connector_output(_out(KVLaneWorkerMeta(armed={req.request_id: 1})))
    payload = policy_client.await_announce("t-1", timeout_s=5.0)
    assert payload == {"decode": "d0", "first_block": 1, "block_ids": [41, 42, 43], "num_tokens": 100,
                       "block_size": 32, "tp_size": 1}
    d.update_connector_output(_out(KVLaneWorkerMeta(received={req.request_id: [RankReport(0, True, 3 * 2 * PAGE, 0.01)]}),
                                   recving=[req.request_id]))
    delay, params = d.request_finished(req, [40, 41, 42, 43])
    assert delay is False
    assert params == {"kvlane": 1, "transfer_id": "t-1", "status": "done", "received_bytes": 3 * 2 * PAGE,
                      "received_blocks": 3, "first_block": 1, "block_bytes": 2 * PAGE}
    d.shutdown()


def test_malformed_params_are_ignored_not_fatal(policy_client):
    d = _side("decode", policy_client)
    req = _request("decode", 100, transfer_id="bad id with spaces")
    assert d.get_num_new_matched_tokens(req, 0) == (0, False)
    d.update_state_after_alloc(req, SimpleNamespace(get_block_ids=lambda: ([1, 2, 3, 4],)), 0)
    assert d.build_connector_meta().arm == [] and not d.build_connector_meta(scheduled_tokens=5).idle
    other = _request("decode", 100, tid="t-9", decode="d7")  # addressed to another engine
    assert d.get_num_new_matched_tokens(other, 0) == (0, False)
    d.shutdown()


def test_prefill_pushes_only_announced_blocks_under_a_lease(policy_client):
    p = _side("prefill", policy_client)
    req = _request("prefill", 100, tid="t-2")
    delay, params = p.request_finished(req, [5, 6, 7, 8])
    assert delay is True and params["status"] == "pushing"
    assert p.has_pending_push_work()
    from kvlane.policy.types import EngineInfo, Role

    policy_client.register_engine(EngineInfo(engine_id="d0", role=Role.DECODE, gpus=["n0.g1"]))
    policy_client.register_rank("d0", 0, b"rank-0 descriptor")  # opaque to the scheduler side
    policy_client.announce("t-2", {"decode": "d0", "first_block": 2, "block_ids": [70, 71], "num_tokens": 100,
                                   "block_size": 32, "tp_size": 1})
    metas: list[KVLaneMetadata] = []
    _until(lambda: metas.append(p.build_connector_meta()) or metas[-1].push)
    (order,) = metas[-1].push
    assert p._send[req.request_id].state == TransferState.TRANSFERRING
    assert order.src_blocks == [7, 8] and order.dst_blocks == [70, 71] and order.peers == [b"rank-0 descriptor"]
    (lease,) = policy_client.snapshot()["leases"]
    assert lease["bytes"] == 2 * 2 * PAGE and lease["transfer_id"] == "t-2"
    report = RankReport(0, True, 2 * 2 * PAGE, 0.02, order.paths[0])
    p.update_connector_output(_out(KVLaneWorkerMeta(pushed={req.request_id: [report]}), sending=[req.request_id]))
    _until(lambda: policy_client.snapshot()["leases"] == [])
    assert not p.has_pending_push_work() and req.request_id not in p._send
    stats = p.stats()
    assert stats is not None and stats.data["push_bytes"] == [2 * 2 * PAGE]
    p.shutdown()


def test_prefill_without_announce_frees_its_blocks_at_the_deadline(policy_client):
    p = _side("prefill", policy_client, announce_timeout_s=0.3)
    req = _request("prefill", 64, tid="t-3")
    assert p.request_finished(req, [1, 2])[0] is True
    metas: list[KVLaneMetadata] = []
    _until(lambda: metas.append(p.build_connector_meta()) or metas[-1].drop)
    assert metas[-1].drop == [req.request_id] and not any(m.push for m in metas)
    assert policy_client.snapshot()["leases"] == []
    p.update_connector_output(_out(sending=[req.request_id]))
    assert not p.has_pending_push_work()
    assert p.stats().data["failures"] == {"no_announce": 1}
    p.shutdown()


def test_prefill_refuses_an_announce_for_other_tokens(policy_client):
    p = _side("prefill", policy_client)
    req = _request("prefill", 100, tid="t-4")
    p.request_finished(req, [1, 2, 3, 4])
    policy_client.announce("t-4", {"decode": "d0", "first_block": 0, "block_ids": [9, 9, 9], "num_tokens": 90,
                                   "block_size": 32, "tp_size": 1})
    metas: list[KVLaneMetadata] = []
    _until(lambda: metas.append(p.build_connector_meta()) or metas[-1].drop)
    assert p.stats().data["failures"] == {"announce_mismatch": 1}
    p.shutdown()


def test_decode_cancels_at_once_a_receive_whose_push_failed(policy_client):
    """P's push fails (here: a handshake timeout) -> P releases the lease with ok=false -> D's next poll of the
    policy service cancels the receive, long before recv_timeout_s (120 s here)."""
    d = _side("decode", policy_client, abort_poll_s=0.05)
    p = _side("prefill", policy_client)
    dreq, preq = _request("decode", 100, tid="t-5"), _request("prefill", 100, tid="t-5")
    d.get_num_new_matched_tokens(dreq, 0)
    d.update_state_after_alloc(dreq, SimpleNamespace(get_block_ids=lambda: ([10, 11, 12, 13],)), 100)
    assert d.build_connector_meta().arm
    d.update_connector_output(_out(KVLaneWorkerMeta(armed={dreq.request_id: 1})))
    policy_client.register_rank("d0", 0, b"rank-0 descriptor")
    p.request_finished(preq, [1, 2, 3, 4])
    metas: list[KVLaneMetadata] = []
    _until(lambda: metas.append(p.build_connector_meta()) or metas[-1].push)
    time.sleep(0.2)
    assert all(not m.cancel for m in [d.build_connector_meta()])  # pushing: D keeps waiting
    failed = RankReport(0, False, 0, 10.0, "shm", "HandshakeTimeout: handshake with d0/rank0 timed out")
    p.update_connector_output(_out(KVLaneWorkerMeta(pushed={preq.request_id: [failed]}), sending=[preq.request_id]))
    cancels: list = []
    _until(lambda: cancels.extend(d.build_connector_meta().cancel) or cancels)
    ((rid, why),) = cancels
    assert rid == dreq.request_id and "handshake with d0/rank0 timed out" in why
    time.sleep(0.2)
    assert d.build_connector_meta().cancel == []  # cancelled once
    p.shutdown()
    d.shutdown()


def test_prefill_renews_the_lease_of_a_push_in_flight_and_a_dead_prefill_loses_it():
    """A lease shorter than the push (here 0.4 s; a first push to a D includes its handshakes, a timed-out one
    costs connect_timeout_s) is renewed by P while its workers are still pushing: D keeps waiting and the
    release frees it. Negative control: the same push from a P that stopped (no renewals) loses the lease at
    its expiry, and D is told at once that the KV will not come."""
    from kvlane.integration.policy_service.app import build_policy
    from kvlane.integration.policy_service.client import EmbeddedPolicy, SyncPolicyClient

    policy = build_policy("loopback:gpus=2", lease_ttl_s=0.4)
    client = SyncPolicyClient(factory=lambda: EmbeddedPolicy(policy, sweep_interval=0.05))
    client.register_rank("d0", 0, b"rank-0 descriptor")

    class Shared:  # each side's shutdown closes its client; both sides and the test share this one
        def __getattr__(self, name):
            return getattr(client, name)

        def close(self):
            pass

    def start(tid: str):
        d = _side("decode", Shared(), abort_poll_s=0.05)
        p = _side("prefill", Shared())
        dreq, preq = _request("decode", 100, tid=tid), _request("prefill", 100, tid=tid)
        d.get_num_new_matched_tokens(dreq, 0)
        d.update_state_after_alloc(dreq, SimpleNamespace(get_block_ids=lambda: ([10, 11, 12, 13],)), 100)
        assert d.build_connector_meta().arm
        d.update_connector_output(_out(KVLaneWorkerMeta(armed={dreq.request_id: 1})))
        p.request_finished(preq, [1, 2, 3, 4])
        metas: list[KVLaneMetadata] = []
        _until(lambda: metas.append(p.build_connector_meta()) or metas[-1].push)
        return d, p, preq

    d, p, preq = start("t-r1")
    (lease,) = client.snapshot()["leases"]
    time.sleep(1.5)  # the workers push for ~4 ttls
    assert [x["lease_id"] for x in client.snapshot()["leases"]] == [lease["lease_id"]]
    assert d.build_connector_meta().cancel == [] and client.transfer_status(["t-r1"]) == {}
    done = RankReport(0, True, 4 * 2 * PAGE, 1.5, "default")
    p.update_connector_output(_out(KVLaneWorkerMeta(pushed={preq.request_id: [done]}), sending=[preq.request_id]))
    _until(lambda: client.snapshot()["leases"] == [])
    assert client.snapshot()["counters"]["releases"] == 1 and client.snapshot()["counters"]["expired"] == 0
    p.shutdown()
    d.shutdown()

    d, p, preq = start("t-r2")
    p.shutdown()  # P is gone: nobody renews
    cancels: list = []
    _until(lambda: cancels.extend(d.build_connector_meta().cancel) or cancels)
    ((_, why),) = cancels
    assert "expired before the prefill engine released it" in why
    assert client.snapshot()["counters"]["expired"] == 1
    d.shutdown()
    client.close()


def test_decode_cancels_a_receive_prefill_dropped(policy_client):
    d = _side("decode", policy_client, abort_poll_s=0.05)
    p = _side("prefill", policy_client)
    dreq, preq = _request("decode", 100, tid="t-6"), _request("prefill", 64, tid="t-6")  # P holds other tokens
    d.get_num_new_matched_tokens(dreq, 0)
    d.update_state_after_alloc(dreq, SimpleNamespace(get_block_ids=lambda: ([10, 11, 12, 13],)), 100)
    d.build_connector_meta()
    d.update_connector_output(_out(KVLaneWorkerMeta(armed={dreq.request_id: 1})))
    p.request_finished(preq, [1, 2])
    cancels: list = []
    _until(lambda: cancels.extend(d.build_connector_meta().cancel) or cancels)
    assert cancels[0][0] == dreq.request_id and "announce_mismatch" in cancels[0][1]
    p.shutdown()
    d.shutdown()


def test_prometheus_series_from_stats():
    from kvlane.connector.vllm import KVLaneConnector
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    reg = CollectorRegistry()

    def bind(cls):
        class Bound(cls):
            def __init__(self, *a, **kw):
                super().__init__(*a, registry=reg, **kw)
        return Bound

    types = {Gauge: bind(Gauge), Counter: bind(Counter), Histogram: bind(Histogram)}
    prom = KVLaneConnector.build_prom_metrics(SimpleNamespace(kv_transfer_config=None), types,
                                              ["model_name", "engine"], {0: ["tiny", "0"]})
    stats = KVLaneConnector.build_kv_connector_stats(
        {"push_bytes": [1000, 3000], "push_seconds": [0.01, 0.02], "lease_wait_seconds": [0.5],
         "paths": {"shm": 2}, "failures": {"no_lease": 1}})
    prom.observe(stats.data, 0)
    labels = {"model_name": "tiny", "engine": "0"}
    assert reg.get_sample_value("vllm:kvlane_push_bytes_sum", labels) == 4000
    assert reg.get_sample_value("vllm:kvlane_push_bytes_count", labels) == 2
    assert reg.get_sample_value("vllm:kvlane_lease_wait_seconds_sum", labels) == 0.5
    assert reg.get_sample_value("vllm:kvlane_transfers_by_path_total", {**labels, "path": "shm"}) == 2
    assert reg.get_sample_value("vllm:kvlane_failures_total", {**labels, "reason": "no_lease"}) == 1


def test_transport_path_heterogeneous_tp_moves_head_slices():
    """P at TP=1 (2 KV heads) -> D at TP=2 (1 head per rank): D rank r gets head r of every pushed block."""
    src = _cache(1)  # [blocks, 2 heads, BS, HD2]
    g = torch.Generator().manual_seed(5)
    d_bufs = [torch.randn((2, NUM_BLOCKS, 1, BS, HD2), generator=g) for _ in range(2)]
    dst = [{f"model.layers.{i}.self_attn": b[i] for i in range(2)} for b in d_bufs]
    p, _ = _path("prefill", src, peer_tp=2)
    ds = []
    try:
        for r in range(2):
            ds.append(_path("decode", dst[r], rank=r, tp=2, peer_tp=1)[0])
        for d in ds:
            d.arm("hx", [9, 4], time.monotonic() + 20)
        res = p.push(_order("hx", [2, 3], [9, 4], [d.descriptor() for d in ds]), "tcp")
        assert res.ok, res.error
        assert res.bytes == 2 * 2 * 2 * BS * HD2 * 4  # 2 blocks x 2 layers x 2 heads, over both routes
        for r, d in enumerate(ds):
            (got,) = _until(d.poll)
            assert got.ok and got.bytes == res.bytes // 2
            for name in src:
                assert torch.equal(dst[r][name][9][0], src[name][2][r])
                assert torch.equal(dst[r][name][4][0], src[name][3][r])
    finally:
        p.close()
        for d in ds:
            d.close()


def test_transport_path_p_tp2_to_d_tp1_fills_each_head_slice():
    """P at TP=2 (1 KV head per rank) -> D at TP=1 (2 heads): P rank r fills head r of D's blocks. Each P rank
    pushes to D rank 0 (one descriptor), which the old rank-i check refused for P rank 1."""
    from kvlane.connector.vllm.meta import PushOrder

    g = torch.Generator().manual_seed(6)
    p_bufs = [torch.randn((2, NUM_BLOCKS, 1, BS, HD2), generator=g) for _ in range(2)]
    src = [{f"model.layers.{i}.self_attn": b[i] for i in range(2)} for b in p_bufs]
    dst = _cache(7)
    before = {k: v.clone() for k, v in dst.items()}
    d, _ = _path("decode", dst, peer_tp=2)
    ps = []
    try:
        ps = [_path("prefill", src[r], rank=r, tp=2, peer_tp=1)[0] for r in range(2)]
        d.arm("hy", [5, 6], time.monotonic() + 20)
        order = _order("hy", [1, 8], [5, 6], [d.descriptor()])
        assert [p.missing_peers(order) for p in ps] == [[], []]
        assert ps[1].missing_peers(PushOrder("r", "t", [1], [5], order.deadline, ["tcp"], [])) == [0]
        for p in ps:
            res = p.push(order, "tcp")
            assert res.ok, res.error
        got = []
        _until(lambda: got.extend(d.poll()) or got)
        assert got[0].ok and got[0].bytes == 2 * 2 * 2 * BS * HD2 * 4  # both P ranks' slices, 2 blocks x 2 layers
        for name in dst:
            for r in range(2):
                assert torch.equal(dst[name][5][r], src[r][name][1][0])
                assert torch.equal(dst[name][6][r], src[r][name][8][0])
            others = [b for b in range(NUM_BLOCKS) if b not in (5, 6)]
            assert torch.equal(dst[name][others], before[name][others])
    finally:
        d.close()
        for p in ps:
            p.close()
