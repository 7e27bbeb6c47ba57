"""Pair scoring: score(p,d) = α·Qp + β·Qd + γ·Tkv + δ·Hpath + ε·Md − ζ·Acache, and the path choice behind it.

Owned by `kvlane.policy`, run inside the policy service (through `Policy`). Reads the topology's candidate
paths, the credit ledger's link reservations and the feedback estimates; changes none of them. Pure: no
clock, no I/O. Lower score wins; `breakdown` gives each weighted term so a decision can be explained.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from .config import ScoringWeights
from .credits import CreditLedger
from .feedback import PathFeedback, PathKey, path_key
from .types import EngineInfo, NoPairAvailable

#: Breakdown keys, in formula order (Acache's entry is already negative: the terms sum to the total).
TERMS = ("qp", "qd", "tkv", "hpath", "md", "acache")


class PathLike(Protocol):
    name: str
    links: tuple[str, ...]
    src_nic: str
    dst_nic: str
    hops: int
    bottleneck_gbps: float


class TopologyLike(Protocol):
    def paths(self, src_gpu: str, dst_gpu: str) -> Sequence[Any]: ...


@dataclass(frozen=True, slots=True)
class PathInfo:
    """A topology path plus what scoring needs of it, computed once."""

    path: Any
    key: PathKey
    name: str
    links: tuple[str, ...]
    hops: int
    static_gbps: float
    #: Reservable Gbps of each link (same order as `links`).
    caps: tuple[float, ...] = ()


@dataclass(slots=True, eq=False)
class EngineState:
    """What the policy knows about one engine right now."""

    info: EngineInfo
    engine_id: str
    tp: int
    gpu0: str
    can_prefill: bool
    can_decode: bool
    queue: int = 0
    running: int = 0
    memory: float = 0.0
    #: Requests the policy assigned to this engine since its last load report (reset by the report).
    pending: int = 0
    #: Grouping handles set by the facade's tier index (opaque here).
    tile: Any = None
    cell: Any = None
    last_pick: int = 0
    reported_at: float | None = None

    @property
    def load(self) -> int:
        return self.queue + self.pending

    @property
    def group(self) -> tuple[str, int]:
        """(engine kind, TP size): prefill engines are shortlisted per group so each kind and size has some."""
        return (self.info.kind, self.tp)

    @property
    def p_load(self) -> int:
        """Load as a prefill engine: queued + assigned + the prefill it is running now. A prefill-only engine
        reports `running` as its in-progress prefills (0 or 1 in practice), which delay the next one as much
        as a queued request; an engine that also decodes reports its decode batch there, so it is left out."""
        return self.queue + self.pending + (0 if self.can_decode else self.running)


class Terms(NamedTuple):
    """Raw (unweighted) values of one pair's terms, and the paths they were computed on."""

    qp: float
    qd: float
    tkv: float
    hpath: float
    md: float
    acache: float
    paths: tuple[PathInfo, ...]


def _first_two(t: tuple[float, int, PathInfo, float, float]) -> tuple[float, int]:
    return (t[0], t[1])


