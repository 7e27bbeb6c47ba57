"""Latency feedback: per-path EWMA of measured bandwidth and latency from finished transfers.

Owned by `kvlane.policy`, run inside the policy service (through `Policy.release_lease`). Feeds `Tkv` in
pair scoring; falls back to the path's static bottleneck bandwidth when nothing was measured. Pure: time is
an argument, never a clock; never touches the network.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from .config import FeedbackConfig

#: A path is known by its name and its links (names alone repeat: every ZCube pair has a "zcube-path1"). Paths
#: with no links (same node) add their NIC ports so that distinct local paths stay distinct.
PathKey = tuple[str, tuple[str, ...]]


def path_key(name: str, links: tuple[str, ...] | list[str], src_nic: str = "", dst_nic: str = "") -> PathKey:
    if links:
        return (name, tuple(links))
    return (name, (f"{src_nic}>{dst_nic}",))


@dataclass
class PathEstimate:
    static_gbps: float
    bw_gbps: float | None = None  # EWMA of measured bandwidth (None: not measured yet)
    latency_s: float | None = None  # EWMA of a rank transfer's duration
    samples: int = 0
    failures: int = 0
    updated_at: float = 0.0

    @property
    def gbps(self) -> float:
        """What Tkv uses: measured when there is a measurement, else static."""
        return self.bw_gbps if self.bw_gbps is not None else self.static_gbps

    @property
    def slowdown(self) -> float:
        """static / measured (1.0 = as fast as the fabric says; 4.0 = four times slower)."""
        if self.bw_gbps is None or self.bw_gbps <= 0:
            return 1.0
        return self.static_gbps / self.bw_gbps


class PathFeedback:
    def __init__(self, config: FeedbackConfig):
        self.config = config
        self._paths: OrderedDict[PathKey, PathEstimate] = OrderedDict()

    def __len__(self) -> int:
        return len(self._paths)

    def view(self) -> Mapping[PathKey, PathEstimate]:
        """Live read-only view of the estimates (for the scorer's hot path)."""
        return self._paths

    def get(self, key: PathKey) -> PathEstimate | None:
        return self._paths.get(key)

    def gbps(self, key: PathKey, static_gbps: float) -> float:
        """Bandwidth to predict with: the EWMA if measured, else `static_gbps`."""
        est = self._paths.get(key)
        return est.bw_gbps if est is not None and est.bw_gbps is not None else static_gbps

    def observe(self, key: PathKey, static_gbps: float, nbytes: int, seconds: float, ok: bool,
                now: float) -> PathEstimate:
        """One rank's transfer over one path finished (or failed)."""
        if nbytes < 0 or seconds < 0:
            raise ValueError(f"path {key[0]}: bytes and seconds must be >= 0 (got {nbytes}, {seconds})")
        cfg = self.config
        est = self._paths.get(key)
        if est is None:
            est = PathEstimate(static_gbps=static_gbps)
            self._paths[key] = est
            while len(self._paths) > cfg.max_paths:
                self._paths.popitem(last=False)
        else:
            self._paths.move_to_end(key)
        a = cfg.ewma_alpha
        if ok:
            if seconds > 0:
                est.latency_s = seconds if est.latency_s is None else (1 - a) * est.latency_s + a * seconds
            if nbytes >= cfg.min_sample_bytes and seconds > 0:
                sample = nbytes * 8 / seconds / 1e9
                est.bw_gbps = sample if est.bw_gbps is None else (1 - a) * est.bw_gbps + a * sample
                est.samples += 1
        else:
            est.failures += 1
            sample = est.gbps * cfg.failure_bw_factor
            est.bw_gbps = (1 - a) * est.gbps + a * sample
        est.updated_at = now
        return est

    def estimates(self) -> list[tuple[PathKey, PathEstimate]]:
        return list(self._paths.items())

    def hottest(self, n: int, link_load: Mapping[str, float] | None = None) -> dict[str, list[dict]]:
        """The `n` hottest links by reserved load (fraction 0..1, from the credit ledger) and the `n` paths
        measured slowest relative to their static bandwidth (or failing)."""
        by_load = sorted(((frac, link) for link, frac in (link_load or {}).items() if frac > 0),
                         key=lambda t: (-t[0], t[1]))[:n]
        slow = sorted(
            ((est.slowdown, est.failures, key) for key, est in self._paths.items()
             if est.slowdown > 1.0 or est.failures),
            key=lambda t: (-t[0], -t[1], t[2]))[:n]
        return {
            "links_by_load": [{"link": link, "reserved_fraction": round(frac, 4)} for frac, link in by_load],
            "paths_by_slowdown": [
                {"path": key[0], "links": list(key[1]), "slowdown": round(sd, 3), "failures": fails,
                 "gbps": round(self._paths[key].gbps, 3), "static_gbps": self._paths[key].static_gbps}
                for sd, fails, key in slow
            ],
        }
