"""A control message whose sender stopped waiting for it (a reply's 5 s wait, a push deadline) must still
reach the peer whole. ucx: UCX keeps reading the send buffer until the request completes — on a UCX tcp
endpoint still wiring up, that is when the peer is scheduled again — so kvlane must not free it early.
tcp: a write cut off by the cancellation must not leave half a frame on the stream. Regression for the
TP=2 vLLM run whose tcp-path handshake timed out after P logged ``dropped a control message: control
message claims 2129019364 bytes`` (docs/transport.md, "Sends outlive their waiters")."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kvlane.transport import KVTransport, TransportConfig
from kvlane.transport.wire import (
    MAX_CONTROL_BYTES,
    Descriptor,
    Done,
    Hello,
    Offer,
    decode_control,
    encode_control,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the child-process helper lives next to this file
from transport_peer import Peer  # noqa: E402

no_ucxx = pytest.mark.skipif(importlib.util.find_spec("ucxx") is None, reason="ucxx not importable")

#: The default UCX tcp path: its endpoints wire up through the peer, so a first send waits in UCX.
TCP_PATH = {"tcp": {"ucx": {"TLS": "tcp,self", "PROTO_ENABLE": "n"}}}


def _config(**kw: Any) -> TransportConfig:
    return TransportConfig.model_validate({"backend": "ucx", "paths": TCP_PATH, **kw})


@pytest.mark.ucx
@no_ucxx
def test_cancelled_control_sends_still_deliver_their_own_bytes() -> None:
    """Five control messages of equal size, each on a fresh tcp endpoint, each abandoned by its sender right
    after posting: the receiver gets all five, each with its own content (before the fix the freed buffers
    were reused by the later messages and the receiver got five copies of the last one)."""
    p, d = KVTransport("P", 0, _config()), KVTransport("D", 0, _config())
    try:
        for t in (p, d):
            t.register_regions([np.zeros((4, 64), np.uint8)])
        got: list[Any] = []
        d_tcp: Any = d._backends["tcp"]

        async def record(msg: Any) -> None:
            got.append(msg)

        d_tcp._dispatch = record
        p_tcp: Any = p._backends["tcp"]
        address = Descriptor.from_msgpack(d.descriptor()).paths["tcp"].ucx_address
        from kvlane.transport.ucx import UcxLink

        churn: list[bytes] = []

        async def send_and_abandon() -> list[bool]:
            pending = []
            for i in range(5):
                link = UcxLink(p_tcp, "D/rank0", await p_tcp._endpoint(address))
                p_tcp._links.add(link)
                msg = Done(tid=f"t{i}-" + "x" * 100, nbytes=i)
                task = asyncio.ensure_future(link.send_ctrl(msg))
                await asyncio.sleep(0)  # posted
                pending.append(not task.done())
                task.cancel()
                await asyncio.sleep(0)  # the cancellation is delivered: the sender no longer waits
                await asyncio.sleep(0)
                # what a busy process does next: allocate, here objects the size of the abandoned frame
                churn.extend(b"\xab" * (4 + len(encode_control(msg))) for _ in range(100))
            return pending

        pending = asyncio.run_coroutine_threadsafe(send_and_abandon(), p._loop).result(30)
        assert any(pending), "every send completed at once: nothing was abandoned in flight, the test proves nothing"
        deadline = time.monotonic() + 15
        while len(got) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted((m.tid, m.nbytes) for m in got) == [(f"t{i}-" + "x" * 100, i) for i in range(5)]
    finally:
        p.close()
        d.close()


@pytest.mark.ucx
@no_ucxx
def test_handshake_survives_a_reply_that_outlives_its_wait() -> None:
    """P stops (SIGSTOP, as a starved vLLM worker does) the moment D gets its hello on the tcp path, for 6.5 s:
    D's HELLO_OK on a new endpoint cannot wire up, D stops waiting for it after 5 s and goes on allocating.
    When P runs again the reply must arrive intact and connect() succeed (before the fix P logged 'control
    message claims N bytes' and the handshake timed out)."""
    d = KVTransport("D", 0, _config())
    peer = Peer()
    pid = 0
    try:
        d.register_regions([np.zeros((4, 64), np.uint8)])
        r = peer.call(op="init", engine="P", rank=0, config={"backend": "ucx", "paths": TCP_PATH,
                                                              "connect_timeout_s": 20.0},
                      n_regions=1, num_blocks=4, block_shape=[64], dtype="uint8", seed=1)
        assert "error" not in r, r
        pid = r["pid"]
        d_tcp: Any = d._backends["tcp"]
        dispatch = d_tcp._dispatch
        stopped: list[float] = []
        keep: list[Any] = []

        async def stop_sender_at_hello(msg: Any) -> None:
            if isinstance(msg, Hello) and not stopped:
                os.kill(pid, signal.SIGSTOP)
                stopped.append(time.monotonic())
                threading.Timer(6.5, os.kill, (pid, signal.SIGCONT)).start()

                async def churn() -> None:  # after D's 5 s reply wait gave up: the process keeps allocating
                    await asyncio.sleep(5.5)
                    keep.append([bytes([i % 256]) * n for i in range(100) for n in range(20, 200)])

                asyncio.ensure_future(churn())
            await dispatch(msg)

        d_tcp._dispatch = stop_sender_at_hello
        t0 = time.monotonic()
        reply = peer.call(op="connect", descriptor=d.descriptor(), timeout=60)
        assert stopped, "D never saw the hello"
        assert reply == {"connected": True}, reply
        assert time.monotonic() - t0 > 6.0  # it really waited out the stop (the reply outlived D's 5 s wait)
    finally:
        if pid:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        peer.stop()
        d.close()


def test_tcp_control_write_cut_off_by_its_caller_still_completes_the_frame() -> None:
    """tcp backend: the peer does not read, a 300 KB offer fills the socket and its sender gives up after
    0.3 s; a small DONE follows. The peer must then read two whole frames, the offer and the DONE (before
    the fix it read the offer's first part followed by the DONE's bytes: a broken stream)."""
    t = KVTransport("P", 0, TransportConfig(backend="tcp", paths={"tcp": {}}))
    listener, ours = socket.socket(), socket.socket()
    for sock in (listener, ours):  # small buffers (set before connecting): the offer cannot fit
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 10)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    ours.connect(listener.getsockname())
    theirs, _ = listener.accept()
    listener.close()
    try:
        ours.setblocking(False)
        from kvlane.transport.tcp import TcpLink

        big = Offer(tid="big", sender="P/rank0", wait_s=5.0, runs=[(0, 4096 * i, 4096) for i in range(30000)])
        small = Done(tid="small", nbytes=7)

        async def give_up_then_send() -> tuple[bool, Any]:
            link = TcpLink(t._backends["tcp"], ours, "D/rank0")
            try:
                await asyncio.wait_for(link.send_ctrl(big), 0.3)
                gave_up = False
            except TimeoutError:
                gave_up = True
            return gave_up, asyncio.ensure_future(link.send_ctrl(small))

        gave_up, _ = asyncio.run_coroutine_threadsafe(give_up_then_send(), t._loop).result(10)
        assert gave_up, "the offer fit into the socket buffers: nothing was cut off, the test proves nothing"
        theirs.settimeout(5)

        def exact(n: int) -> bytes:
            out = bytearray()
            while len(out) < n:
                try:
                    chunk = theirs.recv(n - len(out))
                except TimeoutError:
                    pytest.fail(f"got {len(out)} of the {n} bytes a frame announced, then nothing: the stream broke")
                assert chunk, "connection closed"
                out += chunk
            return bytes(out)

        frames = []
        for _ in range(2):
            (n,) = struct.unpack("<I", exact(4))
            assert n <= MAX_CONTROL_BYTES, f"frame claims {n} bytes: the stream broke"
            frames.append(decode_control(exact(n)))
        assert frames == [big, small]
    finally:
        t.close()
        theirs.close()
