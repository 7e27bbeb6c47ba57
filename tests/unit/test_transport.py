"""kvlane.transport end to end between two processes on loopback, for both backends: bytes land
exactly where asked, refusals (rank, layout, mismatched offer) are loud, deadlines turn into clear
failures, and a SIGKILLed peer never hangs or takes down the survivor."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kvlane.transport import (
    BlockCopy,
    BlockShape,
    KVTransport,
    LayoutMismatchError,
    RankMismatchError,
    TransportConfig,
    block_copies,
)
from kvlane.transport.ranks import routes_between

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the child-process helper lives next to this file
from transport_cases import BACKENDS, BLOCK, PATH, SHAPE  # noqa: E402
from transport_peer import Peer, make_regions  # noqa: E402

P_BLOCKS, D_BLOCKS = 16, 24


def config(backend: str, **kw: Any) -> dict[str, Any]:
    paths = {"tcp": {}} if backend == "tcp" else {"shm": {"ucx": {"TLS": "sm,self"}}}
    return {"backend": backend, "paths": paths, "tp_size": 2, "connect_timeout_s": 5.0, **kw}


def init(peer: Peer, backend: str, *, rank: int = 0, blocks: int = D_BLOCKS, block_shape: list[int] = BLOCK,
         dtype: str = "float16", seed: int | None = None, tag: str = "", n_regions: int = 2, **cfg: Any) -> bytes:
    r = peer.call(op="init", engine="D", rank=rank, config=config(backend, **cfg), n_regions=n_regions,
                  num_blocks=blocks, block_shape=block_shape, dtype=dtype, seed=seed, layout_tag=tag)
    assert "error" not in r, r
    return r["descriptor"]


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit equality (random fp16 bytes contain NaNs)."""
    return a.shape == b.shape and a.tobytes() == b.tobytes()


def rows(copies: list[BlockCopy]) -> list[list[int]]:
    return [[c.region, c.src_offset, c.dst_offset, c.nbytes] for c in copies]


def child_regions(peer: Peer, blocks: int = D_BLOCKS) -> list[np.ndarray]:
    return [np.frombuffer(b, np.float16).reshape(blocks, *BLOCK) for b in peer.call(op="regions")["regions"]]


@pytest.fixture(scope="module", params=BACKENDS)
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[str, KVTransport, list[np.ndarray], Peer]]:
    backend = request.param
    d = Peer()
    SPARES[:] = [Peer(), Peer()]  # started now, so their interpreters boot while the first tests run
    src = make_regions(2, P_BLOCKS, BLOCK, "float16", seed=7)
    p = KVTransport("P", 0, TransportConfig.model_validate(config(backend)))
    p.register_regions(src)
    yield backend, p, src, d
    p.close()
    d.stop()
    for spare in SPARES:
        spare.stop()


#: Pre-started child processes for the tests that SIGKILL their peer.
SPARES: list[Peer] = []


def spare() -> Peer:
    return SPARES.pop() if SPARES else Peer()


def test_push_lands_exact_bytes_and_leaves_other_blocks(pair: Any) -> None:
    backend, p, src, d = pair
    handle = p.connect(init(d, backend))  # fresh zeroed regions
    plan = {0: ([1, 2, 3, 9], [20, 21, 22, 4]), 1: ([0, 15], [23, 0])}
    copies = [c for r, (s, t) in plan.items() for c in block_copies(r, s, t, SHAPE)]
    assert len(copies) == 4  # 1,2,3 → 20,21,22 coalesced
    assert d.call(op="expect", tid="req-1", copies=rows(copies), deadline=10.0) == {"armed": True}
    res = p.push(handle, "req-1", PATH[backend], copies, deadline_s=10.0).result(15)
    assert res.ok, res.error
    assert res.bytes == 6 * 256 and res.path == PATH[backend]
    assert [name for name, _ in res.phases] == ["arm", "send", "confirm"]  # the push's steps, for its log line
    assert 0 < sum(sec for _, sec in res.phases) <= res.seconds  # the steps partition the push (plus reporting)
    rec = d.call(op="result", tid="req-1")
    assert rec["ok"] and rec["bytes"] == 6 * 256, rec
    got = child_regions(d)
    for r, (s, t) in plan.items():
        assert same(got[r][t], src[r][s])
        untouched = [b for b in range(D_BLOCKS) if b not in t]
        assert not got[r][untouched].any()


