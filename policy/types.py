"""The policy's vocabulary: every request and answer that crosses a process boundary.

Owned by `kvlane.policy`; used unchanged by the policy service (as wire messages), the router and the
connectors. Each type is a frozen pydantic model with `to_msgpack()` / `from_msgpack()` that validates on
the way in (unknown fields, wrong types and out-of-range values are refused with the field's name).
Never pickle; never import sockets, clocks, vLLM or torch here.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal, TypeVar

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError

#: Hard ceiling on one encoded message; the service applies its own (smaller or equal) frame limit.
MAX_MESSAGE_BYTES = 1 << 20

#: Ids and names: engine ids, GPU / NIC / link ids, path names. `#` occurs in topology link ids of parallel
#: cables (e.g. "s3--s29#2").
Name = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:/@#\-]+$")]
NonNeg = Annotated[int, Field(ge=0)]
Seconds = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]

M = TypeVar("M", bound="WireModel")


class SchemaError(ValueError):
    """A message that does not match its schema. `str()` names the offending field(s)."""


class WireModel(BaseModel):
    """Base of all policy messages: frozen, closed (no extra fields), msgpack round-trip."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_msgpack(self) -> bytes:
        return msgpack.packb(self.to_wire(), use_bin_type=True)

    @classmethod
    def from_wire(cls: type[M], obj: Any) -> M:
        if not isinstance(obj, dict):
            raise SchemaError(f"{cls.__name__}: expected a map, got {type(obj).__name__}")
        try:
            return cls.model_validate(obj)
        except ValidationError as exc:
            parts = []
            for err in exc.errors():
                loc = ".".join(str(p) for p in err["loc"]) or "<root>"
                parts.append(f"{loc}: {err['msg']}")
            raise SchemaError(f"{cls.__name__}: " + "; ".join(parts)) from None

    @classmethod
    def from_msgpack(cls: type[M], data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> M:
        if len(data) > max_bytes:
            raise SchemaError(f"{cls.__name__}: message of {len(data)} bytes exceeds the {max_bytes}-byte limit")
        try:
            obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except Exception as exc:  # msgpack raises several unrelated types for garbage
            raise SchemaError(f"{cls.__name__}: not valid msgpack ({exc.__class__.__name__})") from None
        return cls.from_wire(obj)


class Role(str, enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    BOTH = "both"

    def can_prefill(self) -> bool:
        return self in (Role.PREFILL, Role.BOTH)

    def can_decode(self) -> bool:
        return self in (Role.DECODE, Role.BOTH)


#: The `EngineInfo.endpoints` key naming the engine's family ("sglang", ...): P and D must share it.
ENGINE_KIND = "engine"


class EngineInfo(WireModel):
    """An engine (one TP group) joining the pool. `gpus[i]` is the topology GPU that TP rank i runs on."""

    engine_id: Name
    role: Role
    gpus: list[Name] = Field(min_length=1, max_length=64)
    #: Where clients reach it (e.g. {"http": "http://127.0.0.1:8100"}); opaque to the policy except
    #: `endpoints[ENGINE_KIND]` (e.g. "sglang"): only engines of one kind exchange KV (absent = "").
    endpoints: dict[Name, Annotated[str, Field(max_length=500)]] = Field(default_factory=dict, max_length=16)
    #: KV bytes one token occupies on this engine across all its ranks (0 = unknown).
    kv_bytes_per_token: NonNeg = 0
    #: Free KV capacity in bytes (0 = unknown); used for memory pressure when no load report says better.
    kv_capacity_bytes: NonNeg = 0

    @property
    def tp_size(self) -> int:
        return len(self.gpus)

    @property
    def kind(self) -> str:
        """The serving engine's family (`endpoints["engine"]`): KV moves only between engines of one kind."""
        return self.endpoints.get(ENGINE_KIND, "")


class LoadReport(WireModel):
    """What an engine tells the policy about itself, periodically (or the router on its behalf)."""

    engine_id: Name
    queue_depth: NonNeg = 0
    running: NonNeg = 0
    #: Fraction of KV memory in use, 0..1.
    memory_pressure: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0


class PairRequest(WireModel):
    """Ask for a (prefill, decode) pair for one request."""

    request_id: Name
    session_id: Name | None = None
    prompt_tokens: NonNeg = 0
    #: Estimated KV bytes the transfer will carry (0: derive from prompt_tokens and kv_bytes_per_token).
    kv_bytes: NonNeg = 0
    #: Fraction 0..1 of the prompt the caller expects to hit a decode-side cache (0 when unknown).
    expected_cache_hit: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0


class PairDecision(WireModel):
    """The chosen pair, and why: `breakdown` holds each weighted score term (lower total wins)."""

    request_id: Name
    prefill: Name
    decode: Name
    score: float
    breakdown: dict[str, float]
    #: "same_tile" | "adjacent_tile" | "same_cell" | "cross_cell" | "sticky"
    locality: str
    sticky: bool = False
    #: Set when a session's home decode engine changed: the old home (the move is reported, never silent).
    home_moved_from: Name | None = None
    candidates_scored: NonNeg = 0


class LeaseRequest(WireModel):
    """P asks to move `bytes` of KV to D, over `tp_size` rank-to-rank streams."""

    transfer_id: Name
    prefill: Name
    decode: Name
    bytes: NonNeg
    #: Allow the best-effort class (base path, no reservation) when credits are short and the transfer is small.
    best_effort_ok: bool = True


class PathGrant(WireModel):
    """The path granted to one TP rank: its name (e.g. "zcube-path1", "rail3", "fastlane", "local"), links,
    and the NIC ports at both ends (what the transport maps to UCX devices)."""

    rank: NonNeg
    path: Name
    links: list[Name] = Field(default_factory=list, max_length=64)
    src_nic: Name
    dst_nic: Name


class LeaseGrant(WireModel):
    lease_id: Name
    transfer_id: Name
    prefill: Name
    decode: Name
    bytes: NonNeg
    klass: Literal["reserved", "best_effort"]
    paths: list[PathGrant]
    granted_at: Seconds
    expires_at: Seconds


class LeaseDenied(WireModel):
    transfer_id: Name
    reason: str = Field(max_length=500)
    retry_after: Seconds


class RankOutcome(WireModel):
    rank: NonNeg
    path: Name
    bytes: NonNeg
    seconds: Seconds
    ok: bool


class TransferOutcome(WireModel):
    """Reported by P when a leased transfer ends (success or failure); feeds the path estimates."""

    lease_id: Name
    ok: bool
    bytes: NonNeg
    seconds: Seconds
    error: Annotated[str, Field(max_length=2000)] | None = None
    ranks: list[RankOutcome] = Field(default_factory=list, max_length=64)


class PolicyError(Exception):
    """A request the policy refuses; `code` is stable and machine-readable, the message says why."""

    code = "policy_error"


class UnknownEngine(PolicyError):
    code = "unknown_engine"


class NoPairAvailable(PolicyError):
    code = "no_pair"


class InvalidRequest(PolicyError):
    code = "invalid_request"
