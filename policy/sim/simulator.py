"""The event-driven P/D cluster simulator: engines with queues and a token cost model, decode KV memory, and
KV transfers as max-min fair flows over the fabric — decided by a real policy object.

Owned by `kvlane.policy.sim`; runs in one process (the CLI, a test, a benchmark). It replaces only time and
the network: pairing, credits, paths, sessions and feedback come from the policy it is given (kvlane's
`Policy` or a baseline with the same methods). Simulated seconds only; it never reads a clock or opens a socket.

One request: arrival → `select_pair` → D allocates KV memory for what it lacks, P queues → prefill
(compute tokens / tokens-per-s) → `acquire_lease` (on `LeaseDenied`, retry after `retry_after`) → one flow per
TP rank on the granted path → `release_lease` with the measured `TransferOutcome` → decode (first token one
step later = TTFT; the rest at the per-sequence decode rate) → the session's KV stays resident on D (LRU)
for its next turn, which then needs only the delta.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ..types import (
    EngineInfo,
    LeaseDenied,
    LeaseGrant,
    LeaseRequest,
    LoadReport,
    NoPairAvailable,
    PairRequest,
    RankOutcome,
    Role,
    TransferOutcome,
)
from .fabric import FabricLike, SimFabric
from .network import FlowNetwork
from .workload import Turn, Workload

if TYPE_CHECKING:  # pragma: no cover
    from .metrics import SimResult

#: GLM-5.1 MLA latent KV in BF16: 78 layers × (512 + 64) × 2 bytes (seed §3).
GLM51_KV_BYTES_PER_TOKEN = 89_856


class SimError(ValueError):
    """A simulation that cannot run as configured (the message says what to change)."""


@dataclass(frozen=True)
class CostModel:
    """Engine service times. Defaults: an 8-GPU TP group serving a GLM-5.1-class MoE (order of magnitude)."""

    #: Prefill throughput of one prefill engine (tokens computed per second).
    prefill_tokens_per_s: float = 20_000.0
    #: Fixed cost per prefill (scheduling, first layers), seconds.
    prefill_overhead_s: float = 0.02
    #: Decode rate of one sequence (tokens/s); the first token arrives one step after KV lands.
    decode_tokens_per_s: float = 50.0
    #: Sequences one decode engine runs at once.
    decode_max_batch: int = 128
    #: KV bytes per token across all ranks of an engine.
    kv_bytes_per_token: int = GLM51_KV_BYTES_PER_TOKEN
    #: KV memory of one decode engine (bytes).
    decode_kv_bytes: int = 400 << 30

    def __post_init__(self) -> None:
        for name in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise SimError(f"cost model: {name} must be > 0, got {v}")
        if self.prefill_overhead_s < 0:
            raise SimError(f"cost model: prefill_overhead_s must be >= 0, got {self.prefill_overhead_s}")
        if self.decode_max_batch < 1:
            raise SimError(f"cost model: decode_max_batch must be >= 1, got {self.decode_max_batch}")
        if self.kv_bytes_per_token < 1 or self.decode_kv_bytes < 1:
            raise SimError("cost model: kv_bytes_per_token and decode_kv_bytes must be >= 1")


@dataclass(frozen=True)
class SimConfig:
    cost: CostModel = CostModel()
    #: Prefill:decode engines (seed §4 default 3:2), used when the topology's nodes carry no role hints.
    pd_ratio: tuple[int, int] = (3, 2)
    #: "interleaved": every run of nodes mixes P and D at the ratio (seed §6); "split": all P first, then all D.
    placement: Literal["interleaved", "split"] = "interleaved"
    #: GPUs per engine (TP size); None = all GPUs of a node form one engine.
    gpus_per_engine: int | None = None
    #: Pass session ids to the policy (sticky sessions). Off: every turn is paired as if new.
    sticky_sessions: bool = True
    #: Multiply every link's bandwidth (e.g. 0.25 to emulate a fabric shared with other traffic).
    link_scale: float = 1.0
    #: Rate of a same-node transfer (a path without links), Gbps.
    local_gbps: float = 3200.0
    #: Wait before asking again when `select_pair` finds no admissible pair.
    no_pair_retry_s: float = 0.05
    #: Stop (and report unfinished requests) at this simulated time.
    horizon_s: float = 1e7
    #: Keep per-link rate segments for the utilisation heat map (memory grows with events × busy links).
    record_timeline: bool = False
    #: What a P does when its lease is denied. "wakeup": it waits in a FIFO queue and is woken when a lease
    #: ends — a denial naming the decode engine queues on that D (woken when one of D's leases ends; later
    #: prefills for D queue behind it instead of asking), a link-quota denial queues on that link (woken when a
    #: lease crossing it ends). "poll": it asks again after the denial's `retry_after` (fresh requests may
    #: overtake it).
    lease_retry: Literal["wakeup", "poll"] = "wakeup"


@dataclass
class Engine:
    engine_id: str
    role: Role
    gpus: list[str]
    # prefill side
    queue: deque = field(default_factory=deque)
    busy: bool = False
    busy_s: float = 0.0
    # decode side
    capacity: int = 0
    pinned: int = 0
    retained: OrderedDict = field(default_factory=OrderedDict)  # session id -> (tokens, bytes)
    retained_bytes: int = 0
    alloc_queue: deque = field(default_factory=deque)
    slot_queue: deque = field(default_factory=deque)
    running: int = 0
    assigned: int = 0
    incoming: int = 0


@dataclass
class Request:
    turn: Turn
    arrival: float
    prefill: str = ""
    decode: str = ""
    locality: str = ""
    sticky: bool = False
    paired_at: float = math.nan
    prefill_start: float = math.nan
    prefill_end: float = math.nan
    allocated_at: float = math.nan
    resident_tokens: int = 0
    alloc_bytes: int = 0
    kv_bytes: int = 0
    lease_asked: float = math.nan
    lease_granted: float = math.nan
    denials: int = 0
    klass: str = ""
    transfer_end: float = math.nan
    decode_start: float = math.nan
    first_token: float = math.nan
    done: float = math.nan
    no_pair_retries: int = 0
    late_release: bool = False

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def kv_transfer_s(self) -> float:
        """Wire time: lease granted → last rank's bytes landed."""
        return self.transfer_end - self.lease_granted

    @property
    def kv_wait_s(self) -> float:
        """Prefill done → KV landed on D (lease waits and D allocation waits included)."""
        return self.transfer_end - self.prefill_end


