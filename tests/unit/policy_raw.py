"""Test helpers for the policy service (not a test module): a hand-driven raw connection that can send what a
well-behaved client never would, a hand-driven clock, the real policy on a small loopback fabric."""

from __future__ import annotations

import asyncio
import struct

import msgpack
from kvlane.integration.policy_service import parse_address
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
