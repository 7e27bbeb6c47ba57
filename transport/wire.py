"""Wire formats of kvlane.transport: the engine-rank descriptor and the per-transfer control messages.

Encoded by one worker process, decoded by its peer; every decode checks the size limit first and then
the schema (pydantic, closed models). msgpack only, never pickle; no I/O here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import msgpack
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

MAX_DESCRIPTOR_BYTES = 64 << 10
MAX_CONTROL_BYTES = 1 << 20
#: One transfer may carry at most this many (coalesced) runs.
MAX_RUNS = 1 << 16

Ident = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9_.:/@\-]+$")]
NonNeg = Annotated[int, Field(ge=0)]
Pos = Annotated[int, Field(gt=0)]
Text = Annotated[str, Field(max_length=4096)]


class WireError(ValueError):
    """A descriptor or control message that is too large, not msgpack, or off-schema (names the field)."""


M = TypeVar("M", bound="Wire")


def _unpack(data: bytes, max_bytes: int, what: str) -> Any:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"{what}: expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise WireError(f"{what}: {len(data)} bytes exceeds the {max_bytes}-byte limit")
    try:
        return msgpack.unpackb(bytes(data), raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise WireError(f"{what}: not valid msgpack ({exc.__class__.__name__})") from None


def _explain(what: str, exc: ValidationError) -> WireError:
    parts = [f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()[:5]]
    return WireError(f"{what}: " + "; ".join(parts))


class Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def to_msgpack(self) -> bytes:
        # unset optional fields (all default to None) stay off the wire: without a secret the frames are
        # byte-identical to those of peers that predate authentication
        return msgpack.packb(self.model_dump(mode="python", exclude_none=True), use_bin_type=True)


class PathAddress(Wire):
    """How to reach one path of an engine rank: a UCX worker address or a TCP host:port."""

    ucx_address: bytes | None = Field(default=None, max_length=16 << 10)
    host: str | None = Field(default=None, max_length=255)
    port: int | None = Field(default=None, ge=1, le=65535)


class RegionInfo(Wire):
    dtype: str = Field(min_length=1, max_length=32)
    block_shape: list[NonNeg] = Field(max_length=8)
    block_bytes: Pos
    num_blocks: Pos
    nbytes: Pos


class Descriptor(Wire):
    """Everything a peer needs to connect to one (engine, TP rank) and check layout compatibility."""

    engine_id: Ident
    rank: NonNeg
    tp_size: Pos
    backend: Literal["ucx", "tcp"]
    paths: dict[Ident, PathAddress] = Field(min_length=1, max_length=64)
    regions: list[RegionInfo] = Field(max_length=4096)
    layout_tag: str = Field(default="", max_length=256)

    @property
    def key(self) -> str:
        return f"{self.engine_id}/rank{self.rank}"

    @classmethod
    def from_msgpack(cls, data: bytes) -> Descriptor:
        obj = _unpack(data, MAX_DESCRIPTOR_BYTES, "descriptor")
        try:
            return cls.model_validate(obj)
        except ValidationError as exc:
            raise _explain("descriptor", exc) from None


# ---- control messages (one envelope, discriminated by "t") ----

Nonce = Annotated[bytes, Field(min_length=16, max_length=64)]
Mac = Annotated[bytes, Field(min_length=32, max_length=32)]


class Hello(Wire):
    """Sender → receiver. ``nonce`` is set when the sender has a shared secret (its challenge to the receiver)."""

    t: Literal["hello"] = "hello"
    descriptor: bytes = Field(max_length=MAX_DESCRIPTOR_BYTES)
    nonce: Nonce | None = None


class Challenge(Wire):
    """Receiver → sender (receiver has a secret): answer with `Auth` over this fresh, single-use nonce."""

    t: Literal["challenge"] = "challenge"
    key: Ident
    nonce: Nonce


class Auth(Wire):
    """Sender → receiver: HMAC answer to the challenge ``nonce`` (see `kvlane.transport.auth`)."""

    t: Literal["auth"] = "auth"
    key: Ident
    nonce: Nonce
    mac: Mac


class HelloOk(Wire):
    """Receiver → sender: accepted; ``mac`` proves the receiver's secret when authentication is on."""

    t: Literal["hello_ok"] = "hello_ok"
    key: Ident
    mac: Mac | None = None


class HelloErr(Wire):
    t: Literal["hello_err"] = "hello_err"
    key: Ident
    error: Text


class Offer(Wire):
    """Sender → receiver: the destination runs ``(region, dst_offset, nbytes)`` in send order; run i
    travels with tag ``tag_base + i`` (ucx) or as data frame i (tcp), unless ``packed``."""

    t: Literal["offer"] = "offer"
    tid: Ident
    sender: Ident
    runs: list[tuple[NonNeg, NonNeg, Pos]] = Field(min_length=1, max_length=MAX_RUNS)
    tag_base: NonNeg = 0
    wait_s: float = Field(ge=0, allow_inf_nan=False)
    #: The runs travel as ONE message (tag ``tag_base`` / data frame 0), concatenated in run order, and the
    #: receiver scatters them (host memory only; `TransportConfig.pack_max_bytes`).
    packed: bool = False
    #: With a shared secret: a number used once per session, and the session MAC over the rest of the offer.
    seq: NonNeg | None = None
    mac: Mac | None = None


class Ready(Wire):
    t: Literal["ready"] = "ready"
    tid: Ident
    mac: Mac | None = None  # with a shared secret: session MAC bound to the offer (kvlane.transport.auth)


class Reject(Wire):
    t: Literal["reject"] = "reject"
    tid: Ident
    error: Text
    mac: Mac | None = None


class Done(Wire):
    t: Literal["done"] = "done"
    tid: Ident
    nbytes: NonNeg
    mac: Mac | None = None


class Fail(Wire):
    t: Literal["fail"] = "fail"
    tid: Ident
    error: Text
    mac: Mac | None = None


class Data(Wire):
    """tcp only: header of bytes ``[offset, offset + nbytes)`` of run ``i`` of transfer ``tid``; the raw
    bytes follow on the stream."""

    t: Literal["data"] = "data"
    tid: Ident
    i: NonNeg
    offset: NonNeg = 0
    nbytes: Pos


Control = Annotated[Hello | Challenge | Auth | HelloOk | HelloErr | Offer | Ready | Reject | Done | Fail | Data,
                    Field(discriminator="t")]
_CONTROL = TypeAdapter(Control)


def encode_control(msg: Wire) -> bytes:
    """Encode a control message, refusing one the peer would refuse (over ``MAX_CONTROL_BYTES``)."""
    data = msg.to_msgpack()
    if len(data) > MAX_CONTROL_BYTES:
        raise WireError(f"{type(msg).__name__} encodes to {len(data)} bytes, over the {MAX_CONTROL_BYTES}-byte "
                        "control limit (split the transfer)")
    return data


def decode_control(data: bytes) -> (Hello | Challenge | Auth | HelloOk | HelloErr | Offer | Ready | Reject | Done | Fail
                                    | Data):
    obj = _unpack(data, MAX_CONTROL_BYTES, "control message")
    try:
        return _CONTROL.validate_python(obj)
    except ValidationError as exc:
        raise _explain("control message", exc) from None
