"""Worker side of the kvlane vLLM connector: one per vLLM worker process (one per TP rank).

Owns this rank's registered KV cache, its receive server (decode) and its push calls (prefill); carries
out the scheduler side's per-step orders and reports each transfer's end exactly once. Never decides
what to move or where, never blocks a model step on the network (pushes run on its own threads).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import msgpack
import torch
from vllm.logger import init_logger

from .blockwire import BlockServer, PagedLayers, PushResult, RecvResult, WireError, push_blocks
from .meta import KVLaneMetadata, KVLaneWorkerMeta, PushOrder, RankReport
from .params import ConnectorConfig

logger = init_logger("vllm.kvlane.connector")

DESCRIPTOR_VERSION = 1


def encode_descriptor(engine_id: str, tp_size: int, d: dict[str, Any]) -> bytes:
    return msgpack.packb({"v": DESCRIPTOR_VERSION, "engine_id": engine_id, "tp_size": tp_size, **d},
                         use_bin_type=True)


def decode_descriptor(data: bytes, rank: int) -> dict[str, Any]:
    """A rank descriptor as registered by `WorkerSide`; ValueError naming the problem otherwise."""
    if not isinstance(data, bytes) or len(data) > 64 * 1024:
        raise ValueError(f"rank {rank} descriptor must be at most 64 KiB of bytes")
    try:
        d = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:
        raise ValueError(f"rank {rank} descriptor is not msgpack ({exc.__class__.__name__})") from None
    if not isinstance(d, dict) or d.get("v") != DESCRIPTOR_VERSION:
        raise ValueError(f"rank {rank} descriptor: not a kvlane v{DESCRIPTOR_VERSION} descriptor")
    for key, typ in (("host", str), ("port", int), ("rank", int), ("fingerprint", str), ("tp_size", int)):
        if not isinstance(d.get(key), typ):
            raise ValueError(f"rank {rank} descriptor: field {key!r} missing or not {typ.__name__}")
    if d["rank"] != rank:
        raise ValueError(f"descriptor registered as rank {rank} says rank {d['rank']}")
    return d


class BlockwirePath:
    """Data path over `blockwire` (kvlane's own TCP block mover): the default, and the only one that
    supports `fault_injection.corrupt_kv`."""

    def __init__(self, cfg: ConnectorConfig, rank: int, tp_size: int, layers: PagedLayers, receive: bool):
        self.cfg, self.rank, self.tp_size, self.layers = cfg, rank, tp_size, layers
        self.server = BlockServer(layers, rank, cfg.kv_host) if receive else None

    def descriptor(self) -> bytes:
        assert self.server is not None
        return encode_descriptor(self.cfg.engine_id, self.tp_size, self.server.descriptor())

    def endpoint(self) -> str:
        return f"{self.server.host}:{self.server.port}" if self.server else "-"

    def arm(self, tid: str, dst: list[int], deadline: float) -> None:
        assert self.server is not None
        self.server.arm(tid, dst, deadline)

    def cancel(self, tid: str, reason: str) -> None:
        if self.server is not None:
            self.server.cancel(tid, reason)

    def poll(self, now: float) -> list[RecvResult]:
        return self.server.poll(now) if self.server is not None else []

    def push(self, p: PushOrder, path: str) -> PushResult:
        try:
            peer = decode_descriptor(p.peers[self.rank], self.rank)
        except ValueError as exc:
            return PushResult(False, 0, 0.0, f"bad descriptor: {exc}")
        if peer["tp_size"] != self.tp_size:
            return PushResult(False, 0, 0.0, f"D runs TP={peer['tp_size']}, P runs TP={self.tp_size}")
        return push_blocks(self.layers, peer, self.rank, p.transfer_id, p.src_blocks, p.dst_blocks, p.deadline,
                           self.cfg.fault_injection.corrupt_kv)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


class TransportPath:
    """Data path over `kvlane.transport.KVTransport` ("tcp" or "ucx" backend). Same TP: whole blocks of every
    layer region, rank i -> rank i. Heterogeneous TP (`peer_tp`): each (P rank, D rank) route of
    `transport.ranks.head_routes` moves its head slice of every block under its own transfer id."""

    def __init__(self, cfg: ConnectorConfig, rank: int, tp_size: int, layers: PagedLayers,
                 tensors: list[torch.Tensor]):
        from kvlane.transport import BlockShape, HeteroTP, KVTransport, TransportConfig, head_routes

        self.rank = rank
        t0 = tensors[0]
        self.shape = BlockShape(kv_heads=t0.shape[1], block_size=t0.shape[2], head_size=t0.shape[3] // 2,
                                itemsize=t0.element_size())
        if self.shape.block_bytes != layers.block_layer_bytes:
            raise WireError(f"block shape {tuple(t0.shape[1:])} is not [kv_heads, block_size, 2*head_size]")
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
        self.t = KVTransport(cfg.engine_id, rank, TransportConfig(backend=cfg.transport, host=cfg.kv_host,
                                                                   tp_size=tp_size, hetero_tp=hetero))
        tag = layers.fingerprint
        if hetero is not None:  # both sides describe the whole model's heads, not their own share
            tag = tag.replace(f"block_shape={self.shape.kv_heads}x", f"block_shape={hetero.total_kv_heads}heads:", 1)
        self.t.register_regions(tensors, layout_tag=tag)
        self.n_regions = len(tensors)
        self._lock = threading.Lock()
        self._expects: dict[str, tuple[list[Future[Any]], str | None]] = {}
        self._peers: dict[bytes, Any] = {}

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

        remaining = max(0.05, deadline - time.monotonic())
        if not self.routes:
            futs = [self.t.expect(tid, self._copies(dst, dst), remaining)]
        else:
            futs = [self.t.expect(route_transfer_id(tid, r), self._copies(dst, dst, r), remaining)
                    for r in self.routes if r.d_rank == self.rank]
        with self._lock:
            self._expects[tid] = (futs, None)

    def cancel(self, tid: str, reason: str) -> None:
        # KVTransport has no cancel: the receive stays armed (its blocks held) until it lands or expires.
        with self._lock:
            if tid in self._expects:
                self._expects[tid] = (self._expects[tid][0], reason)

    def poll(self, now: float) -> list[RecvResult]:
        out = []
        with self._lock:
            for tid, (futs, cancelled) in list(self._expects.items()):
                if not all(f.done() for f in futs):
                    continue
                del self._expects[tid]
                try:
                    rs = [f.result() for f in futs]
                    errors = "; ".join(r.error for r in rs if r.error) or cancelled
                    out.append(RecvResult(tid, all(r.ok for r in rs) and cancelled is None, sum(r.bytes for r in rs),
                                          max(r.seconds for r in rs), errors))
                except Exception as exc:
                    out.append(RecvResult(tid, False, error=f"{exc.__class__.__name__}: {exc}"))
        return out

    def _push_one(self, key: bytes, tid: str, path: str, copies: list[Any], deadline: float) -> PushResult:
        t0 = time.monotonic()
        try:
            peer = self._peers.get(key)
            if peer is None:
                peer = self._peers[key] = self.t.connect(key)
            use = path if path in peer.links else next(iter(peer.links))
            remaining = max(0.05, deadline - time.monotonic())
            r = self.t.push(peer, tid, use, copies, remaining).result(remaining + 10.0)
            if not r.ok:
                self._peers.pop(key, None)
            return PushResult(r.ok, r.bytes, r.seconds, r.error)
        except Exception as exc:
            self._peers.pop(key, None)
            return PushResult(False, 0, time.monotonic() - t0, f"{exc.__class__.__name__}: {exc}")

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
        return PushResult(all(r.ok for r in results), sum(r.bytes for r in results),
                          max((r.seconds for r in results), default=0.0), errors)

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
        self.path: BlockwirePath | TransportPath | None = None
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

    # -- setup ------------------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.layers = PagedLayers(kv_caches, self.block_size)
        logger.info("kvlane rank %d: %d layers, %d blocks, %d bytes/block/rank, layout %s",
                    self.rank, len(self.layers.flat), self.layers.num_blocks, self.layers.block_bytes,
                    self.layers.fingerprint)
        receive = self.cfg.role == "decode"
        if self.cfg.transport == "blockwire":
            self.path = BlockwirePath(self.cfg, self.rank, self.tp_size, self.layers, receive)
        else:
            self.path = TransportPath(self.cfg, self.rank, self.tp_size, self.layers,
                                      [kv_caches[n] for n in self.layers.names])
        if receive:
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
        if self.path is None or self.rank >= len(p.peers):
            fut: Future[PushResult] = Future()
            fut.set_result(PushResult(False, 0, 0.0, f"no peer descriptor for rank {self.rank}"))
        else:
            fut = self._pool.submit(self.path.push, p, path)
        self._pushes[p.req_id] = (fut, path)

    def transfer_results(self) -> tuple[set[str], set[str]]:
        """(finished_sending, finished_recving) since the last call; each request reported once."""
        if self.path is not None:
            for r in self.path.poll(time.monotonic()):
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
                    RankReport(self.rank, res.ok, res.bytes, res.seconds, path, res.error))
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
