"""Configuration of one `KVTransport`: backend, listen host, the named paths and their UCX settings,
deadlines. Read in the vLLM worker process (built by the connector from kv_transfer_config); it only
describes where bytes may go, never which path to pick (that is the policy's job).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretBytes, field_validator

from .auth import env_secret

#: Settings every UCX context gets unless the path overrides them (FACTS.md: keeps peer error handling
#: and shared memory together; keeps stdout clean).
UCX_BASE_ENV = {
    "UCX_MM_ERROR_HANDLING": "y",
    "UCX_WARN_UNUSED_ENV_VARS": "n",
}


def _secret_or_none(value: bytes | None) -> SecretBytes | None:
    return SecretBytes(value) if value else None


class PathConfig(BaseModel):
    """One path = one UCX context/worker (ucx backend) or one listening socket (tcp backend).

    ``ucx`` holds UCX options without the ``UCX_`` prefix, e.g. ``{"TLS": "sm,self"}`` for shared
    memory or ``{"TLS": "rc_verbs,ud_verbs", "NET_DEVICES": "mlx5_0:1"}`` for an RDMA rail.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    ucx: dict[str, str] = Field(default_factory=dict)

    @field_validator("ucx")
    @classmethod
    def _no_prefix(cls, v: dict[str, str]) -> dict[str, str]:
        for k in v:
            if k.startswith("UCX_") or not k.replace("_", "").isalnum() or not k.isupper():
                raise ValueError(f"UCX option {k!r} must be an upper-case name without the UCX_ prefix")
        return v


def _default_paths() -> dict[str, PathConfig]:
    # PROTO_ENABLE=n: UCX's new protocol layer was ~3x slower over TCP (FACTS.md; 16 MiB here: 0.03-0.06 s
    # per push instead of 0.12-0.16 s in one A/B, a tie in the next).
    return {"shm": PathConfig(ucx={"TLS": "sm,self"}),
            "tcp": PathConfig(ucx={"TLS": "tcp,self", "PROTO_ENABLE": "n"})}


class HeteroTP(BaseModel):
    """Allows rank i → rank j transfers between TP groups of different sizes (see `ranks.py`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    p_tp: int = Field(ge=1)
    d_tp: int = Field(ge=1)
    total_kv_heads: int = Field(ge=1)


class TransportConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    #: "auto" = ucx when ucxx imports, else tcp (both ends of a transfer must resolve the same way).
    backend: Literal["auto", "ucx", "tcp"] = "auto"
    host: str = "127.0.0.1"
    tp_size: int = Field(default=1, ge=1)
    paths: dict[str, PathConfig] = Field(default_factory=_default_paths, min_length=1)
    #: Deadline of `connect()`'s handshake.
    connect_timeout_s: float = Field(default=10.0, gt=0)
    #: How long an incoming offer waits for the matching `expect()` before it is refused.
    offer_hold_s: float = Field(default=30.0, gt=0)
    #: A push whose offer got no answer within this many seconds sends the same offer again (then after
    #: twice as long, at most every 8 s) until its deadline; the receiver ignores or re-answers copies.
    #: None = offer once and wait for the deadline.
    offer_retry_s: float | None = Field(default=2.0, gt=0)
    #: A push of several runs between host regions, at most this many bytes, travels as one message: the sender
    #: gathers the runs into one buffer and the receiver scatters it (two memcpys instead of one tagged send per
    #: run; docs/transport.md, "Packed transfers"). 0 = never pack.
    pack_max_bytes: int = Field(default=64 << 20, ge=0)
    #: Tagged sends in flight per transfer (ucx backend).
    max_inflight_sends: int = Field(default=48, ge=1, le=90)
    #: Set when P and D run different TP sizes; without it rank i only talks to rank i.
    hetero_tp: HeteroTP | None = None
    #: UCX options every path's context gets unless the path sets them (a 1 s keepalive turns a dead
    #: peer into an endpoint error in about a second instead of waiting for the deadline).
    ucx_defaults: dict[str, str] = Field(default_factory=lambda: {"KEEPALIVE_INTERVAL": "1s"})
    #: ucxx progress mode per path context: "thread" (ucxx's progress thread + Python futures from its
    #: notifier thread: ~4 % of a core idle) or "blocking" (epoll in our loop; ucxx then awaits every
    #: pending request with a sleep(0) loop: ~25 % of a core idle, since a control receive is always
    #: posted). Polling modes are not offered (unusable on 2 cores, FACTS.md).
    ucx_progress_mode: Literal["blocking", "thread"] = "thread"
    #: CPUs the transport's own threads may run on: its event-loop thread, and so every thread that thread
    #: starts (ucxx's progress and notifier threads, tcp helpers). None = inherit the creating thread's
    #: affinity. Set it where the caller is pinned to a core it keeps busy (vLLM's CPU workers under
    #: VLLM_CPU_OMP_THREADS_BIND): UCX handshakes starved behind the pinned worker (docs/transport.md).
    thread_cpus: frozenset[int] | None = None
    #: Extra process-wide UCX env (applied with setdefault before ucxx is imported).
    ucx_env: dict[str, str] = Field(default_factory=lambda: dict(UCX_BASE_ENV))
    #: Shared secret of the deployment (default: $KVLANE_SECRET, like the policy clients; None = no
    #: authentication). When set, every handshake is an HMAC challenge-response in both directions and
    #: peers without the same secret are refused (docs/transport.md, "Authentication"). Never shown in repr.
    secret: SecretBytes | None = Field(default_factory=lambda: _secret_or_none(env_secret()))

    @field_validator("secret")
    @classmethod
    def _non_empty(cls, v: SecretBytes | None) -> SecretBytes | None:
        if v is not None and not v.get_secret_value():
            raise ValueError("an empty secret is not a secret; pass None to disable authentication")
        return v

    @field_validator("thread_cpus")
    @classmethod
    def _cpus(cls, v: frozenset[int] | None) -> frozenset[int] | None:
        if v is not None and (not v or min(v) < 0):
            raise ValueError(f"thread_cpus must be a non-empty set of CPU numbers >= 0, got {sorted(v)}")
        return v

    @field_validator("paths")
    @classmethod
    def _path_names(cls, v: dict[str, PathConfig]) -> dict[str, PathConfig]:
        for name in v:
            if not name or len(name) > 64 or not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"path name {name!r} must be 1-64 characters of [A-Za-z0-9_-]")
        return v
