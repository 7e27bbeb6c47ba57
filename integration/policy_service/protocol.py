"""The policy service's wire protocol: length-prefixed msgpack frames, request/reply envelopes, the op
table with each op's body schema, the HMAC that authenticates a request, and the error codes.

Shared by the server (policy-service process) and every client (router, connectors). Pure encoding: no
sockets are opened here, no clock is read, and nothing is ever pickled.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import struct
from dataclasses import dataclass
from typing import Annotated, Any

import msgpack
from kvlane.policy.types import (
    MAX_MESSAGE_BYTES,
    EngineInfo,
    LeaseDenied,
    LeaseGrant,
    LeaseRequest,
    LoadReport,
    Name,
    PairRequest,
    PolicyError,
    SchemaError,
    Seconds,
    TransferOutcome,
    WireModel,
)
from pydantic import BaseModel, ConfigDict, Field, StrictBytes, StrictInt, StrictStr, model_validator

PROTOCOL_VERSION = 1
#: Default (and maximum) size of one frame's body; the 4-byte length prefix is not counted.
DEFAULT_MAX_FRAME = 1 << 20
MAX_FRAME_CEILING = MAX_MESSAGE_BYTES
#: Encoded size limits of the opaque blobs the service stores for others.
MAX_ANNOUNCE_PAYLOAD = 64 * 1024
MAX_RANK_DESCRIPTOR = 64 * 1024
#: Deepest nesting of lists/maps inside an announce payload (receivers must be able to walk it recursively).
MAX_PAYLOAD_DEPTH = 32
#: Longest a single await_announce may block on the server.
MAX_AWAIT_SECONDS = 600.0
#: TP ranks per engine (EngineInfo.gpus allows at most 64).
MAX_RANKS = 64
#: Transfer ids one transfer_status call may ask about.
MAX_STATUS_IDS = 1024
NONCE_BYTES = 16
MAC_BYTES = 32
_MAC_DOMAIN = b"kvlane-policy-v1"
_LEN = struct.Struct(">I")


# --------------------------------------------------------------------------------------------------
# Errors. Every error reply carries a stable `code`; clients turn it back into a PolicyError subclass.
# --------------------------------------------------------------------------------------------------


class ServiceError(PolicyError):
    """An error raised by the service layer (not by the policy); `code` may be set per instance."""

    code = "service_error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class BadRequest(ServiceError):
    """A well-framed request that is not valid: garbage msgpack, a bad envelope, or a body failing its schema."""

    code = "bad_request"


class UnknownOp(ServiceError):
    code = "unknown_op"


class AuthFailed(ServiceError):
    code = "auth_failed"


class FrameTooLarge(ServiceError):
    code = "frame_too_large"


class PayloadTooLarge(ServiceError):
    code = "payload_too_large"


class AnnounceTimeout(ServiceError):
    """await_announce saw no announcement for the transfer within its timeout."""

    code = "announce_timeout"


class CallTimeout(ServiceError):
    """The client's per-call deadline passed before the reply arrived (raised client-side)."""

    code = "call_timeout"


class ConnectionLost(ServiceError):
    """The connection dropped (or could not be made) before the reply arrived (raised client-side)."""

    code = "connection_lost"


class Busy(ServiceError):
    code = "busy"


def _all_subclasses(cls: type) -> list[type]:
    out: list[type] = []
    sub: type
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


def error_from_wire(code: str, message: str) -> PolicyError:
    """Rebuild the exception a server's error reply stands for: the PolicyError subclass whose class-level
    `code` matches (e.g. `no_pair` -> NoPairAvailable), else a ServiceError carrying that code."""
    for cls in _all_subclasses(PolicyError):
        if cls.__dict__.get("code") == code:
            try:
                exc = cls(message)
            except Exception:  # a subclass with a different constructor: fall back to the generic one
                break
            exc.code = code
            return exc
    return ServiceError(message, code=code)


# --------------------------------------------------------------------------------------------------
# Frames
# --------------------------------------------------------------------------------------------------


def encode_frame(obj: Any, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    if len(body) > max_frame:
        raise FrameTooLarge(f"frame of {len(body)} bytes exceeds the {max_frame}-byte limit")
    return _LEN.pack(len(body)) + body


class FrameTimeout(ServiceError):
    """A frame's body did not arrive within the frame timeout after its length prefix (a stalled sender)."""

    code = "frame_timeout"


async def read_frame(reader: asyncio.StreamReader, max_frame: int, body_timeout: float | None = None) -> bytes:
    """Read one frame's body. Waiting for a frame to start is unbounded (idle connections are fine), but once
    its length prefix is in, the rest must arrive within `body_timeout` seconds (FrameTimeout). Raises
    FrameTooLarge on an oversized length prefix WITHOUT reading the body, asyncio.IncompleteReadError on EOF."""
    head = await reader.readexactly(_LEN.size)
    (length,) = _LEN.unpack(head)
    if length > max_frame:
        raise FrameTooLarge(f"frame length {length} exceeds the {max_frame}-byte limit")
    if body_timeout is None:
        return await reader.readexactly(length)
    try:
        return await asyncio.wait_for(reader.readexactly(length), body_timeout)
    except asyncio.TimeoutError:
        raise FrameTimeout(f"frame of {length} bytes not complete within {body_timeout:g} s") from None


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack ext type {code} is not part of the protocol")


def decode_body(data: bytes, max_frame: int) -> Any:
    """msgpack -> Python objects (str keys only, bytes stay bytes, no ext types except the standard timestamp).
    Raises BadRequest on garbage."""
    try:  # len(data) <= max_frame already
        return msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_no_ext)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise BadRequest(f"frame is not valid msgpack ({exc.__class__.__name__}: {exc})") from None


