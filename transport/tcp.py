"""TCP backend of kvlane.transport: one listening socket per path, one connection per (peer, path),
length-prefixed msgpack control frames and raw data frames read straight into the destination KV
views (no intermediate buffer). Runs inside KVTransport's loop thread; host memory only; never binds
anything but the configured host.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .wire import (
    MAX_CONTROL_BYTES,
    Auth,
    Data,
    Hello,
    PathAddress,
    Wire,
    WireError,
    decode_control,
    encode_control,
)

if TYPE_CHECKING:
    from .core import KVTransport

log = logging.getLogger("kvlane.transport.tcp")
_LEN = struct.Struct("<I")
_SOCKBUF = 4 << 20
_DRAIN_CHUNK = 1 << 20
#: Data frames carry at most this much, so a failed transfer stops within one frame.
FRAME_BYTES = 4 << 20


def _tune(sock: socket.socket) -> None:
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, _SOCKBUF)
        except OSError:
            pass


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _host_view(v: Any) -> memoryview:
    if not isinstance(v, np.ndarray):
        raise TypeError("the tcp backend moves host memory only; use the ucx backend for device memory")
    return memoryview(v).cast("B")


@dataclass(eq=False)
class _Arm:
    views: list[memoryview]
    remaining: int  # bytes not yet received
    fut: asyncio.Future[None]


class TcpLink:
    def __init__(self, backend: TcpBackend, sock: socket.socket, peer_key: str | None) -> None:
        self.backend = backend
        self.sock = sock
        self.peer_key = peer_key or "<unidentified>"
        self._identified = peer_key is not None  # accepted links: only after the hello (and AUTH) check out
        try:
            host, port = sock.getpeername()[:2]
            self.peer_addr = f"{host}:{port}"
        except OSError:
            self.peer_addr = "<unknown address>"
        self.loop = asyncio.get_running_loop()
        self.dead: asyncio.Future[str] = self.loop.create_future()
        self._wlock = asyncio.Lock()
        self._arms: dict[str, _Arm] = {}
        self._reader = asyncio.ensure_future(self._read_loop())

    # sending

    async def send_ctrl(self, msg: Wire) -> None:
        data = encode_control(msg)
        # shielded like data frames: a caller that gives up (a reply's 5 s wait, a push deadline) while the
        # socket is full must not leave half a frame on the stream, or the peer parses the next frame from
        # the middle of this one ("control message claims N bytes") and the connection is lost
        write = asyncio.ensure_future(self._write_ctrl(_LEN.pack(len(data)) + data))
        write.add_done_callback(_retrieve)  # its error (the link is then dead) may have nobody waiting
        await asyncio.shield(write)

    async def _write_ctrl(self, frame: bytes) -> None:
        async with self._wlock:
            await self._sendall(frame)

    async def send_runs(self, tid: str, tag_base: int, views: list[Any]) -> None:
        for i, v in enumerate(views):
            mv = _host_view(v)
            for off in range(0, mv.nbytes, FRAME_BYTES):
                chunk = mv[off:off + FRAME_BYTES]
                head = Data(tid=tid, i=i, offset=off, nbytes=chunk.nbytes).to_msgpack()
                # shielded: if the transfer is abandoned the frame still completes (the stream stays
                # parseable for the next transfer) and the loop stops before the next one
                await asyncio.shield(self._write_frame(_LEN.pack(len(head)) + head, chunk))

    async def _write_frame(self, head: bytes, body: memoryview) -> None:
        async with self._wlock:
            await self._sendall(head)
            await self._sendall(body)

    async def _sendall(self, data: Any) -> None:
        if self.dead.done():
            raise ConnectionError(f"link to {self.peer_key} is down: {self.dead.result()}")
        try:
            await self.loop.sock_sendall(self.sock, data)
        except OSError as exc:
            self._kill(f"send failed: {exc}")
            raise

    # receiving

    def arm_recv(self, tid: str, tag_base: int, views: list[Any]) -> asyncio.Future[None]:
        fut = self.loop.create_future()
        if self.dead.done():
            fut.set_exception(ConnectionError(f"link is down: {self.dead.result()}"))
            return fut
        mvs = [_host_view(v) for v in views]
        self._arms[tid] = _Arm(mvs, sum(m.nbytes for m in mvs), fut)
        return fut

    def disarm(self, tid: str) -> None:
        arm = self._arms.pop(tid, None)
        if arm is not None and not arm.fut.done():
            arm.fut.cancel()

    async def _recv_exact(self, mv: memoryview) -> None:
        while mv.nbytes:
            n = await self.loop.sock_recv_into(self.sock, mv)
            if n == 0:
                raise ConnectionError("peer closed the connection")
            mv = mv[n:]

    async def _read_loop(self) -> None:
        head = bytearray(_LEN.size)
        try:
            while True:
                await self._recv_exact(memoryview(head))
                (n,) = _LEN.unpack(head)
                if n > MAX_CONTROL_BYTES:
                    raise WireError(f"control frame of {n} bytes exceeds the {MAX_CONTROL_BYTES}-byte limit")
                buf = bytearray(n)
                await self._recv_exact(memoryview(buf))
                msg = decode_control(bytes(buf))
                if isinstance(msg, Data):
                    await self._on_data(msg)
                elif isinstance(msg, Hello):
                    desc = self.backend.core.on_hello(self, self.backend.path, msg)
                    if desc is not None:
                        self.peer_key, self._identified = desc.key, True
                elif isinstance(msg, Auth):
                    got = self.backend.core.on_auth(self, self.backend.path, msg)
                    if got is not None:
                        self.peer_key, self._identified = got[1].key, True
                elif not self._identified:
                    log.warning("tcp path %s of %s: refused %r from %s before a completed handshake; closing",
                                self.backend.path, self.backend.core.key, msg.t, self.peer_addr)
                    raise WireError(f"{msg.t!r} before a successful hello")
                else:
                    self.backend.core.on_control(self, self.backend.path, msg)
        except asyncio.CancelledError:
            self._kill("closed")
        except Exception as exc:
            self._kill(f"{type(exc).__name__}: {exc}")

    async def _on_data(self, msg: Data) -> None:
        arm = self._arms.get(msg.tid)
        if arm is None or msg.i >= len(arm.views) or msg.offset + msg.nbytes > arm.views[msg.i].nbytes:
            if arm is not None:  # a sender that does not follow its own offer: fail the transfer
                self.disarm(msg.tid)
                arm.fut.set_exception(WireError(f"data frame {msg.i} of {msg.nbytes} bytes does not match the offer"))
            await self._drain(msg.nbytes)  # late or unexpected bytes never touch KV memory
            return
        view = arm.views[msg.i][msg.offset:msg.offset + msg.nbytes]
        while view.nbytes:
            if self._arms.get(msg.tid) is not arm:  # abandoned mid-frame: the rest goes to scratch
                await self._drain(view.nbytes)
                return
            n = await self.loop.sock_recv_into(self.sock, view)
            if n == 0:
                raise ConnectionError("peer closed the connection")
            view = view[n:]
        arm.remaining -= msg.nbytes
        if arm.remaining <= 0:
            self._arms.pop(msg.tid, None)
            if not arm.fut.done():
                arm.fut.set_result(None)

    async def _drain(self, left: int) -> None:
        scratch = memoryview(bytearray(min(left, _DRAIN_CHUNK)))
        while left:
            k = min(left, scratch.nbytes)
            await self._recv_exact(scratch[:k])
            left -= k

    def _kill(self, reason: str) -> None:
        if self.dead.done():
            return
        self.dead.set_result(reason)
        for tid in list(self._arms):
            arm = self._arms.pop(tid)
            if not arm.fut.done():
                arm.fut.set_exception(ConnectionError(reason))
        try:
            self.sock.close()
        except OSError:
            pass
        self.backend.links.discard(self)
        self.backend.core.on_link_dead(self, reason)

    def close(self) -> None:
        self._kill("closed locally")
        if not self._reader.done():
            self._reader.cancel()


class TcpBackend:
    def __init__(self, core: KVTransport, path: str, host: str) -> None:
        self.core = core
        self.path = path
        self.host = host
        self.links: set[TcpLink] = set()
        self._lsock: socket.socket | None = None
        self._accept: asyncio.Task[None] | None = None

    async def start(self) -> PathAddress:
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind((self.host, 0))
        lsock.listen(64)
        lsock.setblocking(False)
        self._lsock = lsock
        self._accept = asyncio.ensure_future(self._accept_loop())
        return PathAddress(host=self.host, port=lsock.getsockname()[1])

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._lsock is not None
        while True:
            try:
                sock, _ = await loop.sock_accept(self._lsock)
            except asyncio.CancelledError:
                return
            except OSError as exc:
                log.warning("tcp path %s: accept failed: %s", self.path, exc)
                await asyncio.sleep(0.1)
                continue
            _tune(sock)
            self.links.add(TcpLink(self, sock, None))

    async def open(self, peer_key: str, addr: PathAddress, hello: Hello) -> TcpLink:
        if addr.host is None or addr.port is None:
            raise OSError(f"peer {peer_key} published no host:port for path {self.path!r}")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        _tune(sock)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (addr.host, addr.port))
        except BaseException:
            sock.close()
            raise
        link = TcpLink(self, sock, peer_key)
        self.links.add(link)
        await link.send_ctrl(hello)
        return link

    async def stop(self) -> None:
        if self._accept is not None:
            self._accept.cancel()
        if self._lsock is not None:
            self._lsock.close()
        for link in list(self.links):
            link.close()
