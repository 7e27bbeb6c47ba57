"""kvlane.transport's offer retry, both backends, P and D in this process: a lost OFFER is offered again and the
transfer completes; a lost READY makes the sender repeat its offer and the receiver answers the copy without
arming a second receive; copies after the end are answered from the outcome, never re-armed (with a secret too,
and a copy is not mistaken for a replay); an offer that arrives after its expect ended is refused at once with
the reason instead of being held until the sender's deadline."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kvlane.transport import KVTransport, TransportConfig, block_copies
from kvlane.transport.wire import Done, Offer, Ready

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the regions helper lives next to this file
from transport_cases import BACKENDS, BLOCK, PATH, SHAPE  # noqa: E402
from transport_peer import make_regions  # noqa: E402

BLOCKS = 8
SECRET = b"retry-test-secret"


def link_class(backend: str) -> Any:
    if backend == "tcp":
        from kvlane.transport.tcp import TcpLink

        return TcpLink
    from kvlane.transport.ucx import UcxLink

    return UcxLink


class Wire:
    """Spies on every control message and receive arm of the backend's links (P's and D's: one process);
    drops the first ``drop[type]`` messages of a type, as a lossy fabric would."""

    def __init__(self, backend: str, monkeypatch: pytest.MonkeyPatch, drop: dict[type, int] | None = None) -> None:
        cls = link_class(backend)
        self.sent: list[Any] = []
        self.dropped: list[Any] = []
        self.arms: list[str] = []
        self.drop = dict(drop or {})
        send, arm = cls.send_ctrl, cls.arm_recv
        spy = self

        async def send_ctrl(link: Any, msg: Any) -> None:
            if spy.drop.get(type(msg), 0) > 0:
                spy.drop[type(msg)] -= 1
                spy.dropped.append(msg)
                return
            spy.sent.append(msg)
            await send(link, msg)

        def arm_recv(link: Any, tid: str, tag_base: int, views: list[Any]) -> Any:
            spy.arms.append(tid)
            return arm(link, tid, tag_base, views)

        monkeypatch.setattr(cls, "send_ctrl", send_ctrl)
        monkeypatch.setattr(cls, "arm_recv", arm_recv)

    def count(self, kind: type, tid: str) -> int:
        return sum(1 for m in self.sent if isinstance(m, kind) and m.tid == tid)


class Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


def pair(backend: str, secret: bytes | None = None, **kw: Any) -> tuple[KVTransport, KVTransport, np.ndarray,
                                                                        list[np.ndarray]]:
    paths = {"tcp": {}} if backend == "tcp" else {"shm": {"ucx": {"TLS": "sm,self"}}}
    cfg = TransportConfig.model_validate({"backend": backend, "paths": paths, "connect_timeout_s": 5.0,
                                          "secret": secret, **kw})
    d, p = KVTransport("D", 0, cfg), KVTransport("P", 0, cfg)
    mem = np.zeros((BLOCKS, *BLOCK), np.float16)
    d.register_regions([mem])
    src = make_regions(1, BLOCKS, BLOCK, "float16", seed=21)
    p.register_regions(src)
    return d, p, mem, src


@pytest.fixture
def warnings() -> Iterator[Warnings]:
    w = Warnings()
    log = logging.getLogger("kvlane.transport")
    log.addHandler(w)
    yield w
    log.removeHandler(w)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("retry", [0.2, None], ids=["retry", "no-retry"])
def test_a_lost_offer_is_offered_again_and_the_transfer_completes(backend: str, retry: float | None,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    wire = Wire(backend, monkeypatch, drop={Offer: 1})
    d, p, mem, src = pair(backend, offer_retry_s=retry)
    with d, p:
        handle = p.connect(d.descriptor())
        copies = block_copies(0, [1, 2], [5, 6], SHAPE)
        got = d.expect("r-1", copies, deadline_s=3.0)
        t0 = time.monotonic()
        res = p.push(handle, "r-1", PATH[backend], copies, deadline_s=1.5).result(10)
        took = time.monotonic() - t0
        assert [m.tid for m in wire.dropped] == ["r-1"]
        if retry is None:  # the control: without the retry a lost offer is a failed transfer
            assert not res.ok and "deadline of 1.5s expired while waiting for the receiver to arm" in res.error, res
            assert not mem.any()
            return
        assert res.ok and res.bytes == 2 * 256, res
        assert got.result(5).ok
        assert mem[5:7].tobytes() == src[0][1:3].tobytes() and not mem[:5].any() and not mem[7:].any()
        assert wire.count(Offer, "r-1") >= 1 and took >= 0.2  # a copy after 0.2 s of silence got through
        assert wire.arms == ["r-1"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("secret", [None, SECRET], ids=["open", "secret"])
def test_a_repeated_offer_is_answered_but_never_armed_twice(backend: str, secret: bytes | None,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            warnings: Warnings) -> None:
    wire = Wire(backend, monkeypatch, drop={Ready: 1})  # D's READY is lost: P hears nothing and repeats its offer
    d, p, mem, src = pair(backend, secret, offer_retry_s=0.2)
    with d, p:
        handle = p.connect(d.descriptor())
        copies = block_copies(0, [3], [0], SHAPE)
        got = d.expect("r-2", copies, deadline_s=10.0)
        res = p.push(handle, "r-2", PATH[backend], copies, deadline_s=10.0).result(15)
        assert res.ok and res.bytes == 256, res
        assert got.result(5).ok and mem[0].tobytes() == src[0][3].tobytes()
        assert wire.count(Offer, "r-2") >= 2 and len(wire.dropped) == 1  # the copy was answered with a READY
        assert wire.arms == ["r-2"]  # ... and armed nothing new
        # a copy arriving after the end is answered from the outcome (DONE again), not armed, not a "replay"
        sent_offer = next(m for m in wire.sent if isinstance(m, Offer))
        dones = wire.count(Done, "r-2")
        mem[:] = 0
        asyncio.run_coroutine_threadsafe(handle.links[PATH[backend]].send_ctrl(sent_offer), p._loop).result(5)
        end = time.monotonic() + 5
        while wire.count(Done, "r-2") == dones and time.monotonic() < end:
            time.sleep(0.02)
        assert wire.count(Done, "r-2") > dones
        assert wire.arms == ["r-2"] and not mem.any()
        assert not [w for w in warnings.records if "refused offer" in w], warnings.records


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_offer_after_its_expect_ended_is_refused_at_once_with_the_reason(backend: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    wire = Wire(backend, monkeypatch)
    d, p, mem, _ = pair(backend)
    with d, p:
        handle = p.connect(d.descriptor())
        copies = block_copies(0, [0], [0], SHAPE)
        gone = d.expect("r-3", copies, deadline_s=0.2).result(5)
        assert not gone.ok and "no sender offered 'r-3'" in gone.error
        t0 = time.monotonic()
        res = p.push(handle, "r-3", PATH[backend], copies, deadline_s=20.0).result(25)
        assert time.monotonic() - t0 < 5.0  # not held until the 20 s deadline
        assert not res.ok and "receiver refused: expect('r-3') on D/rank0 ended" in res.error, res
        assert "before this offer arrived: deadline of 0.2s expired: no sender offered 'r-3'" in res.error, res
        assert wire.arms == [] and not mem.any()
        # a new expect for the id takes offers again
        copies2 = block_copies(0, [4], [4], SHAPE)
        again = d.expect("r-3", copies2, deadline_s=10.0)
        assert p.push(handle, "r-3", PATH[backend], copies2, deadline_s=10.0).result(15).ok
        assert again.result(5).ok and wire.arms == ["r-3"]