def test_several_runs_travel_packed_and_land_like_separate_ones(pair: Any) -> None:
    """Scattered blocks (no two runs adjacent) go as one gathered message (Offer.packed) and are scattered into
    exactly the named blocks; the same push with packing off (pack_max_bytes=0 on the sender) lands the same."""
    backend, p, src, d = pair
    handle = p.connect(init(d, backend))
    plan = {0: ([0, 2, 4, 6], [15, 11, 7, 3]), 1: ([1, 3], [9, 1])}
    copies = [c for r, (s, t) in plan.items() for c in block_copies(r, s, t, SHAPE)]
    assert len(copies) == 6
    decisions: list[bool] = []
    real = p._packs
    p._packs = lambda runs, n: decisions.append(real(runs, n)) or decisions[-1]  # type: ignore[method-assign]
    try:
        assert d.call(op="expect", tid="pk-1", copies=rows(copies), deadline=10.0) == {"armed": True}
        res = p.push(handle, "pk-1", PATH[backend], copies, deadline_s=10.0).result(15)
        assert res.ok, res.error
    finally:
        p._packs = real  # type: ignore[method-assign]
    assert decisions == [True] and res.bytes == 6 * 256
    got = child_regions(d)
    for r, (s, t) in plan.items():
        assert same(got[r][t], src[r][s])
        assert not got[r][[b for b in range(D_BLOCKS) if b not in t]].any()
    unpacked = TransportConfig.model_validate(config(backend, pack_max_bytes=0))
    with KVTransport("P", 0, unpacked) as p2:
        p2.register_regions(src)
        assert not p2._packs(list(copies), 6 * 256)
        h2 = p2.connect(init(d, backend))  # fresh zeroed regions
        assert d.call(op="expect", tid="pk-2", copies=rows(copies), deadline=10.0) == {"armed": True}
        assert p2.push(h2, "pk-2", PATH[backend], copies, deadline_s=10.0).result(15).ok
        assert [same(a, b) for a, b in zip(child_regions(d), got, strict=True)] == [True, True]


def test_offer_before_expect_waits_for_the_receiver(pair: Any) -> None:
    backend, p, src, d = pair
    handle = p.connect(init(d, backend))
    copies = block_copies(0, [5], [6], SHAPE)
    fut = p.push(handle, "req-early", PATH[backend], copies, deadline_s=10.0)
    time.sleep(0.2)
    assert not fut.done()
    d.call(op="expect", tid="req-early", copies=rows(copies), deadline=10.0)
    assert fut.result(15).ok
    assert d.call(op="result", tid="req-early")["ok"]
    assert same(child_regions(d)[0][6], src[0][5])


def test_concurrent_pushes_on_one_link_all_land(pair: Any) -> None:
    backend, p, src, d = pair
    handle = p.connect(init(d, backend))
    jobs = {f"req-c{i}": block_copies(i % 2, [i, i + 8], [2 * i, 2 * i + 1], SHAPE) for i in range(6)}
    for tid, copies in jobs.items():
        d.call(op="expect", tid=tid, copies=rows(copies), deadline=15.0)
    futs = {tid: p.push(handle, tid, PATH[backend], copies, deadline_s=15.0) for tid, copies in jobs.items()}
    for tid, f in futs.items():
        res = f.result(20)
        assert res.ok and res.bytes == 512, res
        assert d.call(op="result", tid=tid)["ok"]
    got = child_regions(d)
    for i in range(6):
        assert same(got[i % 2][[2 * i, 2 * i + 1]], src[i % 2][[i, i + 8]])
    assert handle.broken_paths() == {}


def test_receiver_deadline_expires_with_clear_error(pair: Any) -> None:
    backend, _, _, d = pair
    init(d, backend)
    t0 = time.monotonic()
    d.call(op="expect", tid="req-late", copies=[[0, 0, 0, 256]], deadline=0.3)
    res = d.call(op="result", tid="req-late")
    assert not res["ok"] and res["bytes"] == 0
    assert "deadline of 0.3s expired" in res["error"] and "req-late" in res["error"]
    assert time.monotonic() - t0 < 3.0


def test_cancelled_expect_resolves_at_once(pair: Any) -> None:
    _, p, _, _ = pair
    t0 = time.monotonic()
    fut = p.expect("req-cancel", [BlockCopy(0, 0, 0, 256)], deadline_s=30.0)
    p.cancel("req-cancel")
    p.cancel("req-never-expected")  # unknown ids are ignored
    res = fut.result(5)
    assert not res.ok and res.error == "expect('req-cancel') cancelled by the receiver"
    assert time.monotonic() - t0 < 2.0


