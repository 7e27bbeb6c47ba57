"""The policy service's core, transport-independent: validates each op's body, calls the pure `Policy` with
the service clock's `now`, keeps the rendezvous board and rank descriptors, runs the expiry sweep, and
counts everything in Prometheus metrics. Runs in the policy-service process (or embedded in a test / demo
event loop); the TCP server and the embedded client both go through `dispatch`. Never blocks the loop.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from typing import Any

from kvlane.policy.faults import Fault, FaultPlan
from kvlane.policy.invariants import ledger_violations
from kvlane.policy.types import LeaseDenied, LeaseGrant, PolicyError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import BaseModel

from . import protocol as P
from .rendezvous import AbortBoard, AnnounceBoard, RankStore

log = logging.getLogger("kvlane.policy_service")

Clock = Callable[[], float]


class ServiceMetrics:
    """Prometheus metrics of one service, in its own registry (several services may share a process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("kvlane_policy_requests", "Requests received, per op", ["op"], registry=r)
        self.errors = Counter("kvlane_policy_errors", "Error replies, per error code", ["code"], registry=r)
        self.leases_granted = Counter("kvlane_policy_leases_granted", "Leases granted", ["klass"], registry=r)
        self.leases_denied = Counter("kvlane_policy_leases_denied", "Lease requests denied", registry=r)
        self.leases_expired = Counter(
            "kvlane_policy_leases_expired", "Leases expired by the sweep (never released)", registry=r
        )
        self.leases_released = Counter("kvlane_policy_leases_released", "Leases released", registry=r)
        self.leases_renewed = Counter("kvlane_policy_leases_renewed", "Lease renewals by their live holders",
                                      registry=r)
        self.decision_seconds = Histogram(
            "kvlane_policy_decision_seconds",
            "Time the policy took to decide (select_pair, acquire_lease)",
            ["op"],
            buckets=(1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0),
            registry=r,
        )
        self.connections = Gauge("kvlane_policy_connections", "Open client connections", registry=r)
        self.announces = Gauge("kvlane_policy_announces", "Live entries on the announce board", registry=r)
        self.faults = Counter("kvlane_policy_faults_injected", "Faults injected by the fault plan", ["fault"],
                              registry=r)


def _plain(obj: Any) -> Any:
    """Turn a policy snapshot into msgpack-safe data: str keys, lists, enums by value, models as maps."""
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if isinstance(obj, enum.Enum):
        return _plain(obj.value)
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        return [_plain(v) for v in items]
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    return str(obj)


class PolicyService:
    """One policy plus the service plumbing around it. `clock` is injectable (tests drive time by hand)."""

    def __init__(
        self,
        policy: Any,
        *,
        clock: Clock = time.time,
        announce_ttl: float = 120.0,
        sweep_interval: float = 1.0,
        metrics: ServiceMetrics | None = None,
        faults: FaultPlan | None = None,
    ) -> None:
        if announce_ttl <= 0 or sweep_interval <= 0:
            raise ValueError("announce_ttl and sweep_interval must be > 0")
        self.policy = policy
        self.clock = clock
        self.sweep_interval = sweep_interval
        self.board = AnnounceBoard(ttl=announce_ttl)
        self.ranks = RankStore()
        #: Transfers that ended without their KV, for the decode engines waiting on them (transfer_status).
        self.aborts = AbortBoard(ttl=announce_ttl)
        #: lease id -> transfer id of every live lease (an expired lease aborts its transfer).
        self._lease_transfer: dict[str, str] = {}
        self.metrics = metrics or ServiceMetrics()
        self._sweeper: asyncio.Task[None] | None = None
        #: Fault injection (chaos tests only; None or an empty plan injects nothing).
        self.faults = faults if faults is not None and faults.enabled else None
        self._op_seq: dict[str, int] = {}
        #: lease id -> when the fault plan expires it (before its promised expires_at).
        self._doomed: dict[str, float] = {}
        self._handlers: dict[str, Callable[[Any, float], Any]] = {
            "ping": self._ping,
            "register_engine": self._register_engine,
            "remove_engine": self._remove_engine,
            "list_engines": self._list_engines,
            "report_load": self._report_load,
            "select_pair": self._select_pair,
            "acquire_lease": self._acquire_lease,
            "release_lease": self._release_lease,
            "renew_lease": self._renew_lease,
            "snapshot": self._snapshot,
            "announce": self._announce,
            "register_rank": self._register_rank,
            "get_ranks": self._get_ranks,
            "abort_transfer": self._abort_transfer,
            "transfer_status": self._transfer_status,
        }
        assert set(self._handlers) | {"await_announce"} == set(P.OPS)

    # ---------------------------------------------------------------------------------------- dispatch

    async def dispatch(self, op: str, body: dict[str, Any]) -> dict[str, Any]:
        """Run one request. Returns the reply body; raises a PolicyError subclass (with `.code`) otherwise."""
        spec = P.OPS.get(op)
        self.metrics.requests.labels(op=op if spec is not None else "<unknown>").inc()
        try:
            if spec is None:
                raise P.UnknownOp(f"unknown op {op!r}; known ops: {', '.join(sorted(P.OPS))}")
            msg = P.parse_body(spec.body, body)
            if op == "await_announce":
                return await self._await_announce(msg)
            return self._handlers[op](msg, self.clock())
        except PolicyError as exc:
            self.metrics.errors.labels(code=exc.code).inc()
            raise
        except Exception as exc:
            log.exception("op %s failed", op)
            self.metrics.errors.labels(code="internal").inc()
            raise P.ServiceError(f"internal error in {op}: {exc.__class__.__name__}: {exc}", code="internal") from exc

    def message_fault(self, op: str) -> tuple[Fault, float] | None:
        """The fault plan's verdict on the next request of `op`: None, or (fault, delay seconds) with fault one
        of drop_request / drop_reply / delay_reply. The key is `<op>:<n>` (the n-th request of that op this
        service has seen, from 1), so a seeded plan replays exactly for the same sequence of requests. The
        transport (TCP server, embedded client) applies the verdict; the policy never sees dropped requests."""
        if self.faults is None:
            return None
        n = self._op_seq.get(op, 0) + 1
        self._op_seq[op] = n
        verdict = self.faults.message_fault(op, f"{op}:{n}")
        if verdict is not None:
            self.metrics.faults.labels(fault=verdict[0]).inc()
            log.warning("fault injection: %s on %s #%d", verdict[0], op, n)
        return verdict

    # ---------------------------------------------------------------------------------------- handlers

    def _ping(self, _msg: Any, now: float) -> dict[str, Any]:
        return P.PingReply(server_time=now, version=P.PROTOCOL_VERSION).to_wire()

    def _register_engine(self, info: Any, now: float) -> dict[str, Any]:
        self.policy.register_engine(info, now)
        return {}

    def _remove_engine(self, ref: P.EngineRef, now: float) -> dict[str, Any]:
        result = self.policy.remove_engine(ref.engine_id, now)
        self.ranks.drop(ref.engine_id)
        return P.RemovedReply(removed=result if isinstance(result, bool) else True).to_wire()

    def _list_engines(self, _msg: Any, now: float) -> dict[str, Any]:
        return P.EnginesReply(engines=list(self.policy.engines())).to_wire()

    def _report_load(self, report: Any, now: float) -> dict[str, Any]:
        self.policy.report_load(report, now)
        return {}

    def _select_pair(self, req: Any, now: float) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            decision = self.policy.select_pair(req, now)
        finally:
            self.metrics.decision_seconds.labels(op="select_pair").observe(time.perf_counter() - t0)
        return decision.to_wire()

    def _acquire_lease(self, req: Any, now: float) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            result = self.policy.acquire_lease(req, now)
        finally:
            self.metrics.decision_seconds.labels(op="acquire_lease").observe(time.perf_counter() - t0)
        if isinstance(result, LeaseGrant):
            self.metrics.leases_granted.labels(klass=result.klass).inc()
            self._lease_transfer[result.lease_id] = result.transfer_id
            if self.faults is not None and self.faults.should("expire_lease", result.lease_id):
                self._doomed.setdefault(result.lease_id, now + self.faults.expire_lease.after_s)
            return P.LeaseReply(grant=result).to_wire()
        if isinstance(result, LeaseDenied):
            self.metrics.leases_denied.inc()
            return P.LeaseReply(denied=result).to_wire()
        raise TypeError(f"policy.acquire_lease returned {type(result).__name__}")

    def _release_lease(self, msg: P.ReleaseLeaseBody, now: float) -> dict[str, Any]:
        released = bool(self.policy.release_lease(msg.lease_id, msg.outcome, now))
        self._doomed.pop(msg.lease_id, None)
        tid = self._lease_transfer.pop(msg.lease_id, None)
        if tid is not None and msg.outcome is not None and not msg.outcome.ok:
            self.aborts.post(tid, f"prefill reported the transfer failed: {msg.outcome.error or 'no reason given'}"[:600],
                             now)
        if released:
            self.metrics.leases_released.inc()
        return P.ReleasedReply(released=released).to_wire()

    def _renew_lease(self, msg: P.RenewLeaseBody, now: float) -> dict[str, Any]:
        expires_at = self.policy.renew_lease(msg.lease_id, now)
        if expires_at is not None:
            self.metrics.leases_renewed.inc()
        return P.RenewedReply(expires_at=expires_at).to_wire()

    def _snapshot(self, msg: P.SnapshotBody, now: float) -> dict[str, Any]:
        caps = {k: v for k, v in (("max_paths", msg.max_paths), ("hottest", msg.hottest)) if v is not None}
        snap = _plain(self.policy.snapshot(now, **caps))
        if not isinstance(snap, dict):
            raise TypeError(f"policy.snapshot returned {type(snap).__name__}, not a map")
        if hasattr(self.policy, "ledger"):  # what chaos tests in other processes check (docs/reliability.md)
            snap["ledger_violations"] = ledger_violations(self.policy)
        return snap

    def _announce(self, msg: P.AnnounceBody, now: float) -> dict[str, Any]:
        expires_at = self.board.post(msg.transfer_id, msg.payload, now)
        self.metrics.announces.set(len(self.board))
        return P.AnnounceReply(expires_at=expires_at).to_wire()

    async def _await_announce(self, msg: P.AwaitAnnounceBody) -> dict[str, Any]:
        payload = await self.board.wait(msg.transfer_id, msg.timeout_s, self.clock())
        return P.AwaitAnnounceReply(payload=payload).to_wire()

    def _abort_transfer(self, msg: P.AbortTransferBody, now: float) -> dict[str, Any]:
        self.aborts.post(msg.transfer_id, f"prefill gave the transfer up: {msg.reason}", now)
        return {}

    def _transfer_status(self, msg: P.TransferStatusBody, now: float) -> dict[str, Any]:
        return P.TransferStatusReply(aborted=self.aborts.aborted(msg.transfer_ids, now)).to_wire()

    def _register_rank(self, msg: P.RegisterRankBody, now: float) -> dict[str, Any]:
        self.ranks.put(msg.engine_id, msg.rank, msg.descriptor)
        return {}

    def _get_ranks(self, ref: P.EngineRef, now: float) -> dict[str, Any]:
        ranks = [P.RankEntry(rank=r, descriptor=d) for r, d in self.ranks.get(ref.engine_id).items()]
        return P.RanksReply(engine_id=ref.engine_id, ranks=ranks).to_wire()

    # ---------------------------------------------------------------------------------------- sweep

    def sweep_once(self) -> list[str]:
        """Expire overdue leases (policy) and announce entries (board). Returns the expired lease ids."""
        now = self.clock()
        expired = list(self.policy.expire(now) or [])
        for lease_id, at in list(self._doomed.items()):
            if at <= now:
                del self._doomed[lease_id]
                if self.policy.expire_lease(lease_id, now):
                    self.metrics.faults.labels(fault="expire_lease").inc()
                    log.warning("fault injection: lease %s expired early", lease_id)
                    expired.append(lease_id)
        for lease_id in expired:
            self._doomed.pop(lease_id, None)
            tid = self._lease_transfer.pop(lease_id, None)
            if tid is not None:
                self.aborts.post(tid, f"lease {lease_id} expired before the prefill engine released it "
                                      "(prefill engine gone or stuck)", now)
        if expired:
            self.metrics.leases_expired.inc(len(expired))
            log.info("expired %d lease(s): %s", len(expired), ", ".join(expired[:10]))
        self.board.expire(now)
        self.aborts.expire(now)
        self.metrics.announces.set(len(self.board))
        return expired

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            try:
                self.sweep_once()
            except Exception:  # a sweep bug must not kill the service; it is logged and retried
                log.exception("expiry sweep failed")

    def start(self) -> None:
        """Start the background expiry sweep on the running loop (idempotent)."""
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop(), name="policy-sweep")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            try:
                await self._sweeper
            except asyncio.CancelledError:
                pass
            self._sweeper = None
