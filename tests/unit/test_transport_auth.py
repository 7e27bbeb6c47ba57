"""kvlane.transport with a shared secret: same secret → transfers work (both backends, two processes); wrong,
missing or one-sided secret → the handshake is refused with a clear AuthError and the receiver's KV memory stays
untouched; a raw-socket stranger (tcp) — forged hello, replayed handshake answer, replayed offer — never gets a
byte into KV memory, is logged with its address and has its connection closed."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from kvlane.transport import AuthError, KVTransport, TransportConfig, block_copies
from kvlane.transport import auth as A
from kvlane.transport.wire import Descriptor

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the child-process helper lives next to this file
from transport_cases import BACKENDS, BLOCK, PATH, SHAPE  # noqa: E402
from transport_peer import Peer, make_regions  # noqa: E402

BLOCKS = 8
SECRET = b"s3cret-of-the-deployment"
A_COPY = block_copies(0, [0], [3], SHAPE)[0]  # what the raw-socket tests' receiver expects: one block into block 3


def config(backend: str, secret: bytes | None, **kw: Any) -> dict[str, Any]:
    paths = {"tcp": {}} if backend == "tcp" else {"shm": {"ucx": {"TLS": "sm,self"}}}
    return {"backend": backend, "paths": paths, "tp_size": 1, "connect_timeout_s": 3.0, "secret": secret, **kw}


def rows(copies: list[Any]) -> list[list[int]]:
    return [[c.region, c.src_offset, c.dst_offset, c.nbytes] for c in copies]


@pytest.fixture(scope="module", params=BACKENDS)
def child(request: pytest.FixtureRequest) -> Iterator[tuple[str, Peer]]:
    d = Peer()
    yield request.param, d
    d.stop()


def init_d(d: Peer, backend: str, secret: bytes | None) -> bytes:
    r = d.call(op="init", engine="D", rank=0, config=config(backend, secret), n_regions=1, num_blocks=BLOCKS,
               block_shape=BLOCK, dtype="float16", seed=None)
    assert "error" not in r, r
    return r["descriptor"]


def d_memory(d: Peer) -> np.ndarray:
    return np.frombuffer(d.call(op="regions")["regions"][0], np.float16).reshape(BLOCKS, *BLOCK)


def make_p(backend: str, secret: bytes | None) -> tuple[KVTransport, list[np.ndarray]]:
    p = KVTransport("P", 0, TransportConfig.model_validate(config(backend, secret)))
    src = make_regions(1, BLOCKS, BLOCK, "float16", seed=11)
    p.register_regions(src)
    return p, src


def test_same_secret_moves_bytes(child: tuple[str, Peer]) -> None:
    backend, d = child
    desc = init_d(d, backend, SECRET)
    p, src = make_p(backend, SECRET)
    with p:
        handle = p.connect(desc)
        for n, (s, t) in enumerate([([1, 2], [5, 6]), ([7], [0])]):  # two offers: sequence numbers 0 and 1
            copies = block_copies(0, s, t, SHAPE)
            d.call(op="expect", tid=f"ok-{n}", copies=rows(copies), deadline=10.0)
            res = p.push(handle, f"ok-{n}", PATH[backend], copies, deadline_s=10.0).result(15)
            assert res.ok, res.error
            assert d.call(op="result", tid=f"ok-{n}")["ok"]
        got = d_memory(d)
        assert got[[5, 6, 0]].tobytes() == src[0][[1, 2, 7]].tobytes()
        assert not got[[1, 2, 3, 4, 7]].any()


@pytest.mark.parametrize(("p_secret", "d_secret", "error"), [
    (b"another-secret", SECRET, r"refused the handshake: AuthError: the handshake answer from P/rank0 does not "
                                r"prove our shared secret \(wrong secret on one side\?\)"),
    (None, SECRET, r"refused the handshake: AuthError: D/rank0 requires authentication and the hello from P/rank0 "
                   r"carries no nonce \(no shared secret configured on the sender\?\)"),
    (SECRET, None, r"accepted us on path '\w+' without authentication: it has no shared secret configured"),
], ids=["wrong-secret", "sender-without-secret", "receiver-without-secret"])
def test_mismatched_secrets_are_refused_and_kv_untouched(child: tuple[str, Peer], p_secret: bytes | None,
                                                          d_secret: bytes | None, error: str) -> None:
    backend, d = child
    desc = init_d(d, backend, d_secret)
    copies = block_copies(0, [0, 1, 2, 3], [0, 1, 2, 3], SHAPE)
    d.call(op="expect", tid="armed", copies=rows(copies), deadline=1.0)
    p, _ = make_p(backend, p_secret)
    with p:
        with pytest.raises(AuthError, match=error):
            p.connect(desc)
    rec = d.call(op="result", tid="armed")
    assert not rec["ok"] and "no sender offered 'armed'" in rec["error"], rec
    assert not d_memory(d).any()


# ---------------------------------------------------------------- tcp: a stranger on a raw socket


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


class Raw:
    """A hand-driven tcp connection to the receiver's path, speaking the wire format directly."""

    def __init__(self, host: str, port: int) -> None:
        self.s = socket.create_connection((host, port), timeout=5.0)
        host, port = self.s.getsockname()[:2]
        self.local = f"{host}:{port}"

    def send(self, msg: dict[str, Any], tail: bytes = b"") -> None:
        body = msgpack.packb(msg, use_bin_type=True)
        self.s.sendall(struct.pack("<I", len(body)) + body + tail)

    def recv(self) -> dict[str, Any]:
        n = struct.unpack("<I", self._exact(4))[0]
        return msgpack.unpackb(self._exact(n), raw=False)

    def _exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.s.recv(n - len(out))
            if not chunk:
                raise ConnectionError("closed by the receiver")
            out += chunk
        return out

    def closed_by_peer(self) -> bool:
        self.s.settimeout(3.0)
        try:
            while self.s.recv(4096):
                pass
            return True
        except ConnectionError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.s.close()


