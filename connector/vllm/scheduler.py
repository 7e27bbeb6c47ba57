"""Scheduler side of the kvlane vLLM connector: one per engine, inside vLLM's engine-core process.

Decode: claims the prompt tokens it does not hold, arms the workers, announces the destination blocks.
Prefill: holds a finished prefill's blocks, waits for D's announce and a lease on background threads, hands
the push to the workers, releases the lease with the measured outcome. Never blocks a scheduler hook on the
network (every policy-service call runs on a background thread with a deadline) and never holds blocks
past a deadline: every wait ends in a push, a drop, or a load error vLLM knows how to handle.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from kvlane.policy.types import (
    EngineInfo,
    InvalidRequest,
    LeaseDenied,
    LeaseGrant,
    LeaseRequest,
    RankOutcome,
    Role,
    TransferOutcome,
)
from vllm.logger import init_logger

from .meta import ArmOrder, KVLaneMetadata, KVLaneStats, KVLaneWorkerMeta, PushOrder, RankReport
from .params import ConnectorConfig, KVLaneParams, ParamsError, TransferState, parse_params

logger = init_logger("vllm.kvlane.connector")


@dataclass
class RecvJob:
    """D: one request's incoming KV."""

    req_id: str
    params: KVLaneParams
    dst_blocks: list[int]
    first_block: int
    num_tokens: int
    deadline: float
    expect_bytes: int
    state: TransferState = TransferState.PENDING
    armed_ranks: int = 0
    reports: list[RankReport] = field(default_factory=list)
    finished: bool = False  # vLLM already called request_finished
    aborted: bool = False  # P gave it up (policy service said so); its receive is being cancelled


@dataclass
class SendJob:
    """P: one finished prefill whose blocks kvlane holds until pushed or dropped."""

    req_id: str
    params: KVLaneParams
    src_blocks: list[int]
    num_tokens: int
    created: float
    state: TransferState = TransferState.ARMED
    lease: LeaseGrant | None = None
    lease_wait: float = 0.0
    n_blocks: int = 0
    bytes: int = 0
    reports: list[RankReport] = field(default_factory=list)
    released_to_workers: bool = False  # a push or drop order went out
    outcome_done: bool = False


def block_bytes_per_rank(kv_cache_config: Any) -> int:
    """Bytes one block occupies on one rank, all layers (what a push moves per block per rank)."""
    total = 0
    for group in kv_cache_config.kv_cache_groups:
        total += group.kv_cache_spec.page_size_bytes * len(group.layer_names)
    return total


