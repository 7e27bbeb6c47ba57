"""Control-plane rendezvous kept by the policy service (not by the pure policy): the announce board where a
decode engine posts where a transfer's KV should land and the prefill side long-polls for it, and the store
of opaque per-TP-rank transport descriptors. Runs inside the policy-service event loop; never interprets the
payloads it holds, and never blocks (waiting is an awaited future with a timeout).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .protocol import MAX_ANNOUNCE_PAYLOAD, MAX_RANKS, AnnounceTimeout, Busy, PayloadTooLarge


@dataclass
class _Entry:
    payload: dict[str, Any]
    size: int
    expires_at: float


@dataclass
class AnnounceBoard:
    """transfer_id -> payload, each entry living `ttl` seconds of the service clock after its last announce.

    Announcing again replaces the payload (and restarts its ttl). Reading does not consume: every TP rank of
    the prefill engine may await the same transfer. Entries leave by ttl only (the sweep calls `expire`).
    """

    ttl: float = 120.0
    max_payload: int = MAX_ANNOUNCE_PAYLOAD
    max_entries: int = 10_000
    max_total_bytes: int = 64 << 20
    _entries: dict[str, _Entry] = field(default_factory=dict)
    _waiters: dict[str, list[asyncio.Future[dict[str, Any]]]] = field(default_factory=dict)
    _total: int = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def waiting(self) -> int:
        return sum(len(w) for w in self._waiters.values())

    def post(self, transfer_id: str, payload: dict[str, Any], now: float) -> float:
        """Store (or replace) the payload and wake every waiter. Returns the entry's expiry time."""
        size = len(msgpack.packb(payload, use_bin_type=True))
        if size > self.max_payload:
            raise PayloadTooLarge(
                f"announce payload for {transfer_id!r} is {size} bytes; the limit is {self.max_payload}"
            )
        old = self._entries.get(transfer_id)
        if old is not None and old.expires_at <= now:
            self._drop(transfer_id)
            old = None
        if old is None and len(self._entries) >= self.max_entries:
            raise Busy(f"announce board full ({self.max_entries} live transfers); retry later")
        old_size = old.size if old is not None else 0
        if self._total - old_size + size > self.max_total_bytes:
            raise Busy(f"announce board holds {self._total} bytes; limit {self.max_total_bytes}; retry later")
        self._drop(transfer_id)
        expires_at = now + self.ttl
        self._entries[transfer_id] = _Entry(payload, size, expires_at)
        self._total += size
        for fut in self._waiters.pop(transfer_id, []):
            if not fut.done():
                fut.set_result(payload)
        return expires_at

    def get(self, transfer_id: str, now: float) -> dict[str, Any] | None:
        entry = self._entries.get(transfer_id)
        if entry is None or entry.expires_at <= now:
            return None
        return entry.payload

    async def wait(self, transfer_id: str, timeout_s: float, now: float) -> dict[str, Any]:
        """The payload, as soon as it is (or already was) announced. Raises AnnounceTimeout after
        `timeout_s` real seconds without one."""
        found = self.get(transfer_id, now)
        if found is not None:
            return found
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(transfer_id, []).append(fut)
        try:
            return await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError:
            raise AnnounceTimeout(
                f"no announce for transfer {transfer_id!r} within {timeout_s:g} s"
            ) from None
        finally:
            waiters = self._waiters.get(transfer_id)
            if waiters is not None:
                if fut in waiters:
                    waiters.remove(fut)
                if not waiters:
                    del self._waiters[transfer_id]

    def expire(self, now: float) -> list[str]:
        gone = [tid for tid, e in self._entries.items() if e.expires_at <= now]
        for tid in gone:
            self._drop(tid)
        return gone

    def _drop(self, transfer_id: str) -> None:
        entry = self._entries.pop(transfer_id, None)
        if entry is not None:
            self._total -= entry.size


@dataclass
class AbortBoard:
    """transfer_id -> why the transfer ended without its KV (P gave it up, or its lease expired), kept `ttl`
    seconds so the decode engine waiting for that KV learns it on its next `transfer_status` poll instead of
    at its receive deadline. The first reason posted stays; the oldest entry leaves when the board is full."""

    ttl: float = 120.0
    max_entries: int = 10_000
    _entries: dict[str, tuple[str, float]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self._entries)

    def post(self, transfer_id: str, reason: str, now: float) -> None:
        old = self._entries.get(transfer_id)
        if old is not None and old[1] > now:
            return
        self._entries.pop(transfer_id, None)
        while len(self._entries) >= self.max_entries:
            del self._entries[next(iter(self._entries))]  # dicts keep insertion order: the oldest goes
        self._entries[transfer_id] = (reason, now + self.ttl)

    def aborted(self, transfer_ids: list[str], now: float) -> dict[str, str]:
        return {t: e[0] for t in transfer_ids if (e := self._entries.get(t)) is not None and e[1] > now}

    def expire(self, now: float) -> None:
        for tid in [t for t, e in self._entries.items() if e[1] <= now]:
            del self._entries[tid]


@dataclass
class RankStore:
    """engine_id -> {rank: opaque transport descriptor}. Bounded in engines; ranks < MAX_RANKS."""

    max_engines: int = 4096
    _ranks: dict[str, dict[int, bytes]] = field(default_factory=dict)

    def put(self, engine_id: str, rank: int, descriptor: bytes) -> None:
        if not 0 <= rank < MAX_RANKS:
            raise ValueError(f"rank {rank} out of range 0..{MAX_RANKS - 1}")
        if engine_id not in self._ranks and len(self._ranks) >= self.max_engines:
            raise Busy(f"rank store full ({self.max_engines} engines)")
        self._ranks.setdefault(engine_id, {})[rank] = descriptor

    def get(self, engine_id: str) -> dict[int, bytes]:
        return dict(sorted(self._ranks.get(engine_id, {}).items()))

    def drop(self, engine_id: str) -> None:
        self._ranks.pop(engine_id, None)
