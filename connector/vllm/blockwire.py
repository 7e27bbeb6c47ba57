"""Moves whole KV blocks of one TP rank from P's paged cache into D's, over a TCP socket.

Runs inside vLLM worker processes (a receive server thread on D, push calls on P). It writes only into
blocks a live, armed expectation owns and stops writing before that expectation is reported finished;
it never decides what to send or where (the scheduler side and the policy service do).
Wire: 4-byte big-endian length + msgpack header (size-limited, schema-checked), then raw layer bytes.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch
from vllm.logger import init_logger

logger = init_logger("vllm.kvlane.blockwire")

MAX_HEADER = 1 << 20
MAX_BLOCKS = 1 << 20
WIRE_VERSION = 1


class WireError(RuntimeError):
    """A push or receive that cannot proceed; the message says why."""


def cpu_isa() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # older torch
        return "unknown"


class PagedLayers:
    """The registered KV cache of one rank: one `[num_blocks, ...]` tensor per layer, viewed as bytes."""

    def __init__(self, layers: dict[str, torch.Tensor], block_size: int):
        if not layers:
            raise WireError("no KV cache tensors registered")
        self.names = sorted(layers)
        self.flat: list[torch.Tensor] = []
        shapes = set()
        dtypes = set()
        for name in self.names:
            t = layers[name]
            if t.device.type != "cpu":
                raise WireError(f"layer {name}: KV cache on {t.device}, blockwire moves host memory only")
            if not t.is_contiguous():
                raise WireError(f"layer {name}: KV cache tensor {tuple(t.shape)} is not contiguous")
            self.flat.append(t.view(torch.uint8).view(t.shape[0], -1))
            shapes.add(tuple(t.shape))
            dtypes.add(str(t.dtype))
        if len(shapes) != 1 or len(dtypes) != 1:
            raise WireError(f"layers differ in shape/dtype: {sorted(shapes)} {sorted(dtypes)}")
        shape = shapes.pop()
        self.num_blocks = shape[0]
        self.block_layer_bytes = self.flat[0].shape[1]
        self.block_bytes = self.block_layer_bytes * len(self.flat)
        # Everything both ends must agree on for a byte copy of a block to mean the same KV.
        self.fingerprint = (
            f"isa={cpu_isa()}|dtype={dtypes.pop()}|block_size={block_size}|layers={len(self.flat)}"
            f"|block_shape={'x'.join(str(d) for d in shape[1:])}"
        )

    def check_blocks(self, ids: list[int]) -> None:
        bad = [b for b in ids if not 0 <= b < self.num_blocks]
        if bad:
            raise WireError(f"block ids out of range [0, {self.num_blocks}): {bad[:5]}")


def _send_frame(sock: socket.socket, obj: dict[str, Any]) -> None:
    data = msgpack.packb(obj, use_bin_type=True)
    sock.sendall(struct.pack(">I", len(data)) + data)


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    n = len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise WireError(f"peer closed the connection after {got} of {n} bytes")
        got += k


def _recv_frame(sock: socket.socket) -> dict[str, Any]:
    head = bytearray(4)
    _recv_exact(sock, memoryview(head))
    (n,) = struct.unpack(">I", head)
    if n > MAX_HEADER:
        raise WireError(f"frame of {n} bytes exceeds the {MAX_HEADER}-byte limit")
    body = bytearray(n)
    _recv_exact(sock, memoryview(body))
    obj = msgpack.unpackb(bytes(body), raw=False, strict_map_key=True)
    if not isinstance(obj, dict):
        raise WireError("frame is not a map")
    return obj


def _int_list(obj: Any, what: str) -> list[int]:
    if not isinstance(obj, list) or len(obj) > MAX_BLOCKS or not all(type(x) is int for x in obj):
        raise WireError(f"{what} must be a list of at most {MAX_BLOCKS} integers")
    return obj


@dataclass
class RecvResult:
    transfer_id: str
    ok: bool
    bytes: int = 0
    seconds: float = 0.0
    error: str | None = None


@dataclass
class _Expect:
    transfer_id: str
    dst_blocks: list[int]
    deadline: float  # time.monotonic()
    active: bool = False  # a connection is writing into dst_blocks right now
    cancelled: bool = False
    result: RecvResult | None = None
    started: float = field(default_factory=time.monotonic)


class BlockServer:
    """D side, one per worker rank: accepts pushes for armed transfers only."""

    def __init__(self, layers: PagedLayers, rank: int, host: str = "127.0.0.1"):
        self.layers = layers
        self.rank = rank
        self._lock = threading.Lock()
        self._expect: dict[str, _Expect] = {}
        self._sock = socket.create_server((host, 0), backlog=64)
        self.host, self.port = host, self._sock.getsockname()[1]
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name=f"kvlane-recv-{rank}", daemon=True)
        self._thread.start()

    # -- control, called from the worker's step ------------------------------------------------------
    def arm(self, transfer_id: str, dst_blocks: list[int], deadline: float) -> None:
        self.layers.check_blocks(dst_blocks)
        with self._lock:
            if transfer_id in self._expect:
                raise WireError(f"transfer {transfer_id} is already armed")
            self._expect[transfer_id] = _Expect(transfer_id, list(dst_blocks), deadline)

    def cancel(self, transfer_id: str, reason: str) -> None:
        with self._lock:
            e = self._expect.get(transfer_id)
            if e is not None and e.result is None:
                e.cancelled = True
                if not e.active:
                    e.result = RecvResult(transfer_id, False, error=reason)

    def poll(self, now: float) -> list[RecvResult]:
        """Terminal results (each reported once). Expired expectations are cancelled here; one whose
        connection is still writing is reported only after that connection stopped touching the blocks."""
        out = []
        with self._lock:
            for tid, e in list(self._expect.items()):
                if e.result is None and now >= e.deadline:
                    e.cancelled = True
                    if not e.active:
                        e.result = RecvResult(tid, False, error=f"no push within the deadline ({now - e.started:.1f}s)")
                if e.result is not None and not e.active:
                    out.append(e.result)
                    del self._expect[tid]
        return out

    def descriptor(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "rank": self.rank, "fingerprint": self.layers.fingerprint}

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.close()
        except OSError:
            pass

    # -- data path -------------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True, name=f"kvlane-recv-{self.rank}-c").start()

    def _serve(self, conn: socket.socket) -> None:
        exp: _Expect | None = None
        nbytes = 0
        t0 = time.monotonic()
        try:
            conn.settimeout(30.0)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            hdr = _recv_frame(conn)
            if hdr.get("v") != WIRE_VERSION:
                raise WireError(f"wire version {hdr.get('v')!r}, expected {WIRE_VERSION}")
            tid = hdr.get("transfer_id")
            if not isinstance(tid, str):
                raise WireError("header: transfer_id missing")
            if hdr.get("rank") != self.rank:
                raise WireError(f"rank mismatch: sender rank {hdr.get('rank')} pushed to receiver rank {self.rank}")
            if hdr.get("fingerprint") != self.layers.fingerprint:
                raise WireError(
                    f"KV layout mismatch: sender {hdr.get('fingerprint')!r} vs receiver {self.layers.fingerprint!r}"
                )
            dst = _int_list(hdr.get("dst_blocks"), "dst_blocks")
            with self._lock:
                e = self._expect.get(tid)
                if e is None or e.cancelled or e.result is not None:
                    raise WireError(f"transfer {tid} is not armed on rank {self.rank} (expired, cancelled or unknown)")
                if dst != e.dst_blocks:
                    raise WireError(f"transfer {tid}: dst_blocks differ from the {len(e.dst_blocks)} armed blocks")
                if e.active:
                    raise WireError(f"transfer {tid}: a push is already in progress")
                e.active = True
                exp = e
            conn.settimeout(max(0.1, exp.deadline - time.monotonic()))
            _send_frame(conn, {"ok": True})
            n = len(dst)
            if n:
                idx = torch.tensor(dst, dtype=torch.long)
                buf = torch.empty((n, self.layers.block_layer_bytes), dtype=torch.uint8)
                mv = memoryview(buf.numpy()).cast("B")
                for flat in self.layers.flat:
                    _recv_exact(conn, mv)
                    with self._lock:
                        if exp.cancelled:
                            raise WireError(f"transfer {tid} cancelled (deadline) during the receive")
                    flat.index_copy_(0, idx, buf)
                    nbytes += len(mv)
            _send_frame(conn, {"ok": True, "bytes": nbytes})
            with self._lock:
                exp.result = RecvResult(tid, True, nbytes, time.monotonic() - t0)
                exp.active = False
        except Exception as exc:  # any failure ends this connection and (if armed) this transfer
            msg = f"{exc.__class__.__name__}: {exc}"
            logger.warning("kvlane recv rank %d failed: %s", self.rank, msg)
            try:
                _send_frame(conn, {"ok": False, "error": msg[:1000]})
            except Exception:
                pass
            if exp is not None:
                with self._lock:
                    exp.result = RecvResult(exp.transfer_id, False, nbytes, time.monotonic() - t0, msg)
                    exp.active = False
        finally:
            conn.close()


@dataclass
class PushResult:
    ok: bool
    bytes: int
    seconds: float
    error: str | None = None


def push_blocks(
    layers: PagedLayers,
    peer: dict[str, Any],
    rank: int,
    transfer_id: str,
    src_blocks: list[int],
    dst_blocks: list[int],
    deadline: float,
    corrupt: bool = False,
) -> PushResult:
    """P side: send `src_blocks` of every layer into the peer's `dst_blocks` (same order). Blocks until
    the peer acknowledges or the deadline passes; never raises (failures are in the result)."""
    t0 = time.monotonic()
    sent = 0
    try:
        if len(src_blocks) != len(dst_blocks):
            raise WireError(f"{len(src_blocks)} source blocks for {len(dst_blocks)} destination blocks")
        layers.check_blocks(src_blocks)
        if peer.get("fingerprint") != layers.fingerprint:
            raise WireError(f"KV layout mismatch: local {layers.fingerprint!r} vs peer {peer.get('fingerprint')!r}")
        if peer.get("rank") != rank:
            raise WireError(f"refusing cross-rank push: local rank {rank} -> peer rank {peer.get('rank')}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise WireError("push deadline passed before the connection")
        with socket.create_connection((peer["host"], int(peer["port"])), timeout=min(remaining, 10.0)) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.settimeout(max(0.1, deadline - time.monotonic()))
            _send_frame(
                s,
                {"v": WIRE_VERSION, "transfer_id": transfer_id, "rank": rank,
                 "fingerprint": layers.fingerprint, "dst_blocks": list(dst_blocks)},
            )
            ack = _recv_frame(s)
            if not ack.get("ok"):
                raise WireError(f"peer refused: {ack.get('error')}")
            if src_blocks:
                idx = torch.tensor(src_blocks, dtype=torch.long)
                for flat in layers.flat:
                    chunk = flat.index_select(0, idx)  # a copy: corrupting it never touches P's cache
                    if corrupt:
                        chunk.bitwise_xor_(0x5A)
                    s.sendall(memoryview(chunk.numpy()).cast("B"))
                    sent += chunk.numel()
            fin = _recv_frame(s)
            if not fin.get("ok"):
                raise WireError(f"peer failed the receive: {fin.get('error')}")
        return PushResult(True, sent, time.monotonic() - t0)
    except Exception as exc:
        return PushResult(False, sent, time.monotonic() - t0, f"{exc.__class__.__name__}: {exc}")
