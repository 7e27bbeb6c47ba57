"""Settings of the kvlane SGLang transfer backend, read from the environment of every SGLang scheduler
process (`kvlane sglang prefill|decode` sets them; SGLang has no per-backend config object).
Plain validation only: no sockets, no SGLang import.
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Literal

from kvlane.policy.types import Name
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

_POLICY_ADDR = re.compile(r"^tcp://(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+):([0-9]{1,5})$")
Secs = Annotated[float, Field(gt=0.0, le=3600.0, allow_inf_nan=False)]

#: Environment variable -> config field. `kvlane sglang` writes exactly these.
ENV = {
    "KVLANE_POLICY": "policy",
    "KVLANE_ENGINE_ID": "engine_id",
    "KVLANE_GPUS": "gpus",
    "KVLANE_TRANSPORT": "transport",
    "KVLANE_KV_HOST": "kv_host",
    "KVLANE_BOOTSTRAP_TIMEOUT_S": "bootstrap_timeout_s",
    "KVLANE_LEASE_TIMEOUT_S": "lease_timeout_s",
    "KVLANE_PUSH_TIMEOUT_S": "push_timeout_s",
    "KVLANE_RPC_TIMEOUT_S": "rpc_timeout_s",
}


class SGLangBackendConfig(BaseModel):
    """Engine-wide settings; every field except `policy` has a default."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    policy: str
    #: The policy service's name for this engine (default: derived from role, host and HTTP port).
    engine_id: Name | None = None
    #: GPU names of the topology, one per TP rank, rank order (default n0.g<rank>).
    gpus: list[Name] | None = None
    transport: Literal["auto", "tcp", "ucx"] = "auto"
    #: Address the transport's listeners bind to (decode side receives there).
    kv_host: str = "127.0.0.1"
    #: Prefill: how long a sender waits for decode's announce; decode: for the push to land.
    bootstrap_timeout_s: Secs = 60.0
    lease_timeout_s: Secs = 30.0
    push_timeout_s: Secs = 30.0
    rpc_timeout_s: Secs = 5.0

    @field_validator("policy")
    @classmethod
    def _policy(cls, v: str) -> str:
        m = _POLICY_ADDR.match(v)
        if not m or not 0 < int(m.group(2)) < 65536:
            raise ValueError(f"policy address {v!r} is not of the form tcp://HOST:PORT")
        return v

    @field_validator("gpus", mode="before")
    @classmethod
    def _split(cls, v: object) -> object:
        if isinstance(v, str):
            return [g.strip() for g in v.split(",") if g.strip()]
        return v

    def gpu_ids(self, tp_size: int) -> list[str]:
        if self.gpus is None:
            return [f"n0.g{r}" for r in range(tp_size)]
        if len(self.gpus) != tp_size:
            raise ValueError(f"KVLANE_GPUS names {len(self.gpus)} GPUs but --tp-size is {tp_size}")
        return list(self.gpus)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> SGLangBackendConfig:
        """The config from KVLANE_* variables; a ValueError naming the variable when one is wrong."""
        env = os.environ if environ is None else environ
        raw = {field: env[var] for var, field in ENV.items() if env.get(var)}
        if "policy" not in raw:
            raise ValueError("--disaggregation-transfer-backend kvlane needs KVLANE_POLICY=tcp://HOST:PORT "
                             "(the kvlane policy service); `kvlane sglang ... --policy` sets it")
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            back = {f: v for v, f in ENV.items()}
            errs = "; ".join(f"{back.get(str(e['loc'][0]), e['loc'][0])}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"kvlane SGLang backend settings: {errs}") from None

    def to_env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for var, field in ENV.items():
            v = getattr(self, field)
            if v is None or v == SGLangBackendConfig.model_fields[field].default:
                continue
            out[var] = ",".join(v) if isinstance(v, list) else str(v)
        out["KVLANE_POLICY"] = self.policy
        return out
