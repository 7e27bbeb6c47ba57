"""What the kvlane vLLM connector accepts from outside: the per-request `kv_transfer_params` the router
sends and the engine-wide `kv_connector_extra_config`, both validated strictly, plus the ordered
transfer-state enum. Imported by the scheduler and worker processes; never imports vLLM or torch.
"""

from __future__ import annotations

import enum
import logging
import re
from typing import Annotated, Any, Literal

from kvlane.policy.types import Name
from kvlane.transport.config import PathConfig
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

logger = logging.getLogger("vllm.kvlane.connector")

Secs = Annotated[float, Field(gt=0.0, le=3600.0, allow_inf_nan=False)]

_POLICY_ADDR = re.compile(r"^tcp://(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+):([0-9]{1,5})$")


class TransferState(enum.IntEnum):
    """One transfer's progress, ordered so that the state of a TP group is the MIN over its ranks
    (any FAILED rank fails the group; DONE only when every rank is DONE)."""

    FAILED = 0
    PENDING = 1  # known to the scheduler, not yet handed to the workers
    ARMED = 2  # D: workers hold the destination blocks open; P: waiting for D's announce
    ANNOUNCED = 3  # D: blocks published to the policy service; P: announce received
    LEASED = 4  # P: lease granted, push job handed to the workers
    TRANSFERRING = 5
    DONE = 6

    @staticmethod
    def of_group(states: list[TransferState]) -> TransferState:
        return min(states) if states else TransferState.PENDING


def policy_address(addr: str) -> tuple[str, int]:
    """`tcp://HOST:PORT` -> (host, port); a clear ValueError otherwise."""
    m = _POLICY_ADDR.match(addr)
    if not m:
        raise ValueError(f"policy address {addr!r} is not of the form tcp://HOST:PORT")
    host, port = m.group(1).strip("[]"), int(m.group(2))
    if not 0 < port < 65536:
        raise ValueError(f"policy address {addr!r}: port {port} out of range")
    return host, port


class KVLaneParams(BaseModel):
    """The `kv_transfer_params` object the router attaches to both halves of one request. Every kvlane field
    is checked strictly; other keys (a client's own params, which the router passes through) are ignored."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    kvlane: Literal[1]
    transfer_id: Name
    session_id: Name | None = None
    prefill: Name
    decode: Name
    policy: Annotated[str, Field(max_length=300)]
    role: Literal["prefill", "decode"]

    @field_validator("policy")
    @classmethod
    def _policy(cls, v: str) -> str:
        policy_address(v)
        return v


class ParamsError(ValueError):
    """A `kv_transfer_params` object that is not a valid kvlane request (the message says why)."""


def parse_params(raw: Any) -> KVLaneParams | None:
    """None when the request carries no kvlane params (not ours: a plain request);
    ParamsError when it claims to be kvlane (`"kvlane"` key present) but is malformed."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ParamsError(f"kv_transfer_params must be an object, got {type(raw).__name__}")
    if "kvlane" not in raw:
        return None
    # Keys vLLM or we ourselves add on the way back out are not part of the request.
    try:
        return KVLaneParams.model_validate(raw)
    except ValidationError as exc:
        parts = [f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()]
        raise ParamsError("invalid kvlane kv_transfer_params: " + "; ".join(parts)) from None