class PairScorer:
    """Computes terms and scores. Keeps a bounded cache of `PathInfo` per (src GPU, dst GPU)."""

    def __init__(self, topology: TopologyLike, ledger: CreditLedger, feedback: PathFeedback,
                 weights: ScoringWeights, cache_pairs: int = 262_144):
        self.topology = topology
        self.ledger = ledger
        self.feedback = feedback
        self.w = weights
        self._cache: dict[tuple[str, str], tuple[PathInfo, ...]] = {}
        self._cache_pairs = cache_pairs
        self._reserved = ledger.reserved_view()
        self._estimates = feedback.view()

    # ---- paths ---------------------------------------------------------------------------------------------

    def path_infos(self, src_gpu: str, dst_gpu: str) -> tuple[PathInfo, ...]:
        """The topology's candidate paths for a GPU pair (best first), cached."""
        k = (src_gpu, dst_gpu)
        infos = self._cache.get(k)
        if infos is None:
            if len(self._cache) >= self._cache_pairs:
                self._cache.clear()
            cap = self.ledger.link_capacity
            infos = tuple(
                PathInfo(p, path_key(p.name, p.links, p.src_nic, p.dst_nic), p.name, tuple(p.links), int(p.hops),
                         float(p.bottleneck_gbps), tuple(cap(lk) for lk in p.links))
                for p in self.topology.paths(src_gpu, dst_gpu))
            if not infos:
                raise NoPairAvailable(f"the topology has no path from GPU {src_gpu} to GPU {dst_gpu}")
            self._cache[k] = infos
        return infos

    def congestion(self, info: PathInfo) -> float:
        """Highest reserved fraction (0..1) among the path's links."""
        reserved = self._reserved
        if not reserved:
            return 0.0
        frac = 0.0
        for link, cap in zip(info.links, info.caps, strict=True):
            r = reserved.get(link)
            if r:
                f = r / cap if cap > 0 else 1.0
                if f > frac:
                    frac = f
        return frac if frac < 1.0 else 1.0

    def goodness(self, info: PathInfo) -> float:
        """Bandwidth this path can be expected to give a new stream: estimate × unreserved share."""
        return self.feedback.gbps(info.key, info.static_gbps) * (1.0 - self.congestion(info))

    def order(self, infos: Sequence[PathInfo]) -> list[PathInfo]:
        """Candidates best first: highest goodness, ties in the topology's order."""
        if len(infos) == 1:
            return [infos[0]]
        return [x[2] for x in self._rated(infos)]

    # ---- scoring -------------------------------------------------------------------------------------------

    def _rated(self, infos: Sequence[PathInfo]) -> list[tuple[float, int, PathInfo, float, float]]:
        """(−goodness, index, info, estimated Gbps, congestion) per candidate, best first."""
        fb_gbps = self.feedback.gbps
        out = []
        for i, info in enumerate(infos):
            gbps = fb_gbps(info.key, info.static_gbps)
            cong = self.congestion(info) if info.links else 0.0
            out.append((-gbps * (1.0 - cong), i, info, gbps, cong))
        if len(out) > 1:
            out.sort(key=_first_two)
        return out

    def terms(self, p: EngineState, d: EngineState, kv_bytes: int, acache: float) -> Terms:
        """Raw terms of a pair, on the paths its rank-0 streams would use: the best candidate by goodness
        (ties: the topology's order), and the second best too when there are several streams."""
        streams = p.tp if p.tp >= d.tp else d.tp
        estimates = self._estimates
        reserved = self._reserved
        b1: tuple[float, float, float, PathInfo] | None = None
        b2: tuple[float, float, float, PathInfo] | None = None
        for info in self.path_infos(p.gpu0, d.gpu0):
            est = estimates.get(info.key)
            gbps = est.bw_gbps if est is not None and est.bw_gbps is not None else info.static_gbps
            cong = self.congestion(info) if reserved else 0.0
            g = gbps * (1.0 - cong)
            if b1 is None or g > b1[0]:
                b2, b1 = b1, (g, gbps, cong, info)
            elif b2 is None or g > b2[0]:
                b2 = (g, gbps, cong, info)
        assert b1 is not None
        used = (b1, b2) if streams > 1 and b2 is not None else (b1,)
        rank_bits = kv_bytes * (1.0 - acache) * 8.0 / streams
        tkv = 0.0
        hops = 0
        cong = 0.0
        for _, gbps, c, info in used:
            t = rank_bits / (gbps * 1e9) if gbps > 0 else float("inf")
            if t > tkv:
                tkv = t
            if info.hops > hops:
                hops = info.hops
            if c > cong:
                cong = c
        return Terms(p.p_load, d.load, tkv, hops + self.w.congestion_hops * cong, d.memory, acache,
                     tuple(x[3] for x in used))

    def total(self, t: Terms) -> float:
        w = self.w
        return (w.alpha * t.qp + w.beta * t.qd + w.gamma * t.tkv + w.delta * t.hpath + w.epsilon * t.md
                - w.zeta * t.acache)

    def breakdown(self, t: Terms) -> dict[str, float]:
        """Each weighted term (acache negative); their sum is the score."""
        w = self.w
        return {"qp": w.alpha * t.qp, "qd": w.beta * t.qd, "tkv": w.gamma * t.tkv, "hpath": w.delta * t.hpath,
                "md": w.epsilon * t.md, "acache": -w.zeta * t.acache}

    def score(self, p: EngineState, d: EngineState, kv_bytes: int, acache: float = 0.0) -> tuple[float, Terms]:
        t = self.terms(p, d, kv_bytes, acache)
        return self.total(t), t

    def decode_cost(self, d: EngineState) -> float:
        """The part of the score that depends on D alone (used to shortlist wide tiers)."""
        return self.w.beta * d.load + self.w.epsilon * d.memory

    def prefill_cost(self, p: EngineState) -> float:
        return self.w.alpha * p.p_load
