"""Baseline pairing policies on the same interface as `kvlane.policy.core.Policy`, for side-by-side runs.

Owned by `kvlane.policy.sim`; run by the simulator in place of the real policy. Pure and seeded. Baselines
never look at the topology when pairing; they send on the fabric's default route (ECMP: one of the shortest
paths, hashed per rank stream), and they grant every lease at once unless `credits=True`, in which case the
same `CreditLedger` as kvlane's gates D ingress (streams and bytes; no link reservations).
"""

from __future__ import annotations

import hashlib
import random
import zlib
from collections.abc import Callable
from typing import Any

from ..config import CreditConfig, PolicyConfig
from ..credits import CreditLedger, Denial, Klass
from ..types import (
    EngineInfo,
    LeaseDenied,
    LeaseGrant,
    LeaseRequest,
    LoadReport,
    NoPairAvailable,
    PairDecision,
    PairRequest,
    PathGrant,
    TransferOutcome,
    UnknownEngine,
)

BASELINES = ("random", "round-robin", "least-loaded", "kv-aware", "fixed")
POLICIES = ("kvlane",) + BASELINES

#: Lease lifetime of a baseline without credits (it never expires a transfer in practice).
_NO_CREDIT_TTL_S = 1e9

#: How a baseline picks a rank stream's route (default "per-hop"). "listed": one of the topology's listed equal-cost candidates,
#: hashed per stream (the topology lists at most `ecmp` routes per port pair, found depth-first, so on a
#: fat-tree they share their first up-link). "per-hop": every switch hashes the stream over *all* its
#: next hops on a shortest route, as switch ECMP does with per-flow (per-QP) hashing.
ECMP_MODES = ("listed", "per-hop")


