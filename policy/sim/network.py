"""Max-min fair flow network: flows cross directed links and share their capacity by progressive filling.

Owned by `kvlane.policy.sim`; runs inside the simulator (one Python process, simulated time passed in).
It never reads a clock and never sleeps: `advance(now)` moves the fluid forward, rates are recomputed only
when a flow arrives or leaves (water-filling over the links that carry flows).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

#: A flow is finished when fewer than this many bytes remain (floating-point slack).
_EPS_BYTES = 1e-6


def _done(flow: Flow, now: float) -> bool:
    """Nothing left, or so little that finishing it would not move the clock (float resolution)."""
    if flow.remaining <= _EPS_BYTES + flow.size * 1e-12:
        return True
    return flow.rate > 0 and now + flow.remaining / flow.rate <= now


class NetworkError(ValueError):
    """Bad use of the flow network (unknown link, non-positive capacity, duplicate flow id)."""


@dataclass
class Flow:
    """One fluid flow: `remaining` bytes over `links`, at `rate` bytes/s (set by the last water-filling)."""

    flow_id: Hashable
    links: tuple[Hashable, ...]
    size: float
    remaining: float
    started: float
    #: Optional ceiling on this flow's rate (bytes/s), e.g. an application pacing limit.
    cap: float = math.inf
    rate: float = 0.0
    tag: object = None


@dataclass
class LinkStats:
    capacity: float
    #: Bytes carried since the start (integral of the link's total rate).
    carried: float = 0.0
    #: Integral over time of the number of flows on the link (mean flows = area / elapsed).
    flow_area: float = 0.0
    peak_flows: int = 0
    flows: set = field(default_factory=set)


class FlowNetwork:
    """Links with capacities (bytes/s) and fluid flows over them, sharing bandwidth max-min fairly.

    Usage per event: `advance(now)`, then any number of `add_flow` / `remove_flow`, then
    `next_completion()` (which recomputes rates once if anything changed).
    """

    def __init__(self) -> None:
        self.links: dict[Hashable, LinkStats] = {}
        self.flows: dict[Hashable, Flow] = {}
        self.now = 0.0
        #: Simulated seconds during which at least one flow was active.
        self.busy_time = 0.0
        self._dirty = False
        #: Links that carried a flow at the last water-filling (the only ones `advance` must integrate).
        self._busy: list[Hashable] = []
        #: Total rate of each busy link after the last water-filling.
        self._link_rate: dict[Hashable, float] = {}

    # -- topology ------------------------------------------------------------------------------------
    def add_link(self, key: Hashable, capacity: float) -> None:
        if not (capacity > 0 and math.isfinite(capacity)):
            raise NetworkError(f"link {key!r}: capacity must be a positive finite number, got {capacity!r}")
        if key in self.links:
            raise NetworkError(f"link {key!r} already exists")
        self.links[key] = LinkStats(capacity=float(capacity))

    def has_link(self, key: Hashable) -> bool:
        return key in self.links

    # -- flows ---------------------------------------------------------------------------------------
    def add_flow(
        self,
        flow_id: Hashable,
        links: Iterable[Hashable],
        size: float,
        now: float,
        cap: float = math.inf,
        tag: object = None,
    ) -> Flow:
        """Start a flow of `size` bytes over `links` at time `now` (call `advance(now)` first)."""
        self._check_time(now)
        if flow_id in self.flows:
            raise NetworkError(f"flow {flow_id!r} already active")
        path = tuple(links)
        if not path and not math.isfinite(cap):
            raise NetworkError(f"flow {flow_id!r}: no links and no rate cap, it would finish in zero time")
        for key in path:
            if key not in self.links:
                raise NetworkError(f"flow {flow_id!r}: unknown link {key!r}")
        if len(set(path)) != len(path):
            raise NetworkError(f"flow {flow_id!r}: path crosses a link twice: {path!r}")
        if size < 0 or not math.isfinite(size):
            raise NetworkError(f"flow {flow_id!r}: size must be >= 0 bytes, got {size!r}")
        flow = Flow(flow_id, path, float(size), float(size), now, cap=cap, tag=tag)
        self.flows[flow_id] = flow
        for key in path:
            st = self.links[key]
            st.flows.add(flow_id)
            st.peak_flows = max(st.peak_flows, len(st.flows))
        self._dirty = True
        return flow

    def remove_flow(self, flow_id: Hashable) -> Flow:
        flow = self.flows.pop(flow_id)
        for key in flow.links:
            self.links[key].flows.discard(flow_id)
        self._dirty = True
        return flow

    # -- time ----------------------------------------------------------------------------------------
    def _check_time(self, now: float) -> None:
        if now < self.now - 1e-9:
            raise NetworkError(f"time went backwards: {now} < {self.now}")

    def advance(self, now: float) -> None:
        """Move every flow forward to `now` at its current rate (rates must be up to date)."""
        self._check_time(now)
        if self._dirty:
            self.recompute()
        dt = now - self.now
        if dt > 0 and self.flows:
            self.busy_time += dt
            for flow in self.flows.values():
                if flow.rate > 0:
                    flow.remaining = max(0.0, flow.remaining - flow.rate * dt)
            for key, total in self._link_rate.items():
                st = self.links[key]
                st.flow_area += len(st.flows) * dt
                st.carried += total * dt
        self.now = max(self.now, now)

    def finished(self) -> list[Flow]:
        """Flows with (numerically) nothing left to send, in start order."""
        done = [f for f in self.flows.values() if _done(f, self.now)]
        done.sort(key=lambda f: (f.started, str(f.flow_id)))
        return done

    def next_completion(self) -> float:
        """Absolute time at which the next flow finishes at current rates (inf when none can)."""
        if self._dirty:
            self.recompute()
        best = math.inf
        for flow in self.flows.values():
            if _done(flow, self.now):
                return self.now
            if flow.rate > 0:
                best = min(best, self.now + flow.remaining / flow.rate)
        return best

    # -- water-filling -------------------------------------------------------------------------------
    def recompute(self) -> None:
        """Progressive filling: raise all unfrozen flows together; when a link saturates (or a flow hits its
        cap) freeze the flows it limits at the current level. The result is the max-min fair allocation.

        The next binding link comes from a heap of fair shares (residual / unfrozen flows), refreshed lazily
        for the links a frozen flow crosses: O((flows·hops + links)·log links) per recompute."""
        self._dirty = False
        active = self.flows
        busy = dict.fromkeys(key for flow in active.values() for key in flow.links)  # ordered, deterministic
        self._busy = list(busy)
        self._link_rate = {}
        if not active:
            return
        residual = {key: self.links[key].capacity for key in busy}
        unfrozen_on = {key: set(self.links[key].flows) for key in busy}
        version = dict.fromkeys(busy, 0)
        order = {key: i for i, key in enumerate(busy)}  # heap tie-break without comparing keys
        heap = [(residual[key] / len(fl), order[key], 0, key) for key, fl in unfrozen_on.items()]
        heapq.heapify(heap)
        caps = [(f.cap, i, fid) for i, (fid, f) in enumerate(active.items()) if math.isfinite(f.cap)]
        heapq.heapify(caps)
        pending = set(active)
        for flow in active.values():
            flow.rate = 0.0
        while pending:
            while heap and (heap[0][2] != version[heap[0][3]] or not unfrozen_on[heap[0][3]]):
                heapq.heappop(heap)
            while caps and caps[0][2] not in pending:
                heapq.heappop(caps)
            link_level = heap[0][0] if heap else math.inf
            if caps and caps[0][0] < link_level:
                level, _, fid = heapq.heappop(caps)
                frozen = [fid]
            elif heap:
                level, _, _, tight = heap[0]
                frozen = list(unfrozen_on[tight])
            else:  # flows with no links and an infinite cap cannot exist (add_flow refuses them)
                raise NetworkError("unbounded flow in the network")
            touched = set()
            for fid in frozen:
                flow = active[fid]
                flow.rate = level
                pending.discard(fid)
                for key in flow.links:
                    residual[key] = max(0.0, residual[key] - level)
                    unfrozen_on[key].discard(fid)
                    touched.add(key)
            for key in touched:
                version[key] += 1
                n = len(unfrozen_on[key])
                if n:
                    heapq.heappush(heap, (residual[key] / n, order[key], version[key], key))
        for key in busy:
            self._link_rate[key] = sum(active[f].rate for f in self.links[key].flows)

    # -- observation ---------------------------------------------------------------------------------
    def link_rate(self, key: Hashable) -> float:
        if self._dirty:
            self.recompute()
        return self._link_rate.get(key, 0.0)
