"""Worker side of the kvlane vLLM connector: one per vLLM worker process (one per TP rank).

Owns this rank's registered KV cache, its receive server (decode) and its push calls (prefill); carries
out the scheduler side's per-step orders and reports each transfer's end exactly once. Never decides
what to move or where, never blocks a model step on the network (pushes run on its own threads).
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from vllm.logger import init_logger

from .layers import KVLayoutError, PagedLayers, PushResult, RecvResult
from .meta import KVLaneMetadata, KVLaneWorkerMeta, PushOrder, RankReport
from .params import ConnectorConfig

logger = init_logger("vllm.kvlane.connector")


def _transport_cpus() -> frozenset[int] | None:
    """CPUs for the transport's threads when vLLM pinned this worker's thread to fewer than the machine has
    (VLLM_CPU_OMP_THREADS_BIND: one core per TP rank), else None (inherit). Pinned, the transport's threads
    (event loop, ucxx progress and notifier threads) share that one core with the worker, which spins on
    vLLM's shared-memory queue, and with the other engine's rank pinned there too: every UCX handshake of
    P and D at TP=2 on 2 cores timed out (docs/connector.md, "Transport threads")."""
    machine = frozenset(range(os.cpu_count() or 1))  # the kernel drops CPUs outside this process's cpuset
    return machine if os.sched_getaffinity(0) != machine else None


class TransportPath:
    """This rank's data path: a `kvlane.transport.KVTransport` (backend "ucx", or "tcp" where ucxx is absent)
    over the registered KV cache, one transport path per name the policy's leases use. Same TP: whole blocks
    of every layer, rank i -> rank i. Heterogeneous TP (`peer_tp`): each (P rank, D rank) route of
    `transport.ranks.head_routes` moves its head slice of every block under its own transfer id."""

    def __init__(self, cfg: ConnectorConfig, rank: int, tp_size: int, layers: PagedLayers,
                 wake: threading.Event):
        from kvlane.transport import BlockShape, HeteroTP, KVTransport, TransportConfig, head_routes

        self.cfg, self.rank, self.layers, self._wake = cfg, rank, layers, wake
        t0 = layers.tensors[0]
        self.shape = BlockShape(kv_heads=t0.shape[1], block_size=t0.shape[2], head_size=t0.shape[3] // 2,
                                itemsize=t0.element_size())
        if self.shape.block_bytes != layers.block_layer_bytes:
            raise KVLayoutError(f"block shape {tuple(t0.shape[1:])} is not [kv_heads, block_size, 2*head_size]")
        hetero = None
        self.routes: list[Any] = []
        self.p_shape = self.d_shape = self.shape
        if cfg.peer_tp is not None and cfg.peer_tp != tp_size:
            total = self.shape.kv_heads * tp_size
            p_tp, d_tp = (tp_size, cfg.peer_tp) if cfg.role == "prefill" else (cfg.peer_tp, tp_size)
            hetero = HeteroTP(p_tp=p_tp, d_tp=d_tp, total_kv_heads=total)
            self.routes = head_routes(p_tp, d_tp, total)
            peer = BlockShape(kv_heads=total // cfg.peer_tp, block_size=self.shape.block_size,
                              head_size=self.shape.head_size, itemsize=self.shape.itemsize)
            self.p_shape, self.d_shape = (self.shape, peer) if cfg.role == "prefill" else (peer, self.shape)
        tcfg: dict[str, Any] = {"backend": cfg.transport, "host": cfg.kv_host, "tp_size": tp_size,
                                "hetero_tp": hetero}
        if cfg.paths is not None:
            tcfg["paths"] = cfg.paths
        cpus = _transport_cpus()
        if cpus is not None:
            tcfg["thread_cpus"] = cpus
            logger.info("kvlane rank %d: transport threads may run on CPUs %s (this worker thread: %s)", rank,
                        sorted(cpus), sorted(os.sched_getaffinity(0)))
        self.t = KVTransport(cfg.engine_id, rank, TransportConfig(**tcfg))
        tag = layers.fingerprint
        if hetero is not None:  # both sides describe the whole model's heads, not their own share
            tag = tag.replace(f"block_shape={self.shape.kv_heads}x", f"block_shape={hetero.total_kv_heads}heads:", 1)
        self.t.register_regions(layers.tensors, layout_tag=tag)
        self.n_regions = len(layers.tensors)
        self._lock = threading.Lock()
        # transfer id -> (per-route receive futures, destination blocks, cancel reason)
        self._expects: dict[str, tuple[list[Future[Any]], list[int], str | None]] = {}
        self._peers: dict[tuple[bytes, str], Any] = {}  # (descriptor, path) -> connected peer
        self._connecting: dict[tuple[bytes, str], threading.Lock] = {}  # one handshake per peer and path at a time
        self._warned_paths: set[str] = set()

    def descriptor(self) -> bytes:
        return self.t.descriptor()

    def endpoint(self) -> str:
        return self.t.key

    def _copies(self, src: list[int], dst: list[int], route: Any = None) -> list[Any]:
        from kvlane.transport import block_copies

        if route is None:
            return [c for i in range(self.n_regions) for c in block_copies(i, src, dst, self.shape)]
        return [c for i in range(self.n_regions)
                for c in block_copies(i, src, dst, self.p_shape, self.d_shape, route)]

    def arm(self, tid: str, dst: list[int], deadline: float) -> None:
        from kvlane.transport.ranks import route_transfer_id

        self.layers.check_blocks(dst)
        remaining = max(0.05, deadline - time.monotonic())
        if not self.routes:
            futs = [self.t.expect(tid, self._copies(dst, dst), remaining)]
        else:
            futs = [self.t.expect(route_transfer_id(tid, r), self._copies(dst, dst, r), remaining)
                    for r in self.routes if r.d_rank == self.rank]
        for f in futs:
            f.add_done_callback(lambda _f: self._wake.set())
        with self._lock:
            self._expects[tid] = (futs, list(dst), None)

    def cancel(self, tid: str, reason: str) -> None:
        """Withdraw a receive: the transport keeps bytes still in flight out of the blocks and resolves the
        receive as failed; it is reported (with `reason`) once every route has resolved."""
        from kvlane.transport.ranks import route_transfer_id

        with self._lock:
            if tid not in self._expects:
                return
            futs, dst, _ = self._expects[tid]
            self._expects[tid] = (futs, dst, reason)
        for r in self.routes or [None]:
            if r is None or r.d_rank == self.rank:
                self.t.cancel(tid if r is None else route_transfer_id(tid, r))

    def poll(self) -> list[RecvResult]:
        out = []
        with self._lock:
            for tid, (futs, dst, cancelled) in list(self._expects.items()):
                if not all(f.done() for f in futs):
                    continue
                del self._expects[tid]
                try:
                    rs = [f.result() for f in futs]
                except Exception as exc:
                    out.append(RecvResult(tid, False, error=f"{exc.__class__.__name__}: {exc}"))
                    continue
                ok = all(r.ok for r in rs) and cancelled is None
                if ok and self.cfg.fault_injection.corrupt_kv:
                    self.layers.corrupt(dst)
                    logger.warning("kvlane rank %d: fault_injection.corrupt_kv flipped the %d blocks of %s",
                                   self.rank, len(dst), tid)
                errors = cancelled or "; ".join(r.error for r in rs if r.error) or None
                out.append(RecvResult(tid, ok, sum(r.bytes for r in rs), max(r.seconds for r in rs), errors))
        return out

    def ready(self) -> bool:
        """Whether `poll` has a result to report."""
        with self._lock:
            return any(all(f.done() for f in futs) for futs, _, _ in self._expects.values())

    def _path(self, granted: str) -> str:
        """The transport path for the path a lease granted: the same name, else the first configured path
        (logged once per name: the topology's path names should be configured in extra_config.paths)."""
        paths = list(self.t.config.paths)
        if granted in paths:
            return granted
        if granted not in self._warned_paths:
            self._warned_paths.add(granted)
            logger.warning("kvlane rank %d: the lease grants path %r but this transport has paths %s; using %r "
                           "(set extra_config.paths to name the topology's paths)", self.rank, granted, paths,
                           paths[0])
        return paths[0]

    def _peer(self, key: bytes, path: str, deadline: float) -> Any:
        """The peer of descriptor `key`, connected on `path` only (a handshake per path actually used, when a
        lease first grants it). Concurrent pushes to a new peer share one handshake (four at once to one D
        timed out under load where one succeeds); a handshake that times out is tried again, on a fresh
        endpoint, for as long as the push deadline leaves room for a whole attempt (`KVTransport.connect`; the
        scheduler side renews the lease meanwhile; docs/connector.md, "Handshakes")."""
        with self._lock:
            lock = self._connecting.setdefault((key, path), threading.Lock())
        with lock:
            peer = self._peers.get((key, path))
            if peer is not None:
                return peer
            peer = self.t.connect(key, paths=[path], deadline=deadline)
            self._peers[(key, path)] = peer
            return peer

    def _push_one(self, key: bytes, tid: str, granted: str, copies: list[Any], deadline: float) -> PushResult:
        t0 = time.monotonic()
        use = self._path(granted)
        try:
            peer = self._peer(key, use, deadline)
            remaining = max(0.05, deadline - time.monotonic())
            # A failed push keeps the peer: the transport reopens a link that broke on the next push, and a
            # fresh handshake here would make D replace (close) the link other pushes are still using — one
            # failure then failed every transfer in flight to that D (load test, session 3).
            r = self.t.push(peer, tid, use, copies, remaining).result(remaining + 10.0)
            return PushResult(r.ok, r.bytes, r.seconds, r.error, use, r.phases)
        except Exception as exc:
            return PushResult(False, 0, time.monotonic() - t0, f"{exc.__class__.__name__}: {exc}", use)

    def missing_peers(self, p: PushOrder) -> list[int]:
        """The D ranks this rank pushes to (rank i, or its head routes' D ranks) without a descriptor in `p`."""
        targets = [r.d_rank for r in self.routes if r.p_rank == self.rank] if self.routes else [self.rank]
        return [d for d in targets if d >= len(p.peers)]

    def push(self, p: PushOrder, path: str) -> PushResult:
        from kvlane.transport.ranks import route_transfer_id

        if not self.routes:
            return self._push_one(p.peers[self.rank], p.transfer_id, path,
                                  self._copies(p.src_blocks, p.dst_blocks), p.deadline)
        results = [
            self._push_one(p.peers[r.d_rank], route_transfer_id(p.transfer_id, r), path,
                           self._copies(p.src_blocks, p.dst_blocks, r), p.deadline)
            for r in self.routes if r.p_rank == self.rank
        ]
        errors = "; ".join(r.error for r in results if r.error) or None
        slowest = max(results, key=lambda r: r.seconds, default=None)
        return PushResult(all(r.ok for r in results), sum(r.bytes for r in results),
                          slowest.seconds if slowest else 0.0, errors, results[0].path if results else None,
                          slowest.phases if slowest else ())

    def close(self) -> None:
        self.t.close()


class WorkerSide:
    def __init__(self, vllm_config: Any, cfg: ConnectorConfig):
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        self.cfg = cfg
        self.rank = get_tensor_model_parallel_rank()
        self.tp_size = vllm_config.parallel_config.tensor_parallel_size
        self.block_size = vllm_config.cache_config.block_size
        self.layers: PagedLayers | None = None
        self.path: TransportPath | None = None
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"kvlane-push-{self.rank}")
        self._lock = threading.Lock()
        self._pushes: dict[str, tuple[Future[PushResult], str]] = {}
        self._recv_req: dict[str, tuple[str, list[int]]] = {}  # transfer_id -> (req_id, dst_blocks)
        self._finished_send: set[str] = set()
        self._finished_recv: set[str] = set()
        self._load_errors: set[int] = set()
        self._report = KVLaneWorkerMeta()
        self._registrar: threading.Thread | None = None
        self._closed = threading.Event()
        self._policy_client: Any = None  # SyncPolicyClient kept open: it re-registers after a service restart
        # Set by every transfer completion; an idle step (nothing scheduled, see `transfer_results`) waits on it.
        self._wake = threading.Event()
        self._idle_step = False
        # Chaos testing: $KVLANE_FAULTS (the policy service's fault plan format); P consults `fail_transfer`.
        from kvlane.integration.policy_service.app import load_fault_plan

        self._faults = load_fault_plan()
        if self._faults is not None:
            logger.warning("kvlane rank %d: FAULT INJECTION ON (chaos testing only): %s", self.rank,
                           self._faults.model_dump_json(exclude_defaults=True))

    # -- setup ------------------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.layers = PagedLayers(kv_caches, self.block_size)
        logger.info("kvlane rank %d: %d layers, %d blocks, %d bytes/block/rank, layout %s",
                    self.rank, len(self.layers.tensors), self.layers.num_blocks, self.layers.block_bytes,
                    self.layers.fingerprint)
        self.path = TransportPath(self.cfg, self.rank, self.tp_size, self.layers, self._wake)
        if self.cfg.role == "decode":
            desc = self.path.descriptor()
            self._registrar = threading.Thread(target=self._register, args=(desc,), daemon=True,
                                               name=f"kvlane-register-rank-{self.rank}")
            self._registrar.start()

    def _register(self, desc: bytes) -> None:
        """Publish this rank's descriptor; retried until it lands (the policy service may start later).
        The client stays open afterwards: after a policy-service restart it re-registers the descriptor."""
        from kvlane.integration.policy_service.client import SyncPolicyClient

        delay = 0.5
        client = SyncPolicyClient(self.cfg.policy, timeout=self.cfg.rpc_timeout_s)
        while not self._closed.is_set():
            try:
                client.register_rank(self.cfg.engine_id, self.rank, desc)
                logger.info("kvlane rank %d: registered receive endpoint %s (%s) with %s", self.rank,
                            self.path.endpoint() if self.path else "?", self.cfg.transport, self.cfg.policy)
                self._policy_client = client
                if self._closed.is_set():  # shut down while registering
                    client.close()
                return
            except Exception as exc:
                logger.warning("kvlane rank %d: register_rank failed (%s); retrying in %.1fs",
                               self.rank, exc, delay)
                self._closed.wait(delay)
                delay = min(delay * 2, 10.0)
        client.close()

    # -- per step ---------------------------------------------------------------------------------------
    def start_load_kv(self, meta: KVLaneMetadata) -> None:
        now = time.monotonic()
        self._idle_step = meta.idle
        for a in meta.arm:
            if self.path is None or self.cfg.role != "decode":
                logger.error("kvlane rank %d: asked to receive %s but this engine is not a decode engine",
                             self.rank, a.transfer_id)
                self._fail_recv(a.req_id, a.dst_blocks, "not a decode engine")
                continue
            try:
                self.path.arm(a.transfer_id, a.dst_blocks, a.deadline)
            except Exception as exc:
                self._fail_recv(a.req_id, a.dst_blocks, str(exc))
                continue
            self._recv_req[a.transfer_id] = (a.req_id, a.dst_blocks)
            self._report.armed[a.req_id] = self._report.armed.get(a.req_id, 0) + 1
        for req_id, reason in meta.cancel:
            if self.path is None:
                continue
            for tid, (rid, _) in self._recv_req.items():
                if rid == req_id:
                    self.path.cancel(tid, reason)
        for p in meta.push:
            self._start_push(p, now)
        for req_id in meta.drop:
            self._finished_send.add(req_id)

    def _fail_recv(self, req_id: str, blocks: list[int], why: str) -> None:
        self._finished_recv.add(req_id)
        self._load_errors.update(blocks)
        self._report.received.setdefault(req_id, []).append(RankReport(self.rank, False, 0, 0.0, error=why))

    def _start_push(self, p: PushOrder, now: float) -> None:
        path = p.paths[self.rank] if self.rank < len(p.paths) else "default"
        failed = None
        if self.path is None:
            failed = "no transport: this worker registered no KV caches"
        elif missing := self.path.missing_peers(p):
            failed = f"no peer descriptor for D rank(s) {missing} (the push order carries {len(p.peers)})"
        elif self._faults is not None and self._faults.should("fail_transfer", p.transfer_id):
            failed = "fault injection: fail_transfer (nothing pushed)"
        if failed is not None:
            fut: Future[PushResult] = Future()
            fut.set_result(PushResult(False, 0, 0.0, failed))
        else:
            fut = self._pool.submit(self.path.push, p, path)
            fut.add_done_callback(lambda _f: self._wake.set())
        self._pushes[p.req_id] = (fut, path)

    def _idle_wait(self) -> None:
        """On a step with nothing scheduled (the engine only steps then because it waits for KV or holds
        blocks for a push), sleep up to `idle_wait_ms` unless a transfer ends first. vLLM's workers otherwise
        spin on its shared-memory queue between such steps, hundreds of times a second; on a CPU host that
        spinning starved the other engine's TP workers pinned to the same cores for minutes (TP=2 P and D
        on 2 cores). A completion wakes the wait at once, so arrivals are not delayed; a new order from the
        scheduler may be (by at most `idle_wait_ms`)."""
        if not self._idle_step or self.cfg.idle_wait_ms <= 0:
            return
        self._wake.clear()
        if any(f.done() for f, _ in self._pushes.values()) or (self.path is not None and self.path.ready()):
            return
        self._wake.wait(self.cfg.idle_wait_ms / 1000.0)

    def transfer_results(self) -> tuple[set[str], set[str]]:
        """(finished_sending, finished_recving) since the last call; each request reported once."""
        self._idle_wait()
        if self.path is not None:
            for r in self.path.poll():
                req_id, blocks = self._recv_req.pop(r.transfer_id, (None, []))
                if req_id is None:
                    continue
                self._finished_recv.add(req_id)
                if not r.ok:
                    # Blocks that never got their KV: vLLM applies kv_load_failure_policy (recompute|fail).
                    self._load_errors.update(blocks)
                    logger.warning("kvlane rank %d: receive of %s (%s) failed: %s", self.rank, r.transfer_id,
                                   req_id, r.error)
                self._report.received.setdefault(req_id, []).append(
                    RankReport(self.rank, r.ok, r.bytes, r.seconds, error=r.error))
        for req_id, (fut, path) in list(self._pushes.items()):
            if fut.done():
                del self._pushes[req_id]
                res = fut.result()
                self._finished_send.add(req_id)
                self._report.pushed.setdefault(req_id, []).append(
                    RankReport(self.rank, res.ok, res.bytes, res.seconds, res.path or path, res.error, res.phases))
        sending, self._finished_send = self._finished_send, set()
        recving, self._finished_recv = self._finished_recv, set()
        return sending, recving

    def load_errors(self) -> set[int]:
        out, self._load_errors = self._load_errors, set()
        return out

    def worker_meta(self) -> KVLaneWorkerMeta | None:
        if self._report.empty():
            return None
        out, self._report = self._report, KVLaneWorkerMeta()
        return out

    def shutdown(self) -> None:
        self._closed.set()
        if self._policy_client is not None:
            self._policy_client.close()
        if self.path is not None:
            self.path.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