@dataclass
class _Transfer:
    req: Request
    grant: LeaseGrant
    ranks_left: int
    rank_bytes: dict[int, int]
    rank_path: dict[int, str]
    rank_done: dict[int, float] = field(default_factory=dict)


def plan_engines(topology: FabricLike, cfg: SimConfig) -> list[tuple[str, Role, list[str]]]:
    """(engine id, role, GPUs) for every engine: one per node (or per `gpus_per_engine` GPUs of a node);
    roles from the nodes' role hints when the topology has them, else by `pd_ratio` and `placement`."""
    slots: list[tuple[str, list[str], str | None]] = []
    attrs = getattr(topology, "node_attrs", None)
    for node in topology.nodes:
        gpus = list(topology.gpus_of(node))
        per = cfg.gpus_per_engine or len(gpus)
        if per < 1 or len(gpus) % per:
            raise SimError(f"node {node} has {len(gpus)} GPUs, not a multiple of gpus_per_engine={per}")
        hint = attrs(node).get("role_hint") if attrs is not None else None
        for i in range(0, len(gpus), per):
            suffix = "" if per == len(gpus) else f"-e{i // per}"
            slots.append((f"{node}{suffix}", gpus[i:i + per], hint))
    p, d = cfg.pd_ratio
    if p < 1 or d < 1:
        raise SimError(f"pd_ratio must be two integers >= 1, got {cfg.pd_ratio}")
    hinted = any(h in ("prefill", "decode") for _, _, h in slots)
    n = len(slots)
    out = []
    for i, (eid, gpus, hint) in enumerate(slots):
        if hinted and hint in ("prefill", "decode"):
            role = Role.PREFILL if hint == "prefill" else Role.DECODE
        elif cfg.placement == "split":
            role = Role.PREFILL if i < round(n * p / (p + d)) else Role.DECODE
        else:  # rounded Bresenham: every window of p+d engines holds p prefill engines, P first
            q = 2 * (p + d)
            role = Role.PREFILL if (2 * (i + 1) * p + p + d) // q > (2 * i * p + p + d) // q else Role.DECODE
        out.append((eid, role, gpus))
    n_p = sum(1 for _, r, _ in out if r == Role.PREFILL)
    if n_p == 0 or n_p == n:
        raise SimError(f"the fabric gives {n_p} prefill and {n - n_p} decode engines; need at least one of "
                       "each (more nodes or a different pd_ratio)")
    return out