class Receiver:
    """D (with SECRET) in this process, and P's descriptor that a stranger copies."""

    def __init__(self) -> None:
        cfg = TransportConfig.model_validate(config("tcp", SECRET))
        self.mem = [np.zeros((BLOCKS, *BLOCK), np.float16)]
        self.d = KVTransport("D", 0, cfg)
        self.d.register_regions(self.mem)
        self.p = KVTransport("P", 0, cfg)
        self.p.register_regions(make_regions(1, BLOCKS, BLOCK, "float16", seed=5))
        addr = Descriptor.from_msgpack(self.d.descriptor()).paths["tcp"]
        self.host, self.port = addr.host, addr.port
        self.p_desc = self.p.descriptor()

    def raw(self) -> Raw:
        return Raw(self.host, self.port)

    def handshake(self, conn: Raw) -> tuple[bytes, bytes, dict[str, Any]]:
        """Run the hello as the genuine P would (it knows the secret). Returns (nonce_S, nonce_R, auth msg)."""
        mine = A.new_nonce()
        conn.send({"t": "hello", "descriptor": self.p_desc, "nonce": mine})
        ch = conn.recv()
        assert ch["t"] == "challenge" and ch["key"] == "D/rank0", ch
        answer = {"t": "auth", "key": "P/rank0", "nonce": ch["nonce"],
                  "mac": A.sender_mac(SECRET, ch["nonce"], mine, self.p_desc, "D/rank0", "tcp")}
        return mine, ch["nonce"], answer

    def close(self) -> None:
        self.p.close()
        self.d.close()


@pytest.fixture(scope="module")
def rx() -> Iterator[tuple[Receiver, _Warnings]]:
    warn = _Warnings()
    loggers = [logging.getLogger(n) for n in ("kvlane.transport", "kvlane.transport.tcp")]
    for lg in loggers:
        lg.addHandler(warn)
    r = Receiver()
    yield r, warn
    r.close()
    for lg in loggers:
        lg.removeHandler(warn)