def test_offer_that_differs_from_expect_is_refused_on_both_sides(pair: Any) -> None:
    backend, p, _, d = pair
    handle = p.connect(init(d, backend))
    d.call(op="expect", tid="req-bad", copies=rows(block_copies(0, [0], [1], SHAPE)), deadline=5.0)
    res = p.push(handle, "req-bad", PATH[backend], block_copies(0, [0], [2], SHAPE), deadline_s=5.0).result(10)
    assert not res.ok and "differ from the expected" in res.error
    rec = d.call(op="result", tid="req-bad")
    assert not rec["ok"] and "differ from the expected" in rec["error"]


def test_sender_deadline_when_nobody_expects(pair: Any) -> None:
    backend, p, _, d = pair
    handle = p.connect(init(d, backend))
    t0 = time.monotonic()
    res = p.push(handle, "req-orphan", PATH[backend], block_copies(0, [0], [0], SHAPE), deadline_s=0.4).result(5)
    assert not res.ok and "deadline of 0.4s expired while waiting for the receiver to arm" in res.error
    assert time.monotonic() - t0 < 2.0


def test_bad_copies_refused_before_anything_moves(pair: Any) -> None:
    backend, p, _, d = pair
    handle = p.connect(init(d, backend))
    with pytest.raises(ValueError, match="past peer region 0"):
        p.push(handle, "x", PATH[backend], [BlockCopy(0, 0, D_BLOCKS * 256 - 8, 256)], 1.0)
    with pytest.raises(ValueError, match="source range ends past our region"):
        p.push(handle, "x", PATH[backend], [BlockCopy(1, P_BLOCKS * 256, 0, 1)], 1.0)
    with pytest.raises(ValueError, match="overlap"):
        p.push(handle, "x", PATH[backend], [BlockCopy(0, 0, 0, 256), BlockCopy(0, 512, 128, 256)], 1.0)
    with pytest.raises(ValueError, match="transfer id"):
        p.push(handle, "bad id!", PATH[backend], [BlockCopy(0, 0, 0, 1)], 1.0)


def test_rank_and_layout_mismatch_refused(pair: Any) -> None:
    backend, p, _, d = pair
    with pytest.raises(RankMismatchError, match="may only talk to TP rank 0"):
        p.connect(init(d, backend, rank=1))
    with pytest.raises(LayoutMismatchError, match="block bytes 512 != ours 256"):
        p.connect(init(d, backend, block_shape=[4, 4, 16]))
    with pytest.raises(LayoutMismatchError, match="dtype float32 != ours float16"):
        p.connect(init(d, backend, block_shape=[1, 4, 16], dtype="float32"))
    with pytest.raises(LayoutMismatchError, match="1 regions != our 2"):
        p.connect(init(d, backend, n_regions=1))
    with pytest.raises(LayoutMismatchError, match="layout tag 'avx512' != ours ''"):
        p.connect(init(d, backend, tag="avx512"))


def test_hetero_tp_mapping_moves_one_head_slice(pair: Any) -> None:
    """P TP=2 (2 heads/rank) → D TP=4 (1 head/rank): D rank 1 takes P rank 0's second head."""
    backend, _, _, d = pair
    het = {"p_tp": 2, "d_tp": 4, "total_kv_heads": 4}
    d_desc = init(d, backend, rank=1, block_shape=[1, 4, 16], tp_size=4, hetero_tp=het)
    src = make_regions(2, P_BLOCKS, BLOCK, "float16", seed=3)
    cfg = TransportConfig.model_validate(config(backend, hetero_tp=het))
    with KVTransport("P", 0, cfg) as p:
        p.register_regions(src)
        handle = p.connect(d_desc)
        route = routes_between(2, 4, 4, p_rank=0, d_rank=1)[0]
        d_shape = BlockShape(1, 4, 8, 2)
        copies = block_copies(0, [2, 3], [5, 7], SHAPE, d_shape, route)
        d.call(op="expect", tid="het", copies=rows(copies), deadline=10.0)
        assert p.push(handle, "het", PATH[backend], copies, 10.0).result(15).ok
        assert d.call(op="result", tid="het")["ok"]
        got = [np.frombuffer(b, np.float16).reshape(D_BLOCKS, 1, 4, 16) for b in d.call(op="regions")["regions"]]
        assert same(got[0][[5, 7], 0], src[0][[2, 3], 1])
        with pytest.raises(RankMismatchError, match="share no KV head"):
            p.connect(init(d, backend, rank=2, block_shape=[1, 4, 16], tp_size=4, hetero_tp=het))