class FaultInjection(BaseModel):
    """Testing knobs (negative controls). Never set these in production."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: D side: flip every byte (XOR 0x5A) of the blocks a push delivered, after they landed and before the
    #: request decodes from them: proves the tests would notice a broken transfer (and that D really decodes
    #: from the pushed KV rather than recomputing it).
    corrupt_kv: bool = False


class ConnectorConfig(BaseModel):
    """`kv_connector_extra_config` of the kvlane connector."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    policy: Annotated[str, Field(max_length=300)]
    role: Literal["prefill", "decode"]
    engine_id: Name
    #: Where clients reach this engine's OpenAI server (registered with the policy service).
    http: Annotated[str, Field(max_length=300)] = ""
    #: Topology GPU id per TP rank; default `n0.g<rank>` (the `loopback` topology generator's names).
    gpus: list[Name] | None = None
    #: Host the worker's KV receive socket binds (and advertises). Loopback by default.
    kv_host: Annotated[str, Field(max_length=200)] = "127.0.0.1"
    #: D: how long blocks stay armed for a push before the request falls back to kv_load_failure_policy.
    recv_timeout_s: Secs = 120.0
    #: D: how often to ask the policy service whether P gave up an awaited transfer (failed push, expired
    #: lease, dropped job); a receive P gave up fails then instead of at recv_timeout_s. 0 = never ask.
    abort_poll_s: Annotated[float, Field(ge=0.0, le=60.0, allow_inf_nan=False)] = 1.0
    #: P: how long P holds a finished prefill's blocks waiting for D's announce.
    announce_timeout_s: Secs = 60.0
    #: P: how long P keeps asking for a lease (LeaseDenied -> retry after `retry_after`).
    lease_timeout_s: Secs = 60.0
    #: P: deadline of one push (all ranks), from the moment the workers get the job.
    push_timeout_s: Secs = 60.0
    #: Timeout of one call to the policy service.
    rpc_timeout_s: Secs = 10.0
    #: Backend of the workers' kvlane.transport data path: "ucx" (ucxx), "tcp", or "auto" = ucx when ucxx
    #: imports, else tcp. Both ends of a transfer must resolve to the same backend.
    transport: Literal["auto", "tcp", "ucx"] = "auto"
    #: The transport's named paths (default: "shm" = UCX_TLS sm,self and "tcp" = tcp,self). Name them as the
    #: topology names the paths its leases grant (e.g. "rail0", "path1"), each with its UCX devices:
    #: `{"path1": {"ucx": {"TLS": "rc_verbs,ud_verbs", "NET_DEVICES": "mlx5_0:1"}}}`.
    paths: dict[Name, PathConfig] | None = None
    #: On a step with nothing scheduled, a worker sleeps up to this long unless a transfer ends (0 = never):
    #: keeps vLLM's workers from spinning while the engine only waits for KV (see worker.WorkerSide._idle_wait).
    idle_wait_ms: Annotated[float, Field(ge=0.0, le=1000.0)] = 10.0
    #: Heterogeneous TP: the other side's TP size when it differs from this engine's (P TP=1 -> D TP=2, ...).
    #: Head slices go rank -> rank by `transport.ranks.head_routes`, each under its own transfer id.
    peer_tp: Annotated[int, Field(ge=1, le=64)] | None = None
    fault_injection: FaultInjection = FaultInjection()

    @field_validator("transport", mode="before")
    @classmethod
    def _transport(cls, v: Any) -> Any:
        if v == "blockwire":
            raise ValueError("'blockwire' (kvlane's old TCP block mover) was removed; use 'tcp', 'ucx' or 'auto'")
        return v

    @model_validator(mode="after")
    def _fault_on_decode(self) -> ConnectorConfig:
        if self.fault_injection.corrupt_kv and self.role != "decode":
            raise ValueError("fault_injection.corrupt_kv corrupts received KV: set it on a decode engine")
        return self

    @field_validator("policy")
    @classmethod
    def _policy(cls, v: str) -> str:
        policy_address(v)
        return v

    def gpu_ids(self, tp_size: int) -> list[str]:
        if self.gpus is None:
            return [f"n0.g{r}" for r in range(tp_size)]
        if len(self.gpus) != tp_size:
            raise ValueError(f"extra_config.gpus names {len(self.gpus)} GPUs but tensor_parallel_size is {tp_size}")
        return list(self.gpus)


def parse_config(raw: Any) -> ConnectorConfig:
    if not isinstance(raw, dict):
        raise ValueError("kv_connector_extra_config must be an object for KVLaneConnector")
    try:
        return ConnectorConfig.model_validate(raw)
    except ValidationError as exc:
        parts = [f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()]
        raise ValueError("KVLaneConnector kv_connector_extra_config: " + "; ".join(parts)) from None