def logged(warn: _Warnings, text: str, within: float = 5.0) -> bool:
    """Whether a warning containing ``text`` is logged within ``within`` seconds (the receiver logs from its loop)."""
    end = time.monotonic() + within
    while not any(text in m for m in warn.records):
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def offer(tid: str, nbytes: int = 256, **kw: Any) -> dict[str, Any]:
    # every field, as the receiver re-encodes the offer to check its MAC
    return {"t": "offer", "tid": tid, "sender": "P/rank0", "runs": [[0, A_COPY.dst_offset, nbytes]], "tag_base": 0, "wait_s": 5.0,
            "packed": False, **kw}


def data(tid: str, nbytes: int = 256) -> dict[str, Any]:
    return {"t": "data", "tid": tid, "i": 0, "offset": 0, "nbytes": nbytes}


@pytest.mark.parametrize("with_nonce", [False, True], ids=["plain-hello", "hello-never-answered"])
def test_forged_hello_then_offer_and_data_is_refused_logged_and_closed(rx: Any, with_nonce: bool) -> None:
    r, warn = rx
    fut = r.d.expect("forged", [A_COPY], deadline_s=5.0)
    conn = r.raw()
    try:
        hello = {"t": "hello", "descriptor": r.p_desc}
        if with_nonce:
            hello["nonce"] = A.new_nonce()
        conn.send(hello)
        first = conn.recv()
        if with_nonce:  # a challenge the stranger cannot answer; it sends its offer and data anyway
            assert first["t"] == "challenge"
        else:
            assert first["t"] == "hello_err" and "carries no nonce" in first["error"], first
        conn.send(offer("forged"))
        conn.send(data("forged"), b"\xff" * 256)
        assert conn.closed_by_peer()
    finally:
        conn.close()
    assert not r.mem[0].any()
    assert any(conn.local in m and ("refused" in m) for m in warn.records), warn.records
    r.d.cancel("forged")
    assert not fut.result(5).ok


def test_replayed_handshake_answer_is_refused(rx: Any) -> None:
    r, warn = rx
    first, second = r.raw(), r.raw()
    try:
        _, _, answer = r.handshake(first)
        first.send(answer)  # the genuine answer: accepted, with the receiver's proof
        ok = first.recv()
        assert ok["t"] == "hello_ok" and len(ok["mac"]) == 32
        r.handshake(second)  # a stranger that captured `answer` replays it on its own connection
        second.send(answer)
        err = second.recv()
        assert err["t"] == "hello_err" and "unknown or already used challenge" in err["error"], err
        second.send(offer("replayed", seq=0, mac=b"\0" * 32))
        second.send(data("replayed"), b"\xff" * 256)
        assert second.closed_by_peer()
    finally:
        first.close()
        second.close()
    assert not r.mem[0].any()
    assert any(second.local in m and "already used challenge" in m for m in warn.records), warn.records


def test_answer_to_another_connections_challenge_is_refused(rx: Any) -> None:
    r, _ = rx
    victim, stranger = r.raw(), r.raw()
    try:
        _, _, answer = r.handshake(victim)  # victim's challenge is still open
        r.handshake(stranger)
        stranger.send(answer)  # correct MAC, wrong connection
        err = stranger.recv()
        assert err["t"] == "hello_err" and "sent to another connection" in err["error"], err
        assert stranger.closed_by_peer()
        victim.send(answer)  # the victim's own answer still counts: the refusal did not consume its challenge
        assert victim.recv()["t"] == "hello_ok"
    finally:
        victim.close()
        stranger.close()