BIG_BLOCKS = 1 << 17  # 256-byte blocks → 32 MiB in region 0, moved as one coalesced run
BIG_COPIES = block_copies(0, list(range(BIG_BLOCKS)), list(range(BIG_BLOCKS)), SHAPE)


@pytest.mark.slow
def test_receiver_killed_mid_transfer_sender_fails_in_time_and_lives_on(pair: Any) -> None:
    backend, p, small, d = pair
    p.register_regions(make_regions(2, BIG_BLOCKS, BLOCK, "float16", seed=1))
    victim = spare()
    try:
        handle = p.connect(init(victim, backend, blocks=BIG_BLOCKS))
        victim.call(op="expect", tid="big-1", copies=rows(BIG_COPIES), deadline=30.0)
        t0 = time.monotonic()
        fut = p.push(handle, "big-1", PATH[backend], BIG_COPIES, deadline_s=3.0)
        time.sleep(0.01)
        victim.kill()
        res = fut.result(10)
        assert time.monotonic() - t0 < 3.5
        if res.ok:  # the whole transfer beat the kill: the receiver confirmed before dying
            assert res.bytes == 32 << 20
        else:
            assert "broke" in res.error or "deadline of 3.0s expired" in res.error, res
        if backend == "tcp" or "broke" in (res.error or ""):
            time.sleep(0.2)
            assert PATH[backend] in handle.broken_paths()
            late = p.push(handle, "big-late", PATH[backend], BIG_COPIES[:1], deadline_s=2.0).result(5)
            assert not late.ok and "reconnecting" in late.error, late  # one fresh handshake, which fails
        # the survivor keeps working, with a new peer
        handle = p.connect(init(d, backend, blocks=BIG_BLOCKS))
        few = block_copies(0, [0, 1, 2], [10, 11, 12], SHAPE)
        d.call(op="expect", tid="big-2", copies=rows(few), deadline=10.0)
        assert p.push(handle, "big-2", PATH[backend], few, deadline_s=10.0).result(15).ok
        assert d.call(op="result", tid="big-2")["ok"]
    finally:
        victim.stop()
        p.register_regions(small)


@pytest.mark.slow
def test_sender_killed_mid_transfer_receiver_fails_in_time(pair: Any) -> None:
    backend, p, small, _ = pair
    p.register_regions(make_regions(2, BIG_BLOCKS, BLOCK, "float16", seed=None))
    sender = spare()
    try:
        r = sender.call(op="init", engine="S", rank=0, config=config(backend), n_regions=2,
                        num_blocks=BIG_BLOCKS, block_shape=BLOCK, dtype="float16", seed=2)
        assert "error" not in r, r
        assert sender.call(op="connect", descriptor=p.descriptor()) == {"connected": True}
        t0 = time.monotonic()
        fut = p.expect("big-3", BIG_COPIES, deadline_s=2.0)
        sender.send(op="push", descriptor=p.descriptor(), tid="big-3", path=PATH[backend],
                    copies=rows(BIG_COPIES), deadline=20.0, wait=False)
        time.sleep(0.02)
        sender.kill()
        res = fut.result(10)
        assert time.monotonic() - t0 < 2.5
        if not res.ok:
            assert "broke" in res.error or "deadline of 2.0s expired" in res.error, res
    finally:
        sender.stop()
        p.register_regions(small)


@pytest.mark.slow
def test_receiver_deadline_mid_data_tells_sender_and_pair_stays_usable(pair: Any) -> None:
    backend, p, small, d = pair
    p.register_regions(make_regions(2, BIG_BLOCKS, BLOCK, "float16", seed=4))
    try:
        handle = p.connect(init(d, backend, blocks=BIG_BLOCKS))
        both = BIG_COPIES + block_copies(1, list(range(BIG_BLOCKS)), list(range(BIG_BLOCKS)), SHAPE)
        fut = p.push(handle, "slow-1", PATH[backend], both, deadline_s=10.0)
        time.sleep(0.3)  # the offer waits at D; the expect below binds at once and has 20 ms for 64 MiB
        d.call(op="expect", tid="slow-1", copies=rows(both), deadline=0.02)
        rec = d.call(op="result", tid="slow-1")
        res = fut.result(15)
        if not rec["ok"]:
            assert "deadline of 0.02s expired while receiving" in rec["error"], rec
            assert not res.ok and "deadline of 0.02s expired" in res.error, res
            if backend == "ucx":
                time.sleep(1.5)  # a break of P's link surfaces within one keepalive interval (1 s)
        # whatever happened, the same pair moves the next transfer (ucx: closing the receiver's endpoint
        # may break the sender's link too; push then re-handshakes once on its own)
        few = block_copies(0, [7], [8], SHAPE)
        d.call(op="expect", tid="slow-2", copies=rows(few), deadline=10.0)
        again = p.push(handle, "slow-2", PATH[backend], few, deadline_s=10.0).result(15)
        assert again.ok, again
        assert d.call(op="result", tid="slow-2")["ok"]
    finally:
        p.register_regions(small)


