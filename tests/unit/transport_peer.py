"""Test helper: a KVTransport in a spawned child process, driven by msgpack commands over a pipe.

Used by tests/unit/test_transport.py and benchmarks/bench_transport.py; not a test module itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import msgpack
import numpy as np


def make_regions(n_regions: int, num_blocks: int, block_shape: list[int], dtype: str, seed: int | None,
                 ) -> list[np.ndarray]:
    """Deterministic KV regions: random content for ``seed``, zeros for ``None``."""
    shape = (num_blocks, *block_shape)
    if seed is None:
        return [np.zeros(shape, dtype) for _ in range(n_regions)]
    rng = np.random.default_rng(seed)
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    out = []
    for _ in range(n_regions):  # random up to 1 MiB, then tiled (big regions only need to be non-zero)
        base = rng.integers(0, 256, min(nbytes, 1 << 20), dtype=np.uint8)
        out.append(np.resize(base, nbytes).view(dtype).reshape(shape))
    return out


def _result(r: Any) -> dict[str, Any]:
    return {"transfer_id": r.transfer_id, "ok": r.ok, "bytes": r.bytes, "seconds": r.seconds, "path": r.path,
            "error": r.error}


def main(conn: Any) -> None:
    from kvlane.transport import BlockCopy, KVTransport, TransportConfig

    t = None
    regions: list[np.ndarray] = []
    expects: dict[str, Any] = {}
    peers: dict[bytes, Any] = {}
    while True:
        try:
            cmd = msgpack.unpackb(conn.recv_bytes(), raw=False)
        except EOFError:
            return
        op = cmd["op"]
        try:
            if op == "init":
                if t is not None:  # close the previous one off the command path (ucx close takes ~1 s)
                    threading.Thread(target=t.close, daemon=True).start()
                    expects.clear()
                    peers.clear()
                t = KVTransport(cmd["engine"], cmd["rank"], TransportConfig.model_validate(cmd["config"]))
                regions = make_regions(cmd["n_regions"], cmd["num_blocks"], cmd["block_shape"], cmd["dtype"],
                                       cmd["seed"])
                t.register_regions(regions, layout_tag=cmd.get("layout_tag", ""))
                reply: Any = {"descriptor": t.descriptor(), "pid": os.getpid()}
            elif op == "expect":
                copies = [BlockCopy(*c) for c in cmd["copies"]]
                expects[cmd["tid"]] = t.expect(cmd["tid"], copies, cmd["deadline"])
                reply = {"armed": True}
            elif op == "result":
                reply = _result(expects.pop(cmd["tid"]).result(cmd.get("wait", 60)))
            elif op == "connect":
                peers[cmd["descriptor"]] = t.connect(cmd["descriptor"])
                reply = {"connected": True}
            elif op == "push":
                peer = peers.get(cmd["descriptor"]) or t.connect(cmd["descriptor"])
                peers[cmd["descriptor"]] = peer
                f = t.push(peer, cmd["tid"], cmd["path"], [BlockCopy(*c) for c in cmd["copies"]], cmd["deadline"])
                reply = _result(f.result(cmd["deadline"] + 10)) if cmd.get("wait", True) else {"started": True}
            elif op == "regions":
                reply = {"regions": [r.tobytes() for r in regions]}
            elif op == "exit":
                if t is not None:
                    t.close()
                conn.send_bytes(msgpack.packb({"bye": True}))
                return
            else:
                reply = {"error": f"unknown op {op}"}
        except Exception as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}", "type": type(exc).__name__,
                     "trace": traceback.format_exc()}
        conn.send_bytes(msgpack.packb(reply, use_bin_type=True))


class _Duplex:
    """Two one-way pipe connections seen as one (what `main` expects)."""

    def __init__(self, rfd: int, wfd: int) -> None:
        self._r = Connection(rfd, writable=False)
        self._w = Connection(wfd, readable=False)

    def recv_bytes(self) -> bytes:
        return self._r.recv_bytes()

    def send_bytes(self, data: bytes) -> None:
        self._w.send_bytes(data)

    def poll(self, timeout: float) -> bool:
        return self._r.poll(timeout)


def serve(rfd: int, wfd: int) -> None:
    main(_Duplex(rfd, wfd))


class _Proc:
    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def join(self, timeout: float) -> None:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def kill(self) -> None:
        self.popen.kill()


class Peer:
    """Parent-side handle of the child process (a fresh interpreter: no pytest, no fork of our threads)."""

    def __init__(self) -> None:
        to_child_r, to_child_w = os.pipe()
        to_parent_r, to_parent_w = os.pipe()
        here = str(Path(__file__).resolve().parent)
        code = f"import sys; sys.path.insert(0, {here!r}); import transport_peer; transport_peer.serve({to_child_r}, {to_parent_w})"
        self.proc = _Proc(subprocess.Popen([sys.executable, "-c", code], pass_fds=(to_child_r, to_parent_w)))
        os.close(to_child_r)
        os.close(to_parent_w)
        self.conn = _Duplex(to_parent_r, to_child_w)

    def call(self, timeout: float = 60.0, **cmd: Any) -> Any:
        self.conn.send_bytes(msgpack.packb(cmd, use_bin_type=True))
        if not self.conn.poll(timeout):
            raise TimeoutError(f"peer did not answer {cmd['op']} within {timeout}s")
        return msgpack.unpackb(self.conn.recv_bytes(), raw=False)

    def send(self, **cmd: Any) -> None:
        """Fire a command without waiting for the answer (collect it later with `answer`)."""
        self.conn.send_bytes(msgpack.packb(cmd, use_bin_type=True))

    def answer(self, timeout: float = 60.0) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"peer did not answer within {timeout}s")
        return msgpack.unpackb(self.conn.recv_bytes(), raw=False)

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.call(op="exit", timeout=15)
            except (OSError, EOFError, TimeoutError):
                pass
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL
        self.proc.join(5)

    def __del__(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