def test_replayed_offer_is_refused_after_a_genuine_transfer(rx: Any) -> None:
    """The captured offer (valid session MAC) of a finished transfer, sent again for the same id: no receive is
    armed, the new expect gets nothing, and the replayed data never lands."""
    r, warn = rx
    conn = r.raw()
    try:
        mine, theirs, answer = r.handshake(conn)
        conn.send(answer)
        assert conn.recv()["t"] == "hello_ok"
        session = A.session_key(SECRET, theirs, mine, r.p_desc, "D/rank0", "tcp")
        body = offer("t-1", seq=0)
        body["mac"] = A.offer_mac(session, msgpack.packb(body, use_bin_type=True))
        fut = r.d.expect("t-1", [A_COPY], deadline_s=5.0)
        conn.send(body)
        for want in ({"t": "ready", "tid": "t-1"}, {"t": "done", "tid": "t-1", "nbytes": 256}):
            reply = conn.recv()
            mac = reply.pop("mac")  # the receiver's replies are bound to this offer (seq 0, tag base 0)
            assert reply == want and mac == A.reply_mac(session, msgpack.packb(want, use_bin_type=True), 0, 0)
            if want["t"] == "ready":
                conn.send(data("t-1"), b"\x11" * 256)
        assert fut.result(5).ok
        r.mem[0][:] = 0
        again = r.d.expect("t-1", [A_COPY], deadline_s=0.5)
        conn.send(body)  # replay: same seq, same MAC
        conn.send(data("t-1"), b"\x22" * 256)
        res = again.result(5)
        assert not res.ok and "no sender offered 't-1'" in res.error, res
        forged = dict(body, seq=1)  # a fresh sequence number without a fresh MAC
        conn.send(forged)
        conn.send(data("t-1"), b"\x33" * 256)
    finally:
        conn.close()
    assert logged(warn, "sequence number 0 was already used") and logged(warn, "its session MAC is wrong")
    assert not r.mem[0].any()


def test_genuine_peer_still_works_after_the_strangers(rx: Any) -> None:
    r, _ = rx
    handle = r.p.connect(r.d.descriptor())
    copies = block_copies(0, [4], [6], SHAPE)
    fut = r.d.expect("good", copies, deadline_s=10.0)
    assert r.p.push(handle, "good", "tcp", copies, deadline_s=10.0).result(15).ok
    assert fut.result(5).ok
    assert r.mem[0][6].tobytes() == r.p.regions[0].owner[4].tobytes()


def test_secret_config_defaults_to_env_and_never_shows() -> None:
    assert TransportConfig(secret=None).secret is None
    cfg = TransportConfig(secret=SECRET)
    assert SECRET.decode() not in repr(cfg) and cfg.secret.get_secret_value() == SECRET
    assert A.env_secret({"KVLANE_SECRET": "abc"}) == b"abc"
    assert A.env_secret({"KVLANE_SECRET": ""}) is None and A.env_secret({}) is None
    with pytest.raises(ValueError, match="empty secret"):
        TransportConfig(secret=b"")


