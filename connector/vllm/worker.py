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

from .blockwire import BlockServer, PagedLayers, PushResult, WireError, push_blocks
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


class WorkerSide:
    def __init__(self, vllm_config: Any, cfg: ConnectorConfig):
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        self.cfg = cfg
        self.rank = get_tensor_model_parallel_rank()
        self.tp_size = vllm_config.parallel_config.tensor_parallel_size
        self.block_size = vllm_config.cache_config.block_size
        self.layers: PagedLayers | None = None
        self.server: BlockServer | None = None
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

    # -- setup ------------------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.layers = PagedLayers(kv_caches, self.block_size)
        logger.info("kvlane rank %d: %d layers, %d blocks, %d bytes/block/rank, layout %s",
                    self.rank, len(self.layers.flat), self.layers.num_blocks, self.layers.block_bytes,
                    self.layers.fingerprint)
        if self.cfg.role == "decode":
            self.server = BlockServer(self.layers, self.rank, self.cfg.kv_host)
            desc = encode_descriptor(self.cfg.engine_id, self.tp_size, self.server.descriptor())
            self._registrar = threading.Thread(target=self._register, args=(desc,), daemon=True,
                                               name=f"kvlane-register-rank-{self.rank}")
            self._registrar.start()

    def _register(self, desc: bytes) -> None:
        """Publish this rank's descriptor; retried until it lands (the policy service may start later)."""
        from kvlane.integration.policy_service.client import SyncPolicyClient

        delay = 0.5
        client = SyncPolicyClient(self.cfg.policy, timeout=self.cfg.rpc_timeout_s)
        try:
            while not self._closed.is_set():
                try:
                    client.register_rank(self.cfg.engine_id, self.rank, desc)
                    logger.info("kvlane rank %d: registered receive endpoint %s:%d with %s", self.rank,
                                self.server.host if self.server else "?", self.server.port if self.server else 0,
                                self.cfg.policy)
                    return
                except Exception as exc:
                    logger.warning("kvlane rank %d: register_rank failed (%s); retrying in %.1fs",
                                   self.rank, exc, delay)
                    self._closed.wait(delay)
                    delay = min(delay * 2, 10.0)
        finally:
            client.close()

    # -- per step ---------------------------------------------------------------------------------------
    def start_load_kv(self, meta: KVLaneMetadata) -> None:
        now = time.monotonic()
        for a in meta.arm:
            if self.server is None or self.layers is None:
                logger.error("kvlane rank %d: asked to receive %s but this engine is not a decode engine",
                             self.rank, a.transfer_id)
                self._fail_recv(a.req_id, a.dst_blocks, "not a decode engine")
                continue
            try:
                self.server.arm(a.transfer_id, a.dst_blocks, a.deadline)
            except WireError as exc:
                self._fail_recv(a.req_id, a.dst_blocks, str(exc))
                continue
            self._recv_req[a.transfer_id] = (a.req_id, a.dst_blocks)
            self._report.armed[a.req_id] = self._report.armed.get(a.req_id, 0) + 1
        for req_id, reason in meta.cancel:
            if self.server is None:
                continue
            for tid, (rid, _) in self._recv_req.items():
                if rid == req_id:
                    self.server.cancel(tid, reason)
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
        if self.layers is None or self.rank >= len(p.peers):
            fut: Future[PushResult] = Future()
            fut.set_result(PushResult(False, 0, 0.0, f"no peer descriptor for rank {self.rank}"))
        else:
            fut = self._pool.submit(
                push_blocks, self.layers, p.peers[self.rank], self.rank, p.transfer_id, p.src_blocks,
                p.dst_blocks, p.deadline, self.cfg.fault_injection.corrupt_kv,
            )
        self._pushes[p.req_id] = (fut, path)

    def transfer_results(self) -> tuple[set[str], set[str]]:
        """(finished_sending, finished_recving) since the last call; each request reported once."""
        if self.server is not None:
            for r in self.server.poll(time.monotonic()):
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
        if self.server is not None:
            self.server.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
