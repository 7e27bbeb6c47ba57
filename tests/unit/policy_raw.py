"""Test helpers for the policy service (not a test module): a hand-driven raw connection that can send what a
well-behaved client never would, a hand-driven clock, the real policy on a small loopback fabric."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from typing import Any

import msgpack
from kvlane.integration.policy_service import PolicyServer, PolicyService, parse_address
from kvlane.integration.policy_service import protocol as P
from kvlane.policy.config import CreditConfig, PolicyConfig
from kvlane.policy.core import Policy
from kvlane.policy.topology import load_topology
from kvlane.policy.types import EngineInfo, LeaseRequest, Role


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_policy(lease_ttl_s: float = 10.0) -> Policy:
    """The real policy on a 4-GPU loopback fabric (GPUs n0.g0 .. n0.g3)."""
    return Policy(load_topology("loopback:gpus=4"), PolicyConfig(credits=CreditConfig(lease_ttl_s=lease_ttl_s)))


ENGINES = [
    EngineInfo(engine_id="p0", role=Role.PREFILL, gpus=["n0.g0"], kv_bytes_per_token=1024),
    EngineInfo(engine_id="d0", role=Role.DECODE, gpus=["n0.g1"], kv_bytes_per_token=1024),
]


def lease_req(tid: str, nbytes: int = 1 << 20) -> LeaseRequest:
    return LeaseRequest(transfer_id=tid, prefill="p0", decode="d0", bytes=nbytes)


class Raw:
    """One raw TCP connection to a policy service."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hello: dict):
        self.reader, self.writer, self.hello = reader, writer, hello

    @classmethod
    async def open(cls, address: str) -> Raw:
        host, port = parse_address(address)
        reader, writer = await asyncio.open_connection(host, port)
        hello = msgpack.unpackb(await asyncio.wait_for(P.read_frame(reader, 1 << 20), 10.0))["hello"]
        return cls(reader, writer, hello)

    async def send_bytes(self, body: bytes) -> None:
        await self.send_raw(struct.pack(">I", len(body)) + body)

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send(self, obj) -> None:
        await self.send_bytes(msgpack.packb(obj, use_bin_type=True))

    async def recv(self) -> dict:
        return msgpack.unpackb(await asyncio.wait_for(P.read_frame(self.reader, 1 << 20), 10.0))

    async def closed(self, timeout: float = 10.0) -> bool:
        """True when the server closed the connection (EOF within `timeout`)."""
        try:
            data = await asyncio.wait_for(self.reader.read(1), timeout)
        except ConnectionError:
            return True
        return data == b""

    async def aclose(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


def authed(secret: bytes, nonce: bytes, req_id: int, op: str, body: dict) -> dict:
    return {"v": 1, "id": req_id, "op": op, "body": body, "auth": P.compute_mac(secret, nonce, req_id, op, body)}


class ThreadedServer:
    """A policy server on its own event-loop thread, so plain blocking sockets (and hypothesis) can drive it."""

    def __init__(self, secret: bytes | None = None, max_frame: int = 64 * 1024, port: int = 0) -> None:
        self.loop = asyncio.new_event_loop()
        self.unhandled: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda _loop, ctx: self.unhandled.append(ctx))
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.service = PolicyService(make_policy(), sweep_interval=0.05)
        for info in ENGINES:
            self.service.policy.register_engine(info, 0.0)
        self.server = PolicyServer(self.service, "127.0.0.1", port, secret=secret, max_frame=max_frame,
                                   frame_timeout=0.5)
        self.run(self.server.start())
        self.port = self.server.port
        self.address = self.server.address

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(15)

    def close(self) -> None:
        self.run(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class Sock:
    """A blocking client connection speaking raw frames."""

    def __init__(self, port: int) -> None:
        self.s = socket.create_connection(("127.0.0.1", port), timeout=5.0)
        self.hello = self.recv()["hello"]

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.s.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def recv(self) -> dict[str, Any]:
        (length,) = struct.unpack(">I", self._exact(4))
        return msgpack.unpackb(self._exact(length), raw=False)

    def send_body(self, body: bytes) -> None:
        self.s.sendall(struct.pack(">I", len(body)) + body)

    def send(self, obj: Any) -> None:
        self.send_body(msgpack.packb(obj, use_bin_type=True))

    def reply_or_eof(self) -> dict[str, Any] | None:
        try:
            return self.recv()
        except (EOFError, ConnectionError):
            return None

    def eof(self) -> bool:
        try:
            return self.s.recv(1) == b""
        except ConnectionError:
            return True

    def close(self) -> None:
        self.s.close()
