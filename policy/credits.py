"""The credit ledger: D ingress streams/bytes, per-link bandwidth quotas, and the leases that hold them.

Owned by `kvlane.policy`, run inside the policy service (through `Policy`). Topology-agnostic: the caller
says which links a lease reserves and at what rate. Time is always an argument; never reads a clock, never
frees a credit twice, never grants beyond capacity (tests/unit/test_credits.py checks this under any
interleaving).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .config import CreditConfig

Klass = Literal["reserved", "best_effort"]
LeaseState = Literal["active", "released", "expired", "dropped"]

#: Slack for float sums of link reservations.
_EPS = 1e-6


@dataclass
class Lease:
    lease_id: str
    transfer_id: str
    holder: str  # the prefill engine pushing the KV
    decode: str
    bytes: int
    klass: Klass
    #: Gbps reserved on each link (empty for best-effort).
    link_rates: dict[str, float]
    granted_at: float
    expires_at: float
    #: When the transfer should be done at its reserved rate (used for `retry_after`).
    expected_done: float
    #: Opaque to the ledger (the facade keeps the grant here).
    payload: Any = None
    state: LeaseState = "active"


@dataclass(frozen=True)
class Denial:
    reason: str
    retry_after: float


@dataclass
class _DecodeUse:
    streams: int = 0
    bytes: int = 0
    best_effort: int = 0
    best_effort_bytes: int = 0
    leases: set[str] = field(default_factory=set)


class CreditLedger:
    """Grants and takes back credits. `link_gbps(link_id)` gives a link's full speed; the ledger lets leases
    reserve `reservable_fraction` of it."""

    def __init__(self, config: CreditConfig, link_gbps: Callable[[str], float]):
        self.config = config
        self._link_gbps = link_gbps
        self._active: dict[str, Lease] = {}
        self._ended: OrderedDict[str, LeaseState] = OrderedDict()
        self._decode: dict[str, _DecodeUse] = {}
        self._link_reserved: dict[str, float] = {}
        self._link_leases: dict[str, set[str]] = {}
        self._holder_leases: dict[str, set[str]] = {}
        self._by_transfer: dict[str, str] = {}
        self._caps: dict[str, float] = {}
        self._expiry: list[tuple[float, str]] = []

    # ---- queries -------------------------------------------------------------------------------------------

    def link_capacity(self, link: str) -> float:
        """Reservable Gbps of a link."""
        cap = self._caps.get(link)
        if cap is None:
            if len(self._caps) > 1_000_000:
                self._caps.clear()
            cap = self._caps[link] = self._link_gbps(link) * self.config.reservable_fraction
        return cap

    def link_reserved(self, link: str) -> float:
        return self._link_reserved.get(link, 0.0)

    def link_fraction(self, link: str) -> float:
        """Reserved share of the link's reservable capacity, 0..1."""
        reserved = self._link_reserved.get(link)
        if not reserved:
            return 0.0
        cap = self.link_capacity(link)
        return min(1.0, reserved / cap) if cap > 0 else 1.0

    def reserved_view(self) -> Mapping[str, float]:
        """Live read-only view: link -> reserved Gbps (only links with a reservation appear)."""
        return self._link_reserved

    def links_in_use(self) -> dict[str, float]:
        return dict(self._link_reserved)

    def streams_in_use(self, decode: str) -> int:
        use = self._decode.get(decode)
        return use.streams if use else 0

    def bytes_in_flight(self, decode: str) -> int:
        use = self._decode.get(decode)
        return use.bytes if use else 0

    def best_effort_in_use(self, decode: str) -> int:
        use = self._decode.get(decode)
        return use.best_effort if use else 0

    def has_stream_credit(self, decode: str) -> bool:
        use = self._decode.get(decode)
        return use is None or use.streams < self.config.max_streams

    def decodes_in_use(self) -> dict[str, dict[str, int]]:
        return {
            d: {"streams": u.streams, "bytes": u.bytes, "best_effort": u.best_effort,
                "best_effort_bytes": u.best_effort_bytes}
            for d, u in self._decode.items() if u.leases
        }

    def get(self, lease_id: str) -> Lease | None:
        return self._active.get(lease_id)

    def active(self) -> list[Lease]:
        return list(self._active.values())

    def find_transfer(self, transfer_id: str) -> Lease | None:
        """The live lease of a transfer, if any (one transfer holds at most one live lease)."""
        lease_id = self._by_transfer.get(transfer_id)
        return self._active.get(lease_id) if lease_id is not None else None

    def ended_state(self, lease_id: str) -> LeaseState | None:
        return self._ended.get(lease_id)

    # ---- admission -----------------------------------------------------------------------------------------

    def check(self, decode: str, nbytes: int, klass: Klass, link_rates: Mapping[str, float],
              now: float) -> Denial | None:
        """Why a lease of this shape would be refused right now (None: it fits)."""
        cfg = self.config
        use = self._decode.get(decode) or _DecodeUse()
        if klass == "best_effort":
            if use.best_effort >= cfg.best_effort_max_streams:
                return Denial(
                    f"decode {decode} has {use.best_effort}/{cfg.best_effort_max_streams} best-effort "
                    "transfers in flight",
                    self._retry_after((self._active[i] for i in use.leases
                                       if self._active[i].klass == "best_effort"), now))
            return None
        if use.streams >= cfg.max_streams:
            return Denial(
                f"decode {decode} has {use.streams}/{cfg.max_streams} large KV streams in flight",
                self._retry_after((self._active[i] for i in use.leases if self._active[i].klass == "reserved"),
                                  now))
        if use.streams > 0 and use.bytes + nbytes > cfg.ingress_bytes:
            return Denial(
                f"decode {decode} ingress budget: {use.bytes} bytes in flight + {nbytes} > {cfg.ingress_bytes}",
                self._retry_after((self._active[i] for i in use.leases if self._active[i].klass == "reserved"),
                                  now))
        for link, rate in link_rates.items():
            reserved = self._link_reserved.get(link, 0.0)
            cap = self.link_capacity(link)
            if reserved > 0.0 and reserved + rate > cap + _EPS:
                return Denial(
                    f"link {link} quota: {reserved:.1f} Gbps reserved + {rate:.1f} > {cap:.1f} Gbps reservable",
                    self._retry_after((self._active[i] for i in self._link_leases.get(link, ())), now))
        return None

    def _ttl(self, nbytes: int) -> float:
        return self.config.lease_ttl_s + nbytes * 8 / (self.config.lease_ttl_floor_gbps * 1e9)

    def _retry_after(self, leases: Any, now: float) -> float:
        soonest = min((lease.expected_done for lease in leases), default=now)
        return max(self.config.min_retry_s, soonest - now)

    def acquire(self, *, lease_id: str, transfer_id: str, holder: str, decode: str, nbytes: int,
                klass: Klass, link_rates: Mapping[str, float], now: float, expected_seconds: float,
                payload: Any = None) -> Lease | Denial:
        """Grant all of it or nothing. Rates above a link's reservable capacity are clamped to it (a lone
        stream always fits on an idle link)."""
        if lease_id in self._active or lease_id in self._ended:
            raise ValueError(f"lease id {lease_id!r} was already used")
        if transfer_id in self._by_transfer:
            raise ValueError(f"transfer {transfer_id!r} already holds lease {self._by_transfer[transfer_id]!r}")
        if nbytes < 0:
            raise ValueError(f"lease bytes must be >= 0, got {nbytes}")
        rates: dict[str, float] = {}
        if klass == "reserved":
            for link, rate in link_rates.items():
                if rate <= 0:
                    raise ValueError(f"link {link}: reserved rate must be > 0 Gbps, got {rate}")
                rates[link] = min(rate, self.link_capacity(link))
        denial = self.check(decode, nbytes, klass, rates, now)
        if denial is not None:
            return denial
        ttl = self._ttl(nbytes)
        lease = Lease(lease_id=lease_id, transfer_id=transfer_id, holder=holder, decode=decode, bytes=nbytes,
                      klass=klass, link_rates=rates, granted_at=now, expires_at=now + ttl,
                      expected_done=now + min(max(expected_seconds, 0.0), ttl), payload=payload)
        use = self._decode.setdefault(decode, _DecodeUse())
        if klass == "reserved":
            use.streams += 1
            use.bytes += nbytes
        else:
            use.best_effort += 1
            use.best_effort_bytes += nbytes
        use.leases.add(lease_id)
        for link, rate in rates.items():
            self._link_reserved[link] = self._link_reserved.get(link, 0.0) + rate
            self._link_leases.setdefault(link, set()).add(lease_id)
        self._holder_leases.setdefault(holder, set()).add(lease_id)
        self._by_transfer[transfer_id] = lease_id
        self._active[lease_id] = lease
        heapq.heappush(self._expiry, (lease.expires_at, lease_id))
        return lease

    # ---- ending leases ---------------------------------------------------------------------------------------

    def _end(self, lease: Lease, state: LeaseState) -> None:
        del self._active[lease.lease_id]
        lease.state = state
        self._ended[lease.lease_id] = state
        while len(self._ended) > self.config.ended_memory:
            self._ended.popitem(last=False)
        use = self._decode[lease.decode]
        if lease.klass == "reserved":
            use.streams -= 1
            use.bytes -= lease.bytes
        else:
            use.best_effort -= 1
            use.best_effort_bytes -= lease.bytes
        use.leases.discard(lease.lease_id)
        if not use.leases:
            del self._decode[lease.decode]
        for link, rate in lease.link_rates.items():
            holders = self._link_leases[link]
            holders.discard(lease.lease_id)
            if holders:
                self._link_reserved[link] = max(0.0, self._link_reserved[link] - rate)
            else:  # last one out: reset exactly, no float residue
                del self._link_leases[link]
                del self._link_reserved[link]
        if self._by_transfer.get(lease.transfer_id) == lease.lease_id:
            del self._by_transfer[lease.transfer_id]
        held = self._holder_leases[lease.holder]
        held.discard(lease.lease_id)
        if not held:
            del self._holder_leases[lease.holder]

    def release(self, lease_id: str, now: float) -> Literal["released", "expired", "already_ended", "unknown"]:
        """End a lease its holder is done with. Only the first release of a live lease frees anything:
        a second release answers "already_ended"; a lease past its expiry is ended as expired and refused."""
        lease = self._active.get(lease_id)
        if lease is None:
            return "already_ended" if lease_id in self._ended else "unknown"
        if now >= lease.expires_at:
            self._end(lease, "expired")
            return "expired"
        self._end(lease, "released")
        return "released"

    def renew(self, lease_id: str, now: float) -> Lease | None:
        """Its holder still works on the transfer: move the expiry to `now + ttl`, capped at `granted_at +
        lease_max_s` (never earlier than it was). Returns the lease, or None when it is not live: unknown,
        ended, or already past its expiry (then it is ended as expired here, as `release` would)."""
        lease = self._active.get(lease_id)
        if lease is None:
            return None
        if now >= lease.expires_at:
            self._end(lease, "expired")
            return None
        new = min(now + self._ttl(lease.bytes), lease.granted_at + self.config.lease_max_s)
        if new > lease.expires_at:
            lease.expires_at = new
            heapq.heappush(self._expiry, (new, lease_id))  # the old entry stays behind; `expire` skips it
        return lease

    def expire(self, now: float) -> list[Lease]:
        """End every lease whose expiry is at or before `now`; returns them."""
        out = []
        while self._expiry and self._expiry[0][0] <= now:
            _, lease_id = heapq.heappop(self._expiry)
            lease = self._active.get(lease_id)
            if lease is not None and lease.expires_at <= now:  # not a renewed lease's stale entry
                self._end(lease, "expired")
                out.append(lease)
        return out

    def expire_one(self, lease_id: str) -> Lease | None:
        """End one live lease as expired before its time (fault injection; an operator's revoke). Returns it,
        or None when it is not live (unknown, released or already expired)."""
        lease = self._active.get(lease_id)
        if lease is None:
            return None
        self._end(lease, "expired")
        return lease

    def drop_holder(self, engine_id: str, now: float) -> list[Lease]:
        """The prefill engine died or left: end the leases it holds."""
        out = [self._active[i] for i in sorted(self._holder_leases.get(engine_id, ()))]
        for lease in out:
            self._end(lease, "dropped")
        return out

    def drop_decode(self, engine_id: str, now: float) -> list[Lease]:
        """The decode engine died or left: end the leases towards it."""
        use = self._decode.get(engine_id)
        out = [self._active[i] for i in sorted(use.leases)] if use else []
        for lease in out:
            self._end(lease, "dropped")
        return out
