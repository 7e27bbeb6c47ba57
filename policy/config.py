"""Every knob of the decision-making policy (credits, scoring weights, sessions, feedback), with defaults.

Owned by `kvlane.policy`; built once by whoever constructs `Policy` (the policy service from its config
file, tests directly). Pure data: validation only, never reads files, clocks or the network.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Knobs(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CreditConfig(_Knobs):
    """D ingress credits and per-link bandwidth quotas (docs/leases.md)."""

    #: Concurrent large (reserved-class) KV transfers one decode engine accepts (seed §7: 2–4).
    max_streams: int = Field(default=3, ge=1, le=64)
    #: Bytes of reserved-class KV in flight towards one decode engine. A single transfer larger than this
    #: is still admitted when nothing else is in flight to that engine (so it cannot starve forever).
    ingress_bytes: int = Field(default=16 << 30, ge=1)
    #: Transfers strictly smaller than this go best-effort (no stream credit, no link reservation) when the
    #: request allows it (`LeaseRequest.best_effort_ok`).
    best_effort_max_bytes: int = Field(default=64 << 20, ge=0)
    #: Concurrent best-effort transfers towards one decode engine (their bytes are bounded by
    #: `best_effort_max_streams × best_effort_max_bytes`).
    best_effort_max_streams: int = Field(default=8, ge=0, le=1024)
    #: Fraction of each link's Gbps that leases may reserve (the rest is left to control/best-effort traffic).
    reservable_fraction: float = Field(default=0.8, gt=0.0, le=1.0)
    #: A reserved rank stream reserves rate = rank bytes / `target_transfer_s`, at least `min_stream_gbps`,
    #: at most the reservable share of its path's bottleneck link.
    target_transfer_s: float = Field(default=0.5, gt=0.0)
    min_stream_gbps: float = Field(default=5.0, gt=0.0)
    #: Lease expiry: `now + lease_ttl_s + bytes·8 / (lease_ttl_floor_gbps·1e9)` — a fixed slack plus the time the
    #: bytes would take at a pessimistic floor rate. A holder that never releases loses its credits then.
    #: 30 s, not 10 s: a live holder renews (below), so the ttl only bounds how long a dead holder's credits stay
    #: held; 10 s proved shorter than the whole-process stalls of a loaded 2-vCPU VM (~10 s, docs/leases.md).
    lease_ttl_s: float = Field(default=30.0, gt=0.0)
    lease_ttl_floor_gbps: float = Field(default=1.0, gt=0.0)
    #: A live holder renews its lease while its transfer is still in flight (a slow handshake, a slow
    #: link): each renewal moves the expiry to `now + ttl` (the ttl above), never past `granted_at +
    #: lease_max_s`, so a holder stuck in a renewal loop still loses its credits in the end.
    lease_max_s: float = Field(default=300.0, gt=0.0)
    #: Smallest `retry_after` a denial suggests.
    min_retry_s: float = Field(default=0.05, gt=0.0)
    #: How many ended lease ids are remembered to answer a second release with False.
    ended_memory: int = Field(default=100_000, ge=16)


class ScoringWeights(_Knobs):
    """score(p,d) = α·Qp + β·Qd + γ·Tkv + δ·Hpath + ε·Md − ζ·Acache; lower wins (docs/sessions-and-feedback.md).

    Units: Q in queued requests, Tkv in seconds, Hpath in hops (+ congestion), Md and Acache in 0..1.
    The defaults make one queued request ≈ 100 ms of transfer ≈ 4 hops ≈ a quarter of full D memory.
    """

    alpha: float = Field(default=1.0, ge=0.0)
    beta: float = Field(default=1.0, ge=0.0)
    gamma: float = Field(default=10.0, ge=0.0)
    delta: float = Field(default=0.25, ge=0.0)
    epsilon: float = Field(default=4.0, ge=0.0)
    zeta: float = Field(default=2.0, ge=0.0)
    #: Hpath = hops + `congestion_hops` × (highest reserved fraction among the path's links).
    congestion_hops: float = Field(default=4.0, ge=0.0)


class SelectionConfig(_Knobs):
    """How many candidates `select_pair` looks at (the fast path; see docs/sessions-and-feedback.md)."""

    #: Least-loaded prefill engines considered for a new session.
    prefill_shortlist: int = Field(default=2, ge=1, le=1024)
    #: In the wide tiers (same cell, cross cell) only the best this-many engines by their own load are paired.
    wide_tier_shortlist: int = Field(default=4, ge=1, le=1024)
    #: Admissible engines: queue (reported + assigned since the report) below these, memory below the limit.
    max_prefill_queue: int = Field(default=64, ge=1)
    max_decode_queue: int = Field(default=256, ge=1)
    decode_memory_limit: float = Field(default=0.97, gt=0.0, le=1.0)
    #: Requests assigned since an engine's last load report count as queued (so bursts spread). They are
    #: forgotten when the engine reports, when their transfer is leased (P) or ends (D), and at the latest
    #: after this many seconds without a report (so a silent router cannot make engines look full forever).
    pending_ttl_s: float = Field(default=5.0, gt=0.0)
    #: Allow pairs with different TP sizes when one divides the other (rank mapping in docs/leases.md).
    heterogeneous_tp: bool = False


class SessionConfig(_Knobs):
    """Sticky sessions: bounded LRU of session → home decode engine."""

    max_sessions: int = Field(default=100_000, ge=1)
    idle_ttl_s: float = Field(default=3600.0, gt=0.0)
    #: The home moves when its memory pressure reaches this, or its queue reaches `move_queue`.
    move_memory_pressure: float = Field(default=0.95, gt=0.0, le=1.0)
    move_queue: int = Field(default=128, ge=1)


class FeedbackConfig(_Knobs):
    """Per-path EWMA of measured bandwidth and latency."""

    #: Weight of the newest sample.
    ewma_alpha: float = Field(default=0.3, gt=0.0, le=1.0)
    #: Rank transfers smaller than this update latency only (too small to measure bandwidth).
    min_sample_bytes: int = Field(default=1 << 20, ge=1)
    #: A failed rank transfer counts as a bandwidth sample of this fraction of the current estimate.
    failure_bw_factor: float = Field(default=0.5, gt=0.0, le=1.0)
    #: Path estimates kept (least recently updated are dropped first).
    max_paths: int = Field(default=500_000, ge=16)


class PolicyConfig(_Knobs):
    credits: CreditConfig = CreditConfig()
    weights: ScoringWeights = ScoringWeights()
    selection: SelectionConfig = SelectionConfig()
    sessions: SessionConfig = SessionConfig()
    feedback: FeedbackConfig = FeedbackConfig()
    #: Lease ids are f"{lease_id_prefix}-{counter:x}"; a service sets a per-start prefix so ids never repeat.
    lease_id_prefix: str = Field(default="L", min_length=1, max_length=40, pattern=r"^[A-Za-z0-9_.\-]+$")