@pytest.mark.parametrize("backend", BACKENDS)
def test_captured_auth_and_offer_replayed_on_a_live_link_are_refused(backend: str, monkeypatch: Any) -> None:
    """Both backends, in one process: P's genuine AUTH and OFFER are captured off the wire and sent again later
    (ucx: from P's endpoint, as a stranger on the fabric would): the used challenge and the used sequence number
    are refused, a re-numbered offer fails its MAC, and the receiver's memory stays untouched. D's captured DONE,
    replayed while P pushes the same id again, does not make that push succeed."""
    from kvlane.transport.wire import Auth, Done, Offer

    if backend == "tcp":
        from kvlane.transport.tcp import TcpLink as link_cls
    else:
        from kvlane.transport.ucx import UcxLink as link_cls
    sent: list[Any] = []
    orig = link_cls.send_ctrl

    async def spy(self: Any, msg: Any) -> None:
        sent.append(msg)
        await orig(self, msg)

    monkeypatch.setattr(link_cls, "send_ctrl", spy)
    warn = _Warnings()
    log = logging.getLogger("kvlane.transport")
    log.addHandler(warn)
    cfg = TransportConfig.model_validate(config(backend, SECRET))
    mem = np.zeros((BLOCKS, *BLOCK), np.float16)
    try:
        with KVTransport("D", 0, cfg) as d, KVTransport("P", 0, cfg) as p:
            d.register_regions([mem])
            src = make_regions(1, BLOCKS, BLOCK, "float16", seed=9)
            p.register_regions(src)
            handle = p.connect(d.descriptor())
            copies = block_copies(0, [1], [2], SHAPE)
            first = d.expect("t-1", copies, deadline_s=10.0)
            assert p.push(handle, "t-1", PATH[backend], copies, deadline_s=10.0).result(15).ok
            assert first.result(5).ok and mem[2].tobytes() == src[0][1].tobytes()
            captured_auth = next(m for m in sent if isinstance(m, Auth))
            captured_offer = next(m for m in sent if isinstance(m, Offer))
            captured_done = next(m for m in sent if isinstance(m, Done))
            assert captured_done.mac is not None
            assert captured_offer.seq == 0 and captured_offer.mac is not None
            mem[:] = 0
            again = d.expect("t-1", copies, deadline_s=1.0)
            link = handle.links[PATH[backend]]

            def replay(msg: Any) -> None:
                asyncio.run_coroutine_threadsafe(link.send_ctrl(msg), p._loop).result(5)

            replay(captured_offer)
            replay(captured_offer.model_copy(update={"seq": 7}))
            res = again.result(5)
            assert not res.ok and "no sender offered 't-1'" in res.error, res
            # D would refuse an offer for t-1 at once now (its last expect ended); forget that, so the offer is
            # held as for an id D never saw and P waits for an answer while the captured DONE arrives
            d._loop.call_soon_threadsafe(d._ended.clear)
            pushed = p.push(handle, "t-1", PATH[backend], copies, deadline_s=1.5)  # nobody expects it now
            end = time.monotonic() + 1.0
            while "t-1" not in p._reply_keys and time.monotonic() < end:  # P's offer is out and awaits a reply
                time.sleep(0.01)
            back = (next(iter(d._backends["tcp"].links)) if backend == "tcp"
                    else d._backends["shm"]._reverse["P/rank0"])  # D's side of the link to P
            asyncio.run_coroutine_threadsafe(back.send_ctrl(captured_done), d._loop).result(5)
            late = pushed.result(5)
            assert not late.ok and "deadline of 1.5s expired" in late.error, late
            assert logged(warn, "refused done for t-1 on path")
            replay(captured_auth)  # last: on tcp the receiver closes the link it arrives on
            assert logged(warn, "sequence number 0 was already used")
            assert logged(warn, "its session MAC is wrong")
            assert logged(warn, "unknown or already used challenge")
            assert not mem.any()
    finally:
        log.removeHandler(warn)


def test_open_challenges_are_bounded_and_superseded(rx: Any, monkeypatch: Any) -> None:
    """A stranger cannot make the receiver hold unbounded handshake state: a second hello on one connection
    replaces its open challenge, and beyond the cap further hellos are refused."""
    from kvlane.transport import core

    r, warn = rx
    monkeypatch.setattr(core, "MAX_PENDING_CHALLENGES", len(r.d._pending) + 1)
    first, second = r.raw(), r.raw()
    try:
        hello = {"t": "hello", "descriptor": r.p_desc, "nonce": A.new_nonce()}
        first.send(hello)
        assert first.recv()["t"] == "challenge"
        first.send(hello)  # supersedes the first challenge instead of adding one
        assert first.recv()["t"] == "challenge"
        second.send(hello)
        err = second.recv()
        assert err["t"] == "hello_err" and "unanswered challenges open" in err["error"], err
        assert second.closed_by_peer()
    finally:
        first.close()
        second.close()
    assert logged(warn, "unanswered challenges open")