class SchedulerSide:
    def __init__(self, vllm_config: Any, kv_cache_config: Any, cfg: ConnectorConfig, client: Any = None):
        """`client`: a SyncPolicyClient-like object (tests inject an embedded one); default: TCP to cfg.policy."""
        from kvlane.integration.policy_service.client import SyncPolicyClient
        from kvlane.integration.policy_service.leases import LeaseKeeper

        self.cfg = cfg
        self.engine_id = cfg.engine_id
        self.block_size: int = vllm_config.cache_config.block_size
        self.tp_size: int = vllm_config.parallel_config.tensor_parallel_size
        if len(kv_cache_config.kv_cache_groups) != 1:
            raise ValueError(
                f"KVLaneConnector supports one KV cache group, this model has {len(kv_cache_config.kv_cache_groups)}"
            )
        self.rank_block_bytes = block_bytes_per_rank(kv_cache_config)
        self.block_bytes = self.rank_block_bytes * self.tp_size
        self.num_blocks = kv_cache_config.num_blocks
        self.gpus = cfg.gpu_ids(self.tp_size)
        self.client = client or SyncPolicyClient(cfg.policy, timeout=cfg.rpc_timeout_s)
        self._pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="kvlane-sched")
        self._lock = threading.Lock()
        self._closed = threading.Event()
        # decode side
        self._recv: dict[str, RecvJob] = {}
        self._seen: set[str] = set()  # requests whose params were consumed (a preemption must not reload)
        self._rejected: set[str] = set()
        self._to_arm: list[ArmOrder] = []
        self._to_cancel: list[tuple[str, str]] = []
        # prefill side
        self._send: dict[str, SendJob] = {}
        self._to_push: list[PushOrder] = []
        self._to_drop: list[str] = []
        self._stats = KVLaneStats()
        self._pool.submit(self._register_engine)
        if cfg.role == "decode" and cfg.abort_poll_s > 0:
            threading.Thread(target=self._watch_aborts, name="kvlane-aborts", daemon=True).start()
        # P: renews the lease of each push in flight (a first push to a D includes its handshakes)
        self._leases = LeaseKeeper(self.client, on_gone=self._lease_gone)

    # ---------------------------------------------------------------------------------------- helpers
    def _params(self, request: Any, want_role: str) -> KVLaneParams | None:
        rid = request.request_id
        if rid in self._rejected:
            return None
        try:
            p = parse_params(getattr(request, "kv_transfer_params", None))
        except ParamsError as exc:
            self._rejected.add(rid)
            logger.error("kvlane: request %s ignored by the connector (served without transfer): %s", rid, exc)
            return None
        if p is None or p.role != want_role:
            return None
        mine = p.decode if want_role == "decode" else p.prefill
        if mine != self.engine_id or self.cfg.role != want_role:
            self._rejected.add(rid)
            logger.error("kvlane: request %s names %s %r but this is %s engine %r; served without transfer",
                         rid, want_role, mine, self.cfg.role, self.engine_id)
            return None
        return p

    def _count_failure(self, reason: str) -> None:
        with self._lock:
            self._stats.count("failures", reason)

    def _register_engine(self) -> None:
        info = EngineInfo(
            engine_id=self.engine_id, role=Role(self.cfg.role), gpus=self.gpus,
            endpoints={"http": self.cfg.http} if self.cfg.http else {},
            kv_bytes_per_token=self.block_bytes // self.block_size,
            kv_capacity_bytes=self.num_blocks * self.block_bytes,
        )
        delay = 0.5
        while not self._closed.is_set():
            try:
                self.client.register_engine(info)
                logger.info("kvlane: engine %s (%s, gpus %s) registered with %s", self.engine_id,
                            self.cfg.role, self.gpus, self.cfg.policy)
                return
            except Exception as exc:
                logger.warning("kvlane: register_engine with %s failed (%s); retrying in %.1fs",
                               self.cfg.policy, exc, delay)
                self._closed.wait(delay)
                delay = min(delay * 2, 10.0)

    # ------------------------------------------------------------------------------------ decode side
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        if request.request_id in self._seen:
            return 0, False
        if self._params(request, "decode") is None:
            return 0, False
        count = request.num_prompt_tokens - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        rid = request.request_id
        if rid in self._seen:
            return
        p = self._params(request, "decode")
        if p is None:
            return
        self._seen.add(rid)
        n = request.num_prompt_tokens
        n_blocks = math.ceil(n / self.block_size)
        if num_external_tokens <= 0:
            # D already holds the whole prompt: tell P at once, so it frees its blocks without waiting.
            self._pool.submit(self._announce_nothing, p, n, n_blocks)
            return
        first_token = n - num_external_tokens
        if first_token % self.block_size:
            raise AssertionError(f"kvlane: local hit of {first_token} tokens is not block-aligned")
        first_block = first_token // self.block_size
        (block_ids,) = blocks.get_block_ids()
        dst = list(block_ids[first_block:n_blocks])
        job = RecvJob(rid, p, dst, first_block, n, time.monotonic() + self.cfg.recv_timeout_s,
                      len(dst) * self.block_bytes)
        with self._lock:
            self._recv[rid] = job
            self._to_arm.append(ArmOrder(rid, p.transfer_id, dst, job.deadline))
        logger.info("kvlane D %s: request %s transfer %s: %d prompt tokens, %d held locally, expecting %d blocks "
                    "(%d bytes)", self.engine_id, rid, p.transfer_id, n, first_token, len(dst), job.expect_bytes)

    def _announce_payload(self, p: KVLaneParams, n: int, first_block: int, dst: list[int]) -> dict[str, Any]:
        return {"decode": self.engine_id, "first_block": first_block, "block_ids": dst, "num_tokens": n,
                "block_size": self.block_size, "tp_size": self.tp_size}

    def _announce_nothing(self, p: KVLaneParams, n: int, n_blocks: int) -> None:
        try:
            self.client.announce(p.transfer_id, self._announce_payload(p, n, n_blocks, []))
        except Exception as exc:
            logger.warning("kvlane D: empty announce of %s failed (%s); P will drop it at its deadline",
                           p.transfer_id, exc)

    def _announce(self, job: RecvJob) -> None:
        """Publish the armed destination blocks; retried until the receive deadline, else cancelled."""
        payload = self._announce_payload(job.params, job.num_tokens, job.first_block, job.dst_blocks)
        delay = 0.2
        while True:
            try:
                self.client.announce(job.params.transfer_id, payload)
                with self._lock:
                    if job.state < TransferState.ANNOUNCED and job.state != TransferState.FAILED:
                        job.state = TransferState.ANNOUNCED
                return
            except Exception as exc:
                if time.monotonic() + delay >= job.deadline or self._closed.is_set():
                    logger.error("kvlane D: cannot announce %s (%s); giving up", job.params.transfer_id, exc)
                    self._count_failure("announce_failed")
                    with self._lock:
                        self._to_cancel.append((job.req_id, f"announce failed: {exc}"))
                    return
                logger.warning("kvlane D: announce of %s failed (%s); retrying", job.params.transfer_id, exc)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _lease_gone(self, grant: LeaseGrant) -> None:
        logger.warning("kvlane P %s: lease %s of transfer %s expired while its push was in flight; D stops waiting "
                       "for it", self.engine_id, grant.lease_id, grant.transfer_id)

    def _watch_aborts(self) -> None:
        """Every `abort_poll_s`, ask the policy service which awaited transfers P gave up (a failed push, an
        expired lease of a dead P, a job P dropped) and cancel their receives: vLLM then applies
        kv_load_failure_policy at once instead of at recv_timeout_s (docs/reliability.md)."""
        from kvlane.integration.policy_service.protocol import MAX_STATUS_IDS

        while not self._closed.wait(self.cfg.abort_poll_s):
            with self._lock:
                waiting = {j.params.transfer_id: j for j in self._recv.values()
                           if j.state >= TransferState.ANNOUNCED and j.state != TransferState.DONE
                           and not (j.aborted or j.finished)}
            if not waiting:
                continue
            try:
                aborted = self.client.transfer_status(list(waiting)[:MAX_STATUS_IDS])
            except Exception as exc:  # the service may be restarting: the receive deadline still holds
                logger.debug("kvlane D: transfer_status failed (%s)", exc)
                continue
            for tid, why in aborted.items():
                job = waiting.get(tid)
                if job is None:
                    continue
                with self._lock:
                    if job.state in (TransferState.DONE, TransferState.FAILED) or job.aborted or job.finished:
                        continue
                    job.aborted = True
                    self._to_cancel.append((job.req_id, why))
                logger.warning("kvlane D %s: transfer %s (request %s) will not come: %s", self.engine_id, tid,
                               job.req_id, why)

    # ----------------------------------------------------------------------------------- prefill side
    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        self._rejected.discard(rid)
        # decode: report what arrived; cancel a receive still in flight (aborted request)
        job = self._recv.get(rid)
        self._seen.discard(rid)
        if job is not None:
            forget = getattr(self.client, "forget_announce", None)
            if forget is not None:  # over for the policy too: not re-announced to a restarted service
                forget(job.params.transfer_id)
            with self._lock:
                job.finished = True
                if job.state not in (TransferState.DONE, TransferState.FAILED):
                    self._to_cancel.append((rid, "request finished before its KV arrived"))
                else:
                    del self._recv[rid]
            return False, self._recv_params(job)
        p = self._params(request, "prefill")
        if p is None:
            return False, None
        from vllm.v1.request import RequestStatus

        if request.status not in (RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_STOPPED):
            logger.warning("kvlane P: request %s (transfer %s) ended as %s; nothing pushed", rid,
                           p.transfer_id, request.status.name)
            return False, {"kvlane": 1, "transfer_id": p.transfer_id, "status": "not_prefilled"}
        if not block_ids:
            return False, {"kvlane": 1, "transfer_id": p.transfer_id, "status": "no_blocks"}
        send = SendJob(rid, p, list(block_ids), request.num_prompt_tokens, time.monotonic())
        with self._lock:
            self._send[rid] = send
        self._pool.submit(self._prepare_push, send)
        return True, {"kvlane": 1, "transfer_id": p.transfer_id, "status": "pushing"}

    def _recv_params(self, job: RecvJob) -> dict[str, Any]:
        got = sum(r.bytes for r in job.reports)
        return {"kvlane": 1, "transfer_id": job.params.transfer_id, "status": job.state.name.lower(),
                "received_bytes": got, "received_blocks": len(job.dst_blocks) if job.state == TransferState.DONE
                else 0, "first_block": job.first_block, "block_bytes": self.block_bytes}

    def _drop(self, job: SendJob, reason: str, failure: bool = True) -> None:
        (logger.warning if failure else logger.info)(
            "kvlane P %s: transfer %s (request %s) dropped after %.2fs: %s", self.engine_id,
            job.params.transfer_id, job.req_id, time.monotonic() - job.created, reason)
        if failure:
            self._count_failure(reason.split(":")[0])
        with self._lock:
            job.state = TransferState.FAILED if failure else TransferState.DONE
            job.outcome_done = True
            job.released_to_workers = True
            self._to_drop.append(job.req_id)
        if failure and not self._closed.is_set():  # the D waiting for this KV stops waiting (it polls for aborts)
            self._pool.submit(self._abort, job.params.transfer_id, reason)

    def _abort(self, tid: str, reason: str) -> None:
        try:
            self.client.abort_transfer(tid, reason)
        except Exception as exc:
            logger.warning("kvlane P: abort_transfer %s failed (%s); D waits for its receive deadline", tid, exc)

    def _prepare_push(self, job: SendJob) -> None:
        """Background: announce -> rank descriptors -> lease -> push order. Every wait has a deadline."""
        tid = job.params.transfer_id
        try:
            payload = self._await_announce(job)
            if payload is None:
                return
            err = self._check_payload(job, payload)
            if err:
                self._drop(job, f"announce_mismatch: {err}")
                return
            first_block, dst = payload["first_block"], payload["block_ids"]
            n_blocks = math.ceil(job.num_tokens / self.block_size)
            src = job.src_blocks[first_block:n_blocks]
            if not dst:
                self._drop(job, "D holds every block already", failure=False)
                return
            job.state = TransferState.ANNOUNCED
            t_ann = time.monotonic()
            lease_deadline = t_ann + self.cfg.lease_timeout_s
            peers = self._peers(job, lease_deadline)
            if peers is None:
                return
            job.n_blocks, job.bytes = len(dst), len(dst) * self.block_bytes
            grant = self._lease(job, lease_deadline)
            if grant is None:
                return
            job.lease, job.lease_wait = grant, time.monotonic() - t_ann
            paths = {g.rank: g.path for g in grant.paths}
            order = PushOrder(job.req_id, tid, src, list(dst), time.monotonic() + self.cfg.push_timeout_s,
                              [paths.get(r, "default") for r in range(self.tp_size)], peers)
            with self._lock:
                job.state = TransferState.LEASED
                job.released_to_workers = True
                self._to_push.append(order)
                self._stats.data["lease_wait_seconds"].append(job.lease_wait)
            self._leases.hold(grant, until=order.deadline + 15.0)  # the workers wait up to deadline + 10 s
        except Exception as exc:  # a bug here must not strand the blocks
            logger.exception("kvlane P: preparing transfer %s failed", tid)
            if not job.released_to_workers:
                self._drop(job, f"internal_error: {exc}")

    def _await_announce(self, job: SendJob) -> dict[str, Any] | None:
        from kvlane.integration.policy_service.protocol import AnnounceTimeout

        deadline = job.created + self.cfg.announce_timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closed.is_set():
                self._drop(job, f"no_announce: decode {job.params.decode} did not announce within "
                                f"{self.cfg.announce_timeout_s:g}s")
                return None
            try:
                return self.client.await_announce(job.params.transfer_id, timeout_s=min(remaining, 30.0))
            except AnnounceTimeout:
                continue
            except Exception as exc:  # service unreachable: keep trying until the deadline
                logger.warning("kvlane P: await_announce %s failed (%s); retrying", job.params.transfer_id, exc)
                self._closed.wait(min(1.0, max(0.0, remaining)))

    def _check_payload(self, job: SendJob, pl: Any) -> str | None:
        if not isinstance(pl, dict):
            return "payload is not a map"
        n_blocks = math.ceil(job.num_tokens / self.block_size)
        if pl.get("decode") != job.params.decode:
            return f"announced by {pl.get('decode')!r}, expected {job.params.decode!r}"
        if pl.get("num_tokens") != job.num_tokens:
            return f"D has {pl.get('num_tokens')} prompt tokens, P has {job.num_tokens} (tokenizers differ?)"
        if pl.get("block_size") != self.block_size:
            return f"D block size {pl.get('block_size')}, P block size {self.block_size}"
        d_tp = self.cfg.peer_tp or self.tp_size
        if pl.get("tp_size") != d_tp:
            return (f"D TP={pl.get('tp_size')}, P TP={self.tp_size}: set extra_config peer_tp (with a kvlane.transport "
                    "data path) for heterogeneous TP" if self.cfg.peer_tp is None else
                    f"D TP={pl.get('tp_size')} but this P is configured with peer_tp={self.cfg.peer_tp}")
        fb, ids = pl.get("first_block"), pl.get("block_ids")
        if type(fb) is not int or not 0 <= fb <= n_blocks:
            return f"first_block {fb!r} outside [0, {n_blocks}]"
        if not isinstance(ids, list) or not all(type(b) is int and b >= 0 for b in ids):
            return "block_ids is not a list of block numbers"
        if len(ids) != n_blocks - fb:
            return f"{len(ids)} destination blocks for {n_blocks - fb} source blocks"
        if len(job.src_blocks) < n_blocks:
            return f"P holds {len(job.src_blocks)} blocks, the prompt needs {n_blocks}"
        return None

    def _peers(self, job: SendJob, deadline: float) -> list[bytes] | None:
        """D's registered rank descriptors (opaque here: the workers' data path decodes and checks them)."""
        while True:
            try:
                ranks = self.client.get_ranks(job.params.decode)
                d_tp = self.cfg.peer_tp or self.tp_size
                if all(r in ranks for r in range(d_tp)):
                    return [ranks[r] for r in range(d_tp)]
                why = f"D registered ranks {sorted(ranks)}, expected TP={d_tp}"
            except Exception as exc:
                why = str(exc)
            if time.monotonic() + 0.5 >= deadline or self._closed.is_set():
                self._drop(job, f"no_ranks: {why}")
                return None
            self._closed.wait(0.5)

    def _lease(self, job: SendJob, deadline: float) -> LeaseGrant | None:
        req = LeaseRequest(transfer_id=job.params.transfer_id, prefill=self.engine_id, decode=job.params.decode,
                           bytes=job.bytes)
        why = "no answer"
        while True:
            wait = 0.5
            try:
                ans = self.client.acquire_lease(req)
                if isinstance(ans, LeaseGrant):
                    return ans
                assert isinstance(ans, LeaseDenied)
                why, wait = ans.reason, max(0.05, ans.retry_after)
            except InvalidRequest as exc:  # the policy will never grant this one: free the blocks now
                self._drop(job, f"lease_refused: {exc}")
                return None
            except Exception as exc:
                why = f"{exc.__class__.__name__}: {exc}"
                logger.warning("kvlane P: acquire_lease for %s failed (%s); retrying", req.transfer_id, why)
            if time.monotonic() + wait >= deadline or self._closed.is_set():
                self._drop(job, f"no_lease: {why}")
                return None
            self._closed.wait(wait)

    def _release(self, job: SendJob) -> None:
        assert job.lease is not None
        self._leases.drop(job.lease.lease_id)
        ranks = sorted(job.reports, key=lambda r: r.rank)
        ok = len(ranks) == self.tp_size and all(r.ok for r in ranks)
        errors = "; ".join(f"rank {r.rank}: {r.error}" for r in ranks if r.error)
        outcome = TransferOutcome(
            lease_id=job.lease.lease_id, ok=ok, bytes=sum(r.bytes for r in ranks),
            seconds=max((r.seconds for r in ranks), default=0.0), error=errors[:2000] or None,
            ranks=[RankOutcome(rank=r.rank, path=r.path or "default", bytes=r.bytes, seconds=r.seconds, ok=r.ok)
                   for r in ranks],
        )
        for attempt in range(3):
            try:
                if not self.client.release_lease(job.lease.lease_id, outcome) and ok:
                    logger.warning("kvlane P %s: lease %s of transfer %s had already ended (expired) when its push "
                                   "finished: D may have stopped waiting for the KV", self.engine_id,
                                   job.lease.lease_id, job.params.transfer_id)
                return
            except Exception as exc:
                logger.warning("kvlane P: release of lease %s failed (%s)%s", job.lease.lease_id, exc,
                               "; retrying" if attempt < 2 else "; it will expire on its own")
                self._closed.wait(0.5 * (attempt + 1))

    # ------------------------------------------------------------------------------------ every step
    def build_connector_meta(self, scheduled_tokens: int = 1) -> KVLaneMetadata:
        """This step's orders to the workers; `scheduled_tokens` = the step's total (0: nothing to run)."""
        with self._lock:
            meta = KVLaneMetadata(self._to_arm, self._to_cancel, self._to_push, self._to_drop,
                                  idle=scheduled_tokens == 0)
            for a in self._to_arm:
                job = self._recv.get(a.req_id)
                if job is not None:
                    job.state = max(job.state, TransferState.ARMED)
            for p in self._to_push:
                send = self._send.get(p.req_id)
                if send is not None and send.state == TransferState.LEASED:
                    send.state = TransferState.TRANSFERRING
            self._to_arm, self._to_cancel, self._to_push, self._to_drop = [], [], [], []
        return meta

    def update_connector_output(self, out: Any) -> None:
        wm = getattr(out, "kv_connector_worker_meta", None)
        if isinstance(wm, KVLaneWorkerMeta):
            self._on_worker_meta(wm)
        for rid in out.finished_sending or ():
            with self._lock:
                job = self._send.get(rid)
                if job is not None and job.outcome_done:
                    del self._send[rid]

    def _on_worker_meta(self, wm: KVLaneWorkerMeta) -> None:
        for rid, n in wm.armed.items():
            job = self._recv.get(rid)
            if job is None:
                continue
            job.armed_ranks += n
            if job.armed_ranks == self.tp_size and not job.finished:
                self._pool.submit(self._announce, job)
        for rid, reports in wm.received.items():
            job = self._recv.get(rid)
            if job is None:
                continue
            job.reports.extend(reports)
            if len(job.reports) >= self.tp_size:
                ok = all(r.ok for r in job.reports)
                got = sum(r.bytes for r in job.reports)
                with self._lock:
                    job.state = TransferState.DONE if ok else TransferState.FAILED
                    if ok:
                        self._stats.data["recv_bytes"].append(got)
                        self._stats.data["recv_seconds"].append(max(r.seconds for r in job.reports))
                    else:
                        self._stats.count("failures", "recv_failed")
                    if job.finished:
                        del self._recv[rid]
                logger.info("kvlane D %s: transfer %s (request %s) %s: %d bytes in %d blocks, %.4fs%s",
                            self.engine_id, job.params.transfer_id, rid, "received" if ok else "FAILED", got,
                            len(job.dst_blocks), max(r.seconds for r in job.reports),
                            "" if ok else " — " + "; ".join(str(r.error) for r in job.reports if r.error))
        for rid, reports in wm.pushed.items():
            job = self._send.get(rid)
            if job is None:
                continue
            job.reports.extend(reports)
            if len(job.reports) < self.tp_size:
                continue
            ok = all(r.ok for r in job.reports)
            got = sum(r.bytes for r in job.reports)
            secs = max(r.seconds for r in job.reports)
            with self._lock:
                job.state = TransferState.DONE if ok else TransferState.FAILED
                job.outcome_done = True
                if ok:
                    self._stats.data["push_bytes"].append(got)
                    self._stats.data["push_seconds"].append(secs)
                else:
                    self._stats.count("failures", "push_failed")
                for r in job.reports:
                    self._stats.count("paths", r.path or "default")
            slowest = max(job.reports, key=lambda r: r.seconds)
            steps = ", ".join(f"{name} {1000 * sec:.1f} ms" for name, sec in slowest.phases)
            logger.info("kvlane P %s: transfer %s (request %s) to %s %s: pushed %d bytes (%d blocks) in %.4fs, "
                        "lease wait %.3fs, path %s%s%s", self.engine_id, job.params.transfer_id, rid,
                        job.params.decode, "ok" if ok else "FAILED", got, job.n_blocks, secs, job.lease_wait,
                        ",".join(r.path for r in sorted(job.reports, key=lambda r: r.rank)),
                        f" (rank {slowest.rank}: {steps})" if steps else "",
                        "" if ok else " — " + "; ".join(str(r.error) for r in job.reports if r.error))
            if job.lease is not None:
                self._pool.submit(self._release, job)

    def has_pending_push_work(self) -> bool:
        return bool(self._send) or bool(self._to_arm or self._to_cancel or self._to_push or self._to_drop)

    def holds_blocks(self) -> bool:
        """P holds finished prefills' blocks that a push or a deadline will free soon."""
        return bool(self._send)

    def stats(self) -> KVLaneStats | None:
        with self._lock:
            if self._stats.is_empty():
                return None
            out, self._stats = self._stats, KVLaneStats()
        return out

    def shutdown(self) -> None:
        self._closed.set()
        self._leases.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        try:
            self.client.close()
        except Exception:
            pass