def _hash(text: str) -> int:
    """A stable hash with independent bits for related inputs (CRC32 is linear: crc(x#0) ^ crc(x#1) does not
    depend on x, so two hops hashed with CRC would always make correlated choices)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class _PerHopECMP:
    """Shortest switch routes with an independent per-stream hash at every hop (networkx BFS distances)."""

    def __init__(self, topology: Any) -> None:
        import networkx as nx

        self.topology = topology
        self.graph = nx.Graph()
        switches = set(topology.switches)
        self.graph.add_nodes_from(switches)
        for link in topology.links:
            if link.a in switches and link.b in switches:
                self.graph.add_edge(link.a, link.b)
        self._dist: dict[str, dict[str, int]] = {}
        self._nx = nx

    def dist(self, target: str) -> dict[str, int]:
        d = self._dist.get(target)
        if d is None:
            d = self._dist[target] = dict(self._nx.single_source_shortest_path_length(self.graph, target))
        return d

    def route(self, src: str, dst: str, salt: str) -> Any:
        """A Path src GPU -> dst GPU: the (src port, dst port) pair with the fewest switches (ties hashed),
        then at each switch one of the next hops towards dst, hashed with the hop index."""
        t = self.topology
        sw = t.switches
        best: list[tuple[int, str, str, str, str]] = []
        for spid, _, si in t.port_records(src):
            for dpid, _, di in t.port_records(dst):
                d = self.dist(sw[di]).get(sw[si])
                if d is None:
                    continue
                if not best or d < best[0][0]:
                    best = [(d, spid, dpid, sw[si], sw[di])]
                elif d == best[0][0]:
                    best.append((d, spid, dpid, sw[si], sw[di]))
        if not best:
            raise NoPairAvailable(f"no path from {src} to {dst}")
        _, spid, dpid, s, target = best[_hash(salt) % len(best)]
        dist = self.dist(target)
        route, links = [s], []
        cur = s
        hop = 0
        while cur != target:
            nxt = sorted(v for v in self.graph.neighbors(cur) if dist.get(v) == dist[cur] - 1)
            v = nxt[_hash(f"{salt}#{hop}") % len(nxt)]
            par = t.links_between(t.switch_index(cur), t.switch_index(v))
            links.append(par[_hash(f"{salt}@{hop}") % len(par)][0])
            route.append(v)
            cur = v
            hop += 1
        return t.make_path("ecmp", spid, [t.switch_index(x) for x in route], links, dpid)


class BaselinePolicy:
    """Common part: engine registry, load reports, ECMP paths, leases (optionally credit-gated)."""

    name = "baseline"

    def __init__(self, topology: Any, *, seed: int = 0, credits: bool = False,
                 credit_config: CreditConfig | None = None, ecmp: str = "per-hop") -> None:
        if ecmp not in ECMP_MODES:
            raise ValueError(f"ecmp must be one of {', '.join(ECMP_MODES)}, got {ecmp!r}")
        self.topology = topology
        self._per_hop = _PerHopECMP(topology) if ecmp == "per-hop" else None
        self.rng = random.Random(seed)
        self.engines: dict[str, EngineInfo] = {}
        self.loads: dict[str, LoadReport] = {}
        self.credits = credits
        self.ledger = CreditLedger(credit_config or CreditConfig(), lambda lid: topology.link(lid).gbps)
        self._leases: dict[str, LeaseGrant] = {}
        self._n = 0

    # ---- registry ----------------------------------------------------------------------------------------
    def register_engine(self, info: EngineInfo, now: float) -> None:
        self.engines[info.engine_id] = info

    def remove_engine(self, engine_id: str, now: float) -> None:
        if engine_id not in self.engines:
            raise UnknownEngine(f"unknown engine {engine_id!r}")
        del self.engines[engine_id]
        self.loads.pop(engine_id, None)

    def report_load(self, report: LoadReport, now: float) -> None:
        if report.engine_id not in self.engines:
            raise UnknownEngine(f"load report for unknown engine {report.engine_id!r}")
        self.loads[report.engine_id] = report

    def _pool(self, prefill: bool) -> list[str]:
        ids = [e for e, info in self.engines.items()
               if (info.role.can_prefill() if prefill else info.role.can_decode())]
        if not ids:
            raise NoPairAvailable(f"no {'prefill' if prefill else 'decode'} engine registered")
        return ids

    def _load(self, engine_id: str) -> int:
        r = self.loads.get(engine_id)
        return (r.queue_depth + r.running) if r else 0

    def _least_loaded(self, ids: list[str]) -> str:
        best = min(self._load(e) for e in ids)
        return self.rng.choice([e for e in ids if self._load(e) == best])

    # ---- pairing -------------------------------------------------------------------------------------------
    def choose(self, req: PairRequest) -> tuple[str, str]:
        raise NotImplementedError

    def select_pair(self, req: PairRequest, now: float) -> PairDecision:
        p, d = self.choose(req)
        loc = "unknown"
        locality = getattr(self.topology, "locality", None)
        if locality is not None:
            loc = str(getattr(locality(self.engines[p].gpus[0], self.engines[d].gpus[0]), "value", "unknown"))
        return PairDecision(request_id=req.request_id, prefill=p, decode=d, score=0.0, breakdown={},
                            locality=loc, candidates_scored=0)

    # ---- leases --------------------------------------------------------------------------------------------
    def _ecmp(self, src: str, dst: str, salt: str) -> Any:
        if self._per_hop is not None and self.topology.locality(src, dst).value != "same-node":
            try:
                return self._per_hop.route(src, dst, salt)
            except NoPairAvailable:  # no switch route (e.g. a rail-only cross-rail pair): the listed relays
                pass
        paths = self.topology.paths(src, dst)
        if not paths:
            raise NoPairAvailable(f"no path from {src} to {dst}")
        hops = min(p.hops for p in paths)
        equal = [p for p in paths if p.hops == hops]
        return equal[zlib.crc32(salt.encode()) % len(equal)]

    def acquire_lease(self, req: LeaseRequest, now: float) -> LeaseGrant | LeaseDenied:
        for e in (req.prefill, req.decode):
            if e not in self.engines:
                raise UnknownEngine(f"unknown engine {e!r}")
        self._n += 1
        lease_id = f"B-{self._n:x}"
        pg, dg = self.engines[req.prefill].gpus, self.engines[req.decode].gpus
        grants = []
        rate = 0.0  # bytes/s of all rank streams at their paths' bottlenecks (for the expected finish time)
        for rank, (s, d) in enumerate(zip(pg, dg, strict=False)):
            path = self._ecmp(s, d, f"{req.transfer_id}/{rank}")
            rate += path.bottleneck_gbps * 1e9 / 8
            grants.append(PathGrant(rank=rank, path=path.name, links=list(path.links), src_nic=path.src_nic,
                                    dst_nic=path.dst_nic))
        klass: Klass = "reserved"
        expires = now + _NO_CREDIT_TTL_S
        if self.credits:
            cfg = self.ledger.config
            klass = "best_effort" if req.best_effort_ok and req.bytes < cfg.best_effort_max_bytes else "reserved"
            got = self.ledger.acquire(lease_id=lease_id, transfer_id=req.transfer_id, holder=req.prefill,
                                      decode=req.decode, nbytes=req.bytes, klass=klass, link_rates={}, now=now,
                                      expected_seconds=req.bytes / rate if rate > 0 else 0.0)
            if isinstance(got, Denial):
                return LeaseDenied(transfer_id=req.transfer_id, reason=got.reason[:500],
                                   retry_after=got.retry_after)
            expires = got.expires_at
        grant = LeaseGrant(lease_id=lease_id, transfer_id=req.transfer_id, prefill=req.prefill,
                           decode=req.decode, bytes=req.bytes, klass=klass, paths=grants, granted_at=now,
                           expires_at=expires)
        self._leases[lease_id] = grant
        return grant

    def release_lease(self, lease_id: str, outcome: TransferOutcome | None, now: float) -> bool:
        if self._leases.pop(lease_id, None) is None:
            return False
        if self.credits:
            return self.ledger.release(lease_id, now) == "released"
        return True

    def expire(self, now: float) -> None:
        if self.credits:
            for lease in self.ledger.expire(now):
                self._leases.pop(lease.lease_id, None)

    def snapshot(self, now: float) -> dict[str, Any]:
        return {"policy": self.name, "engines": len(self.engines), "leases": len(self._leases),
                "credits": self.credits}


class RandomPolicy(BaselinePolicy):
    """SGLang mini_lb: a uniformly random prefill and a uniformly random decode engine."""

    name = "random"

    def choose(self, req: PairRequest) -> tuple[str, str]:
        return self.rng.choice(self._pool(True)), self.rng.choice(self._pool(False))


class RoundRobinPolicy(BaselinePolicy):
    """Prefill and decode engines each taken in turn."""

    name = "round-robin"

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self._np = 0
        self._nd = 0

    def choose(self, req: PairRequest) -> tuple[str, str]:
        ps, ds = self._pool(True), self._pool(False)
        p, d = ps[self._np % len(ps)], ds[self._nd % len(ds)]
        self._np += 1
        self._nd += 1
        return p, d


class LeastLoadedPolicy(BaselinePolicy):
    """The prefill and the decode engine with the fewest queued + running requests (ties at random)."""

    name = "least-loaded"

    def choose(self, req: PairRequest) -> tuple[str, str]:
        return self._least_loaded(self._pool(True)), self._least_loaded(self._pool(False))


class KVAwarePolicy(BaselinePolicy):
    """Dynamo-like KV/cache-aware routing without topology: a session goes back to the decode engine that
    holds its KV (the largest prefix overlap) while that engine's memory pressure is below `memory_limit`;
    otherwise, and for new sessions, the least-loaded decode engine. Prefill: least loaded."""

    name = "kv-aware"

    def __init__(self, *a: Any, memory_limit: float = 0.95, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.memory_limit = memory_limit
        self._holder: dict[str, str] = {}

    def choose(self, req: PairRequest) -> tuple[str, str]:
        p = self._least_loaded(self._pool(True))
        home = self._holder.get(req.session_id) if req.session_id else None
        report = self.loads.get(home) if home else None
        if home in self.engines and (report is None or report.memory_pressure < self.memory_limit):
            d = home
        else:
            d = self._least_loaded(self._pool(False))
        if req.session_id:
            self._holder[req.session_id] = d  # type: ignore[assignment]
        return p, d  # type: ignore[return-value]


class FixedPolicy(BaselinePolicy):
    """Fixed binding: prefill engines taken in turn, each always paired with the same decode engine
    (prefill i → decode i mod #decode, in registration order)."""

    name = "fixed"

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self._np = 0

    def choose(self, req: PairRequest) -> tuple[str, str]:
        ps, ds = self._pool(True), self._pool(False)
        i = self._np % len(ps)
        self._np += 1
        return ps[i], ds[i % len(ds)]


_CLASSES: dict[str, Callable[..., BaselinePolicy]] = {
    "random": RandomPolicy,
    "round-robin": RoundRobinPolicy,
    "least-loaded": LeastLoadedPolicy,
    "kv-aware": KVAwarePolicy,
    "fixed": FixedPolicy,
}


def no_credit_config(base: PolicyConfig | None = None) -> PolicyConfig:
    """kvlane's policy with its credits opened wide (to measure what the credits themselves do): the most
    streams the config allows, unbounded ingress bytes, and link reservations too small to ever bind."""
    base = base or PolicyConfig()
    credits = base.credits.model_copy(update={
        "max_streams": 64, "ingress_bytes": 1 << 62, "best_effort_max_streams": 1024,
        "target_transfer_s": 1e9, "min_stream_gbps": 1e-6, "reservable_fraction": 1.0,
    })
    return base.model_copy(update={"credits": credits})


def make_policy(name: str, topology: Any, *, seed: int = 0, credits: bool | None = None,
                config: PolicyConfig | None = None, ecmp: str = "per-hop") -> Any:
    """A policy by name. `credits`: None = the policy's default (kvlane on, baselines off). `ecmp`: how a
    baseline routes (see `ECMP_MODES`); kvlane always chooses among the topology's candidates itself."""
    if name == "kvlane":
        from ..core import Policy

        cfg = config or PolicyConfig()
        if credits is False:
            cfg = no_credit_config(cfg)
        return Policy(topology, cfg)
    if name not in _CLASSES:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    credit_cfg = config.credits if config is not None else None
    return _CLASSES[name](topology, seed=seed, credits=bool(credits), credit_config=credit_cfg, ecmp=ecmp)