# --------------------------------------------------------------------------------------------------
# Envelopes
# --------------------------------------------------------------------------------------------------

RequestId = Annotated[StrictInt, Field(ge=1, lt=1 << 63)]


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RequestEnvelope(_Strict):
    v: StrictInt
    id: RequestId
    op: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    body: dict[StrictStr, Any] = Field(default_factory=dict)
    auth: StrictBytes | None = None

    @model_validator(mode="after")
    def _version(self) -> RequestEnvelope:
        if self.v != PROTOCOL_VERSION:
            raise ValueError(f"unsupported protocol version {self.v} (this server speaks {PROTOCOL_VERSION})")
        return self


def parse_request(obj: Any) -> RequestEnvelope:
    """Validate a decoded request frame. Raises BadRequest naming the bad field(s)."""
    if not isinstance(obj, dict):
        raise BadRequest(f"request envelope: expected a map, got {type(obj).__name__}")
    try:
        return RequestEnvelope.model_validate(obj)
    except Exception as exc:
        raise BadRequest("request envelope: " + _pydantic_msg(exc)) from None


def _pydantic_msg(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if errors is None:
        return str(exc)
    parts = []
    for err in errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def request_frame(req_id: int, op: str, body: dict[str, Any], auth: bytes | None = None) -> dict[str, Any]:
    env: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": req_id, "op": op, "body": body}
    if auth is not None:
        env["auth"] = auth
    return env


def ok_reply(req_id: int, body: dict[str, Any]) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": req_id, "ok": True, "body": body}


def error_reply(req_id: int, code: str, message: str) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": req_id, "ok": False, "error": {"code": code, "message": message[:2000]}}


def hello_frame(nonce: bytes, auth_required: bool, max_frame: int, boot: bytes | None = None) -> dict[str, Any]:
    """First frame the server sends on every connection. `boot` (8 random bytes per server start) lets a client
    tell a restarted service (which has lost its state) from a dropped connection to the same one."""
    hello: dict[str, Any] = {"server": "kvlane-policy", "nonce": nonce, "auth": auth_required, "max_frame": max_frame}
    if boot is not None:
        hello["boot"] = boot
    return {"v": PROTOCOL_VERSION, "hello": hello}


# --------------------------------------------------------------------------------------------------
# Authentication
# --------------------------------------------------------------------------------------------------


def compute_mac(secret: bytes, nonce: bytes, req_id: int, op: str, body: dict[str, Any]) -> bytes:
    """HMAC-SHA256 over msgpack([domain, server nonce, id, op, body]). The nonce is fresh per connection
    (sent in the hello) and ids must strictly increase on a connection, so a captured request cannot be
    replayed on another connection nor twice on the same one."""
    msg = msgpack.packb([_MAC_DOMAIN, nonce, req_id, op, body], use_bin_type=True)
    return hmac.new(secret, msg, hashlib.sha256).digest()


def verify_mac(secret: bytes, nonce: bytes, env: RequestEnvelope) -> bool:
    if env.auth is None or len(env.auth) != MAC_BYTES:
        return False
    return hmac.compare_digest(compute_mac(secret, nonce, env.id, env.op, env.body), env.auth)


def load_secret(secret_file: str | None = None, env: dict[str, str] | None = None) -> bytes | None:
    """The shared secret: the file's bytes (surrounding whitespace stripped), else $KVLANE_SECRET, else None."""
    if secret_file:
        with open(secret_file, "rb") as fh:
            secret = fh.read().strip()
        if not secret:
            raise ValueError(f"secret file {secret_file} is empty")
        return secret
    import os

    value = (env if env is not None else os.environ).get("KVLANE_SECRET", "")
    return value.encode() if value else None


# --------------------------------------------------------------------------------------------------
# Op bodies that are not policy types (service plumbing), and the op table
# --------------------------------------------------------------------------------------------------


class BinModel(WireModel):
    """A service message that may carry raw bytes: dumped in python mode so bytes stay msgpack bin."""

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="python")


class Empty(WireModel):
    pass


class SnapshotBody(WireModel):
    """Optional caps, passed to the policy's snapshot when set (keep big pools' snapshots under max_frame)."""

    max_paths: Annotated[StrictInt, Field(ge=1, le=100_000)] | None = None
    hottest: Annotated[StrictInt, Field(ge=0, le=10_000)] | None = None


