"""Messages between the two halves of the kvlane vLLM connector inside one engine: the scheduler's per-step
orders to the workers (`KVLaneMetadata`) and the workers' per-step reports back (`KVLaneWorkerMeta`), plus
the connector stats vLLM ships to its logger and Prometheus. Plain dataclasses of ints/strings; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats


@dataclass
class ArmOrder:
    """D: hold `dst_blocks` open for transfer `transfer_id` until `deadline` (time.monotonic())."""

    req_id: str
    transfer_id: str
    dst_blocks: list[int]
    deadline: float


@dataclass
class PushOrder:
    """P: push `src_blocks` of every layer into D's `dst_blocks`, rank i -> rank i, before `deadline`."""

    req_id: str
    transfer_id: str
    src_blocks: list[int]
    dst_blocks: list[int]
    deadline: float
    #: per rank: the granted path name and D's registered rank descriptor (opaque bytes)
    paths: list[str]
    peers: list[bytes]


@dataclass
class KVLaneMetadata(KVConnectorMetadata):
    arm: list[ArmOrder] = field(default_factory=list)
    #: D: (req_id, reason) to stop receiving; reported failed once nothing writes into the blocks
    cancel: list[tuple[str, str]] = field(default_factory=list)
    push: list[PushOrder] = field(default_factory=list)
    #: P: finished requests whose blocks are released without a push (D never asked, no lease, ...)
    drop: list[str] = field(default_factory=list)
    #: the step schedules no tokens (the engine only steps to poll transfers): workers may wait briefly
    idle: bool = False


@dataclass
class RankReport:
    rank: int
    ok: bool
    bytes: int
    seconds: float
    path: str = ""
    error: str | None = None
    #: P: the push's steps and their seconds (kvlane.transport.TransferResult.phases), for the transfer log line.
    phases: tuple[tuple[str, float], ...] = ()


@dataclass
class KVLaneWorkerMeta(KVConnectorWorkerMetadata):
    #: req_id -> ranks that armed it this step
    armed: dict[str, int] = field(default_factory=dict)
    #: req_id -> per-rank push outcome (P) / receive outcome (D)
    pushed: dict[str, list[RankReport]] = field(default_factory=dict)
    received: dict[str, list[RankReport]] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVLaneWorkerMeta:
        assert isinstance(other, KVLaneWorkerMeta)
        out = KVLaneWorkerMeta(dict(self.armed), {k: list(v) for k, v in self.pushed.items()},
                               {k: list(v) for k, v in self.received.items()})
        for k, n in other.armed.items():
            out.armed[k] = out.armed.get(k, 0) + n
        for k, v in other.pushed.items():
            out.pushed.setdefault(k, []).extend(v)
        for k, v in other.received.items():
            out.received.setdefault(k, []).extend(v)
        return out

    def empty(self) -> bool:
        return not (self.armed or self.pushed or self.received)


_LIST_KEYS = ("push_bytes", "push_seconds", "lease_wait_seconds", "recv_bytes", "recv_seconds")
_COUNT_KEYS = ("paths", "failures")


def _new_data() -> dict[str, Any]:
    d: dict[str, Any] = {k: [] for k in _LIST_KEYS}
    d.update({k: {} for k in _COUNT_KEYS})
    return d


@dataclass
class KVLaneStats(KVConnectorStats):
    """Per-interval transfer observations. `paths`/`failures` map a path name / failure reason to a count."""

    def __post_init__(self) -> None:
        base = _new_data()
        for k, v in (self.data or {}).items():
            if k in base:
                base[k] = v
        self.data = base

    def reset(self) -> None:
        self.data = _new_data()

    def is_empty(self) -> bool:
        return not any(self.data[k] for k in _LIST_KEYS + _COUNT_KEYS)

    def aggregate(self, other: KVConnectorStats) -> KVLaneStats:
        if not other.is_empty():
            for k in _LIST_KEYS:
                self.data[k] = list(self.data[k]) + list(other.data.get(k, []))
            for k in _COUNT_KEYS:
                merged = dict(self.data[k])
                for name, n in other.data.get(k, {}).items():
                    merged[name] = merged.get(name, 0) + n
                self.data[k] = merged
        return self

    def count(self, key: str, name: str) -> None:
        self.data[key][name] = self.data[key].get(name, 0) + 1

    def reduce(self) -> dict[str, int | float]:
        pb, ps = self.data["push_bytes"], self.data["push_seconds"]
        out: dict[str, int | float] = {
            "kvlane_pushes": len(pb),
            "kvlane_push_MB": round(sum(pb) / 1e6, 3),
            "kvlane_push_GBps": round(sum(pb) / sum(ps) / 1e9, 3) if sum(ps) > 0 else 0.0,
            "kvlane_recv_MB": round(sum(self.data["recv_bytes"]) / 1e6, 3),
            "kvlane_lease_wait_avg_s": (
                round(sum(self.data["lease_wait_seconds"]) / len(self.data["lease_wait_seconds"]), 4)
                if self.data["lease_wait_seconds"] else 0.0
            ),
            "kvlane_failures": sum(self.data["failures"].values()),
        }
        for name, n in self.data["paths"].items():
            out[f"kvlane_path[{name}]"] = n
        return out


class KVLanePromMetrics(KVConnectorPromMetrics):
    """`vllm:kvlane_*` series: bytes, transfer seconds, lease wait, path chosen, failures by reason."""

    def __init__(self, vllm_config: Any, metric_types: Any, labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        from vllm.v1.metrics.utils import create_metric_per_engine

        byte_buckets = [2 ** (10 + i) for i in range(0, 25, 2)]
        sec_buckets = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]

        def hist(name: str, doc: str, buckets: list[float]) -> dict[int, Any]:
            h = self._histogram_cls(name=name, documentation=doc, buckets=buckets, labelnames=labelnames)
            return create_metric_per_engine(h, per_engine_labelvalues)

        self.push_bytes = hist("vllm:kvlane_push_bytes", "KV bytes pushed per transfer (all ranks).", byte_buckets)
        self.push_seconds = hist("vllm:kvlane_push_seconds", "Wall time of one push (slowest rank).", sec_buckets)
        self.lease_wait = hist("vllm:kvlane_lease_wait_seconds", "Time from prefill end to lease grant.", sec_buckets)
        self.recv_bytes = hist("vllm:kvlane_recv_bytes", "KV bytes received per transfer (decode).", byte_buckets)
        self.paths = self._counter_cls(name="vllm:kvlane_transfers_by_path", documentation="Transfers per granted path.",
                                       labelnames=[*labelnames, "path"])
        self.failures = self._counter_cls(name="vllm:kvlane_failures", documentation="Failed transfers by reason.",
                                          labelnames=[*labelnames, "reason"])

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for metric, key in ((self.push_bytes, "push_bytes"), (self.push_seconds, "push_seconds"),
                            (self.lease_wait, "lease_wait_seconds"), (self.recv_bytes, "recv_bytes")):
            for v in transfer_stats_data.get(key, []):
                metric[engine_idx].observe(v)
        labels = self.per_engine_labelvalues.get(engine_idx, [])
        for name, n in transfer_stats_data.get("paths", {}).items():
            self.paths.labels(*labels, name).inc(n)
        for name, n in transfer_stats_data.get("failures", {}).items():
            self.failures.labels(*labels, name).inc(n)