class Simulator:
    """Build with a topology, a policy object and a config; `run(workload)` returns a `SimResult`."""

    def __init__(self, topology: FabricLike, policy: Any, config: SimConfig | None = None,
                 policy_name: str = "policy") -> None:
        self.topology = topology
        self.policy = policy
        self.policy_name = policy_name
        self.config = config or SimConfig()
        self.network = FlowNetwork()
        self.fabric = SimFabric(topology, self.network, link_scale=self.config.link_scale,
                                local_gbps=self.config.local_gbps)
        self.engines: dict[str, Engine] = {}
        self.prefills: list[str] = []
        self.decodes: list[str] = []
        self._events: list[tuple[float, int, str, Any]] = []
        self._seq = itertools.count()
        self._dirty: set[str] = set()
        self._transfers: dict[str, _Transfer] = {}
        self.requests: list[Request] = []
        self.now = 0.0
        self.ingress_samples: list[int] = []
        self.ingress_max: dict[str, int] = {}
        self.timeline: list[tuple[float, float, Any, float]] = []
        self._last_t = 0.0
        self._next_turn: dict[str, Turn] = {}
        #: Denied transfers waiting for a lease (lease_retry="wakeup"), FIFO per blocking resource:
        #: ("d", decode engine), ("link", cable id) for a link quota, ("any", "") when the reason names neither.
        self._waiters: dict[tuple[str, str], deque[Request]] = {}
        #: Engines not registered because a GPU of theirs has no route (a failed switch, see `failure.degrade`).
        self.down_engines: list[str] = []
        self._build_engines()

    # ---- setup -----------------------------------------------------------------------------------------------
    def _build_engines(self) -> None:
        cfg = self.config
        down: frozenset[str] = getattr(self.topology, "down_gpus", frozenset())
        for eid, role, gpus in plan_engines(self.topology, cfg):
            if down and not down.isdisjoint(gpus):
                self.down_engines.append(eid)
                continue
            eng = Engine(eid, role, gpus, capacity=cfg.cost.decode_kv_bytes if role == Role.DECODE else 0)
            self.engines[eid] = eng
            (self.prefills if role == Role.PREFILL else self.decodes).append(eid)
        if not self.prefills or not self.decodes:
            raise SimError(f"after failures {len(self.down_engines)} engines are down, leaving {len(self.prefills)} "
                           f"prefill and {len(self.decodes)} decode engines; need at least one of each")
        for eng in self.engines.values():
            info = EngineInfo(engine_id=eng.engine_id, role=eng.role, gpus=eng.gpus,
                              kv_bytes_per_token=cfg.cost.kv_bytes_per_token,
                              kv_capacity_bytes=eng.capacity)
            self.policy.register_engine(info, 0.0)
            self._dirty.add(eng.engine_id)
        self._flush_loads()

    # ---- event plumbing --------------------------------------------------------------------------------------
    def _at(self, t: float, kind: str, payload: Any) -> None:
        heapq.heappush(self._events, (t, next(self._seq), kind, payload))

    def _flush_loads(self) -> None:
        for eid in sorted(self._dirty):
            e = self.engines[eid]
            if e.role == Role.PREFILL:
                rep = LoadReport(engine_id=eid, queue_depth=len(e.queue), running=1 if e.busy else 0)
            else:
                pressure = min(1.0, e.pinned / e.capacity) if e.capacity else 0.0
                rep = LoadReport(engine_id=eid, queue_depth=max(0, e.assigned - e.running), running=e.running,
                                 memory_pressure=pressure)
            self.policy.report_load(rep, self.now)
        self._dirty.clear()

    def run(self, workload: Workload) -> SimResult:
        """Simulate `workload` to the end (or `horizon_s`). One run per Simulator (state accumulates)."""
        from .metrics import SimResult

        if self.requests or self._events:
            raise SimError("this Simulator has already run; build a new one (and a new policy) for another run")
        for s in workload.sessions:
            for a, b in zip(s.turns, s.turns[1:], strict=False):
                self._next_turn[a.request_id] = b
            first = s.turns[0]
            self._at(first.arrival or 0.0, "arrive", first)
        horizon = self.config.horizon_s
        while True:
            t_net = self.network.next_completion()
            t_ev = self._events[0][0] if self._events else math.inf
            t = min(t_net, t_ev)
            if t == math.inf or t > horizon:
                break
            self.network.advance(t)
            self._record_timeline(t)
            self.now = t
            if t_net <= t_ev:
                for flow in self.network.finished():
                    self.network.remove_flow(flow.flow_id)
                    self._rank_done(flow.flow_id)  # type: ignore[arg-type]
            else:
                _, _, kind, payload = heapq.heappop(self._events)
                getattr(self, f"_on_{kind}")(payload)
            self._flush_loads()
        return SimResult.build(self, workload)

    def _record_timeline(self, t: float) -> None:
        if not self.config.record_timeline:
            return
        t0 = self._last_t
        if t > t0:
            for key in self.network._busy:
                rate = self.network.link_rate(key)
                if rate > 0:
                    self.timeline.append((t0, t, key, rate / self.network.links[key].capacity))
        self._last_t = t

    # ---- request lifecycle -----------------------------------------------------------------------------------
    def _on_arrive(self, turn: Turn) -> None:
        req = Request(turn, self.now)
        self.requests.append(req)
        self._pair(req)

    def _on_retry_pair(self, req: Request) -> None:
        self._pair(req)

    def _pair(self, req: Request) -> None:
        turn = req.turn
        bpt = self.config.cost.kv_bytes_per_token
        continuing = turn.index > 0 and turn.context_tokens > 0
        est_tokens = turn.new_tokens if continuing and self.config.sticky_sessions else turn.prompt_tokens
        pr = PairRequest(
            request_id=turn.request_id,
            session_id=turn.session_id if self.config.sticky_sessions else None,
            prompt_tokens=turn.prompt_tokens,
            kv_bytes=est_tokens * bpt,
            expected_cache_hit=min(1.0, turn.context_tokens / turn.prompt_tokens) if continuing else 0.0,
        )
        try:
            dec = self.policy.select_pair(pr, self.now)
        except NoPairAvailable:
            req.no_pair_retries += 1
            self._at(self.now + self.config.no_pair_retry_s, "retry_pair", req)
            return
        req.prefill, req.decode, req.paired_at = dec.prefill, dec.decode, self.now
        req.locality, req.sticky = dec.locality, bool(dec.sticky)
        p, d = self.engines[dec.prefill], self.engines[dec.decode]
        d.assigned += 1
        self._dirty.update((p.engine_id, d.engine_id))
        # D allocates KV blocks for what it does not hold (the session's earlier context may be resident).
        resident = 0
        if turn.session_id is not None and turn.session_id in d.retained:
            tokens, nbytes = d.retained.pop(turn.session_id)
            d.retained_bytes -= nbytes
            if tokens == turn.context_tokens:
                resident = tokens
        req.resident_tokens = resident
        req.kv_bytes = (turn.prompt_tokens - resident) * bpt
        req.alloc_bytes = (turn.prompt_tokens + turn.output_tokens) * bpt
        if req.alloc_bytes > d.capacity:
            raise SimError(f"request {turn.request_id} needs {req.alloc_bytes} bytes of KV, more than decode engine "
                           f"{d.engine_id}'s {d.capacity}; raise decode_kv_bytes")
        d.alloc_queue.append(req)
        self._try_alloc(d)
        p.queue.append(req)
        self._try_prefill(p)

    def _try_alloc(self, d: Engine) -> None:
        while d.alloc_queue:
            req = d.alloc_queue[0]
            while d.pinned + d.retained_bytes + req.alloc_bytes > d.capacity and d.retained:
                _, (_, nbytes) = d.retained.popitem(last=False)  # evict the least recently used session
                d.retained_bytes -= nbytes
            if d.pinned + d.retained_bytes + req.alloc_bytes > d.capacity:
                return
            d.alloc_queue.popleft()
            d.pinned += req.alloc_bytes
            req.allocated_at = self.now
            self._dirty.add(d.engine_id)
            if not math.isnan(req.prefill_end):
                self._ask_lease(req)

    def _try_prefill(self, p: Engine) -> None:
        if p.busy or not p.queue:
            return
        req = p.queue.popleft()
        p.busy = True
        req.prefill_start = self.now
        cost = self.config.cost
        dur = cost.prefill_overhead_s + req.turn.compute_tokens / cost.prefill_tokens_per_s
        p.busy_s += dur
        self._dirty.add(p.engine_id)
        self._at(self.now + dur, "prefill_done", req)

    def _on_prefill_done(self, req: Request) -> None:
        p = self.engines[req.prefill]
        p.busy = False
        req.prefill_end = self.now
        self._dirty.add(p.engine_id)
        self._try_prefill(p)
        if not math.isnan(req.allocated_at):
            self._ask_lease(req)

    def _ask_lease(self, req: Request, woken: bool = False, head: bool = False) -> bool:
        """Ask the policy for the lease; True when granted (the transfer has started). With wake-ups, a request
        for a decode engine that already has waiters queues behind them without asking (FIFO)."""
        if math.isnan(req.lease_asked):
            req.lease_asked = self.now
        wakeup = self.config.lease_retry == "wakeup"
        if wakeup and not woken and self._waiters.get(("d", req.decode)):
            self._waiters[("d", req.decode)].append(req)
            return False
        self.policy.expire(self.now)
        lr = LeaseRequest(transfer_id=req.turn.request_id, prefill=req.prefill, decode=req.decode,
                          bytes=req.kv_bytes)
        got = self.policy.acquire_lease(lr, self.now)
        if isinstance(got, LeaseDenied):
            req.denials += 1
            if not wakeup:
                self._at(self.now + max(got.retry_after, 1e-6), "retry_lease", req)
                return False
            q = self._waiters.setdefault(self._blocker(req, got.reason), deque())
            if head:
                q.appendleft(req)  # an old waiter keeps its place at the head
            else:
                q.append(req)
            return False
        self._start_transfer(req, got)
        return True

    @staticmethod
    def _blocker(req: Request, reason: str) -> tuple[str, str]:
        """What a denial waits for, from the ledger's reason: "decode <D> ..." or "link <id> quota: ..."."""
        if reason.startswith(f"decode {req.decode} "):
            return ("d", req.decode)
        parts = reason.split(" ", 2)
        if len(parts) == 3 and parts[0] == "link" and parts[2].startswith("quota"):
            return ("link", parts[1])
        return ("any", "")

    def _drain(self, key: tuple[str, str]) -> None:
        """Waiters on `key` ask again in FIFO order until one is refused for the same reason (it keeps its place)."""
        q = self._waiters.get(key)
        while q:
            req = q.popleft()
            if not self._ask_lease(req, woken=True, head=True) and q and q[0] is req:
                break
        if q is not None and not q:
            self._waiters.pop(key, None)

    def _wake(self, decode: str, links: set[str]) -> None:
        """A lease on `decode` over `links` ended: wake who waits for that D, for one of those links, or for
        anything."""
        self._drain(("d", decode))
        for link in sorted(links):
            self._drain(("link", link))
        self._drain(("any", ""))

    def _on_retry_lease(self, req: Request) -> None:
        self._ask_lease(req)

    def _start_transfer(self, req: Request, grant: LeaseGrant) -> None:
        req.lease_granted = self.now
        req.klass = grant.klass
        p, d = self.engines[req.prefill], self.engines[req.decode]
        paths = sorted(grant.paths, key=lambda g: g.rank)
        if not paths:
            raise SimError(f"lease {grant.lease_id} for {req.turn.request_id} grants no path")
        n = len(paths)
        share, extra = divmod(req.kv_bytes, n)
        tr = _Transfer(req, grant, n, {}, {})
        for i, pg in enumerate(paths):
            nbytes = share + (1 if i < extra else 0)
            src = p.gpus[pg.rank % len(p.gpus)]
            links = self.fabric.directed(pg.links, src, pg.src_nic)
            cap = self.fabric.local_rate if not links else math.inf
            fid = (grant.lease_id, pg.rank)
            tr.rank_bytes[pg.rank] = nbytes
            tr.rank_path[pg.rank] = pg.path
            self.network.add_flow(fid, links, nbytes, self.now, cap=cap, tag=req.decode)
        self._transfers[grant.lease_id] = tr
        d.incoming += 1
        self.ingress_samples.append(d.incoming)
        self.ingress_max[d.engine_id] = max(self.ingress_max.get(d.engine_id, 0), d.incoming)

    def _rank_done(self, fid: tuple[str, int]) -> None:
        lease_id, rank = fid
        tr = self._transfers[lease_id]
        tr.rank_done[rank] = self.now
        tr.ranks_left -= 1
        if tr.ranks_left:
            return
        del self._transfers[lease_id]
        req = tr.req
        req.transfer_end = self.now
        d = self.engines[req.decode]
        d.incoming -= 1
        start = req.lease_granted
        outcome = TransferOutcome(
            lease_id=lease_id, ok=True, bytes=req.kv_bytes, seconds=self.now - start,
            ranks=[RankOutcome(rank=r, path=tr.rank_path[r], bytes=tr.rank_bytes[r],
                               seconds=tr.rank_done[r] - start, ok=True) for r in sorted(tr.rank_done)])
        if not self.policy.release_lease(lease_id, outcome, self.now):
            req.late_release = True
        if self.config.lease_retry == "wakeup" and self._waiters:
            self._wake(d.engine_id, {lk for pg in tr.grant.paths for lk in pg.links})
        d.slot_queue.append(req)
        self._try_decode(d)

    def _try_decode(self, d: Engine) -> None:
        cost = self.config.cost
        while d.slot_queue and d.running < cost.decode_max_batch:
            req = d.slot_queue.popleft()
            d.running += 1
            req.decode_start = self.now
            step = 1.0 / cost.decode_tokens_per_s
            req.first_token = self.now + step
            self._dirty.add(d.engine_id)
            self._at(self.now + req.turn.output_tokens * step, "decode_done", req)

    def _on_decode_done(self, req: Request) -> None:
        d = self.engines[req.decode]
        d.running -= 1
        d.assigned -= 1
        d.pinned -= req.alloc_bytes
        req.done = self.now
        turn = req.turn
        nxt = self._next_turn.pop(turn.request_id, None)
        if nxt is not None and turn.session_id is not None:
            # The session's KV (this prompt + its output) stays resident, evictable, for the next turn.
            d.retained[turn.session_id] = (turn.prompt_tokens + turn.output_tokens, req.alloc_bytes)
            d.retained_bytes += req.alloc_bytes
        if nxt is not None:
            t = self.now + nxt.think_s
            if nxt.arrival is not None:
                t = max(t, nxt.arrival)
            self._at(t, "arrive", nxt)
        self._dirty.add(d.engine_id)
        self._try_decode(d)
        self._try_alloc(d)