@pytest.mark.parametrize("backend", BACKENDS)
def test_connect_to_a_gone_peer_fails_within_the_connect_deadline(backend: str) -> None:
    from kvlane.transport import PeerError

    cfg = TransportConfig.model_validate(config(backend, connect_timeout_s=1.0))
    gone = KVTransport("D", 0, cfg)
    gone.register_regions(make_regions(2, D_BLOCKS, BLOCK, "float16", seed=None))
    desc = gone.descriptor()
    gone.close()
    with KVTransport("P", 0, cfg) as p:
        p.register_regions(make_regions(2, P_BLOCKS, BLOCK, "float16", seed=None))
        t0 = time.monotonic()
        with pytest.raises(PeerError, match="cannot reach D/rank0|timed out after 1.0s|broke"):
            p.connect(desc)
        assert time.monotonic() - t0 < 3.0


def test_a_peer_that_never_answers_the_hello_is_a_handshake_timeout_within_connect_timeout() -> None:
    """A listener that accepts the connection and stays silent: connect() ends with HandshakeTimeout (the
    error the connector retries once) after connect_timeout_s for the whole handshake, not per step."""
    import socket

    from kvlane.transport import HandshakeTimeout
    from kvlane.transport.wire import Descriptor, PathAddress

    cfg = TransportConfig.model_validate(config("tcp", connect_timeout_s=1.0))
    silent = socket.create_server(("127.0.0.1", 0))
    try:
        with KVTransport("D", 0, cfg) as d:
            d.register_regions(make_regions(2, D_BLOCKS, BLOCK, "float16", seed=None))
            desc = Descriptor.from_msgpack(d.descriptor())
            port = silent.getsockname()[1]
            paths = {name: PathAddress(host="127.0.0.1", port=port) for name in desc.paths}
            mute = desc.model_copy(update={"paths": paths}).to_msgpack()
        with KVTransport("P", 0, cfg) as p:
            p.register_regions(make_regions(2, P_BLOCKS, BLOCK, "float16", seed=None))
            t0 = time.monotonic()
            with pytest.raises(HandshakeTimeout, match="timed out after 1.0s"):
                p.connect(mute, paths=["tcp"])
            assert time.monotonic() - t0 < 1.0 + 5.0  # well inside connect()'s own wait (connect_timeout_s + 5)
    finally:
        silent.close()


def test_a_timed_out_handshake_is_retried_on_a_fresh_link_until_the_deadline() -> None:
    """With a deadline, connect() tries a timed-out handshake again on a new connection while a whole attempt
    (connect_timeout_s) still fits: a silent peer sees 3 connections for a 3.5 s deadline at 1 s each (2 if the
    machine is slow enough that the second attempt ends past 2.5 s); without a deadline, exactly one."""
    import socket

    from kvlane.transport import HandshakeTimeout
    from kvlane.transport.wire import Descriptor, PathAddress

    cfg = TransportConfig.model_validate(config("tcp", connect_timeout_s=1.0))
    silent = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(silent.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        with KVTransport("D", 0, cfg) as d:
            d.register_regions(make_regions(2, D_BLOCKS, BLOCK, "float16", seed=None))
            desc = Descriptor.from_msgpack(d.descriptor())
            paths = {name: PathAddress(host="127.0.0.1", port=silent.getsockname()[1]) for name in desc.paths}
            mute = desc.model_copy(update={"paths": paths}).to_msgpack()
        with KVTransport("P", 0, cfg) as p:
            p.register_regions(make_regions(2, P_BLOCKS, BLOCK, "float16", seed=None))
            with pytest.raises(HandshakeTimeout, match="timed out after 1.0s"):
                p.connect(mute, paths=["tcp"], deadline=time.monotonic() + 3.5)
            time.sleep(0.3)  # the accept thread catches up
            retried = len(accepted)
            assert 2 <= retried <= 3, retried  # attempts at 0, ~1 (and ~2) s; a fourth would end past the deadline
            with pytest.raises(HandshakeTimeout):
                p.connect(mute, paths=["tcp"])
            time.sleep(0.3)
            assert len(accepted) == retried + 1
    finally:
        silent.close()
        for c in accepted:
            c.close()