class EngineRef(WireModel):
    engine_id: Name


class RenewLeaseBody(WireModel):
    lease_id: Name


class ReleaseLeaseBody(BinModel):
    lease_id: Name
    outcome: TransferOutcome | None = None


def nesting_depth(obj: Any, limit: int) -> int:
    """Depth of nested lists/tuples/maps in `obj` (a scalar is 0), walked without recursion; stops counting
    once past `limit` (returns limit + 1)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(obj, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, tuple, dict)):
            depth += 1
            if depth > limit:
                return limit + 1
            deepest = max(deepest, depth)
            stack.extend((child, depth) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


class AnnounceBody(BinModel):
    transfer_id: Name
    payload: dict[StrictStr, Any]

    @model_validator(mode="after")
    def _shallow(self) -> AnnounceBody:
        if nesting_depth(self.payload, MAX_PAYLOAD_DEPTH) > MAX_PAYLOAD_DEPTH:
            raise ValueError(f"payload nested deeper than {MAX_PAYLOAD_DEPTH} levels")
        return self


class AwaitAnnounceBody(WireModel):
    transfer_id: Name
    timeout_s: Annotated[float, Field(ge=0.0, le=MAX_AWAIT_SECONDS, allow_inf_nan=False)]


class AbortTransferBody(WireModel):
    """P gave a transfer up (push failed, announce mismatch, lease never granted): D stops waiting for it."""

    transfer_id: Name
    reason: Annotated[StrictStr, Field(max_length=500)]


class TransferStatusBody(WireModel):
    transfer_ids: Annotated[list[Name], Field(max_length=MAX_STATUS_IDS)]


class RegisterRankBody(BinModel):
    engine_id: Name
    rank: Annotated[StrictInt, Field(ge=0, lt=MAX_RANKS)]
    descriptor: Annotated[StrictBytes, Field(max_length=MAX_RANK_DESCRIPTOR)]


# Reply bodies (validated by the client).


class RemovedReply(WireModel):
    removed: bool


class ReleasedReply(WireModel):
    released: bool


class RenewedReply(WireModel):
    """`expires_at` (policy-service clock) when renewed; None: the lease is gone, its transfer must stop."""

    expires_at: Seconds | None = None


class LeaseReply(WireModel):
    """Exactly one of `grant` / `denied`."""

    grant: LeaseGrant | None = None
    denied: LeaseDenied | None = None

    @model_validator(mode="after")
    def _one(self) -> LeaseReply:
        if (self.grant is None) == (self.denied is None):
            raise ValueError("exactly one of grant / denied must be set")
        return self


class EnginesReply(WireModel):
    engines: list[EngineInfo]


class PingReply(WireModel):
    server_time: float
    version: int


class AnnounceReply(WireModel):
    expires_at: float


class AwaitAnnounceReply(BinModel):
    payload: dict[StrictStr, Any]


class TransferStatusReply(WireModel):
    #: transfer_id -> why it ended without its KV, for each id asked about that did (others are not listed).
    aborted: dict[Name, Annotated[StrictStr, Field(max_length=600)]]


class RankEntry(BinModel):
    rank: Annotated[StrictInt, Field(ge=0, lt=MAX_RANKS)]
    descriptor: StrictBytes


class RanksReply(BinModel):
    engine_id: Name
    ranks: list[RankEntry]


@dataclass(frozen=True)
class OpSpec:
    body: type[WireModel]
    #: Safe for the client to resend after a dropped connection (same effect if it ran twice).
    idempotent: bool


OPS: dict[str, OpSpec] = {
    "ping": OpSpec(Empty, True),
    "register_engine": OpSpec(EngineInfo, True),  # the same EngineInfo again is a no-op
    "remove_engine": OpSpec(EngineRef, False),
    "list_engines": OpSpec(Empty, True),
    "report_load": OpSpec(LoadReport, True),
    "select_pair": OpSpec(PairRequest, False),
    "acquire_lease": OpSpec(LeaseRequest, False),
    "release_lease": OpSpec(ReleaseLeaseBody, True),
    "renew_lease": OpSpec(RenewLeaseBody, True),  # a second renewal only moves the expiry again
    "snapshot": OpSpec(SnapshotBody, True),
    "announce": OpSpec(AnnounceBody, True),
    "await_announce": OpSpec(AwaitAnnounceBody, True),
    "abort_transfer": OpSpec(AbortTransferBody, True),  # the first reason stays
    "transfer_status": OpSpec(TransferStatusBody, True),
    "register_rank": OpSpec(RegisterRankBody, True),
    "get_ranks": OpSpec(EngineRef, True),
}


def parse_body(model: type[WireModel], body: dict[str, Any]) -> WireModel:
    try:
        return model.from_wire(body)
    except SchemaError as exc:
        raise BadRequest(f"invalid body: {exc}") from None
