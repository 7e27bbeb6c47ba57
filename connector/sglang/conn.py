"""kvlane as an SGLang PD transfer backend: KVManager / KVSender / KVReceiver on SGLang's base classes.

Runs inside every SGLang scheduler process (one per TP rank; prefill and decode engines alike). Decode
announces its pre-allocated pages on the policy service's board; prefill waits for that announce, takes a
credit lease (TP rank 0 for the group), pushes rank i -> rank i with `kvlane.transport`, and releases the
lease with the measured outcome. Every wait has a deadline; no method SGLang's scheduler calls touches the
network (background threads do), and nothing here decides pairs or paths (the policy does).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
from kvlane.policy.types import (
    ENGINE_KIND,
    EngineInfo,
    LeaseDenied,
    LeaseGrant,
    LeaseRequest,
    RankOutcome,
    Role,
    TransferOutcome,
)
from kvlane.transport import BlockCopy, KVTransport, PeerHandle, TransferResult, TransportConfig
from sglang.srt.disaggregation.base.conn import (
    BaseKVBootstrapServer,
    BaseKVManager,
    BaseKVReceiver,
    BaseKVSender,
    KVArgs,
    KVPoll,
    KVTransferMetric,
)

from .bootstrap import BootstrapServerThread
from .config import SGLangBackendConfig
from .wire import (
    decode_announce,
    encode_announce,
    engine_id_for,
    lease_key,
    outcome_key,
    rank_key,
    transfer_id_for_room,
)

log = logging.getLogger("kvlane.sglang")

_TERMINAL = (KVPoll.Failed, KVPoll.Success)


class KVLaneTransferError(Exception):
    """What `failure_exception()` raises; SGLang reads `failure_reason` and `is_from_another_rank`."""

    def __init__(self, bootstrap_room: int, failure_reason: str, is_from_another_rank: bool = False):
        super().__init__(failure_reason)
        self.bootstrap_room = bootstrap_room
        self.failure_reason = failure_reason
        self.is_from_another_rank = is_from_another_rank


class _RawKV:
    """A byte view of one of SGLang's KV/aux buffers (raw pointer + length), `item_len` bytes per row,
    through the array interface `kvlane.transport` registers (host) or the CUDA one (device)."""

    def __init__(self, ptr: int, nbytes: int, item_len: int, host: bool):
        if item_len <= 0 or nbytes <= 0 or nbytes % item_len:
            raise ValueError(f"buffer of {nbytes} bytes is not a whole number of {item_len}-byte items")
        iface = {"data": (int(ptr), False), "shape": (nbytes // item_len, item_len), "typestr": "|u1",
                 "strides": None, "version": 3}
        if host:
            self.__array_interface__ = iface
        else:
            self.__cuda_array_interface__ = iface


@dataclasses.dataclass(frozen=True)
class PrefillInfo:
    """What decode learns from a prefill's bootstrap server (the decode scheduler reads dp_size and
    follow_bootstrap_room; `error` fails every receiver of that prefill with a clear reason)."""

    engine_id: str
    tp_size: int
    page_size: int
    dp_size: int = 1
    follow_bootstrap_room: bool = True
    error: str | None = None


def _mode(m: Any) -> str:
    v = str(getattr(m, "value", m)).lower()
    if v not in ("prefill", "decode"):
        raise ValueError(f"kvlane transfer backend runs on prefill or decode engines, not {v!r}")
    return v


class KVLaneKVManager(BaseKVManager):
    """One per scheduler process (TP rank): the rank's registered KV memory, transport, policy client."""

    def __init__(self, args: KVArgs, disaggregation_mode: Any, server_args: Any,
                 is_mla_backend: bool | None = False, *, config: SGLangBackendConfig | None = None,
                 client: Any = None, **_backend_specific: Any):
        from kvlane.integration.policy_service.client import SyncPolicyClient
        from kvlane.integration.policy_service.leases import LeaseKeeper

        self.kv_args = args
        self.role = _mode(disaggregation_mode)
        self.server_args = server_args
        self.is_mla_backend = bool(is_mla_backend)
        self.cfg = config or SGLangBackendConfig.from_env()
        self.rank = int(args.engine_rank)
        self.tp_size = int(getattr(server_args, "tp_size", 1) or 1)
        if not 0 <= self.rank < self.tp_size:
            raise ValueError(f"engine_rank {self.rank} outside tp_size {self.tp_size}")
        for name in ("state_data_ptrs", "host_kv_data_ptrs"):
            if any(getattr(args, name, None) or []):
                raise NotImplementedError(f"kvlane SGLang backend does not move {name} (hybrid/SWA/mamba state or "
                                          "host-pool KV) yet; use mooncake or nixl for such models")
        if getattr(server_args, "pp_size", 1) not in (None, 1):
            raise NotImplementedError("kvlane SGLang backend supports pipeline parallel size 1 only")
        if getattr(server_args, "enable_dp_attention", False):
            raise NotImplementedError("kvlane SGLang backend does not support DP attention yet (rank i -> rank i "
                                      "of one TP group only)")
        self.page_size = int(args.page_size)
        self.kv_item_lens = [int(x) for x in args.kv_item_lens]
        self.aux_item_lens = [int(x) for x in (getattr(args, "aux_item_lens", None) or [])]
        if not self.kv_item_lens:
            raise ValueError("KVArgs has no KV buffers")
        self.engine_id = self.cfg.engine_id or engine_id_for(self.role, server_args)
        self.gpus = self.cfg.gpu_ids(self.tp_size)
        host = str(getattr(server_args, "device", "cpu") or "cpu").startswith("cpu")
        ptrs = list(args.kv_data_ptrs) + list(getattr(args, "aux_data_ptrs", None) or [])
        lens = list(args.kv_data_lens) + list(getattr(args, "aux_data_lens", None) or [])
        items = self.kv_item_lens + self.aux_item_lens
        self.transport = KVTransport(self.engine_id, self.rank, TransportConfig(
            backend=self.cfg.transport, host=self.cfg.kv_host, tp_size=self.tp_size,
            connect_timeout_s=min(10.0, self.cfg.push_timeout_s)))
        try:
            self.transport.register_regions([_RawKV(p, n, i, host) for p, n, i in zip(ptrs, lens, items, strict=True)],
                                            layout_tag=f"sglang/{getattr(args, 'kv_cache_dtype_str', '')}/"
                                                       f"page{self.page_size}")
            self.client = client or SyncPolicyClient(self.cfg.policy, timeout=self.cfg.rpc_timeout_s)
            # rank 0 renews the group's lease until the outcomes are in (handshakes, push, other ranks)
            self.leases = LeaseKeeper(self.client)
        except BaseException:
            self.transport.close()
            raise
        # one thread per request waiting for decode's announce (a long poll): size for the bootstrap queue
        self._pool = ThreadPoolExecutor(max_workers=128, thread_name_prefix=f"kvlane-sgl-{self.rank}")
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._peers: dict[str, PeerHandle] = {}
        self._connect_lock = threading.Lock()
        self.prefill_info_table: dict[str, PrefillInfo] = {}
        if self.rank == 0:
            self.submit(self._register_engine)
        if self.role == "decode":
            self.submit(self._register_rank)
        else:
            self.register_to_bootstrap()

    # ------------------------------------------------------------------------------------- plumbing
    def submit(self, fn: Any, *a: Any) -> Future[Any]:
        return self._pool.submit(fn, *a)

    def _retry(self, what: str, fn: Any, deadline: float | None = None) -> bool:
        delay = 0.2
        while not self._closed.is_set():
            try:
                fn()
                return True
            except Exception as exc:
                if deadline is not None and time.monotonic() + delay > deadline:
                    log.error("kvlane: %s failed, giving up: %s", what, exc)
                    return False
                log.warning("kvlane: %s failed (%s); retrying in %.1fs", what, exc, delay)
                self._closed.wait(delay)
                delay = min(delay * 2, 5.0)
        return False

    def _register_engine(self) -> None:
        sa = self.server_args
        http_host = _reachable(getattr(sa, "host", "127.0.0.1"))
        endpoints = {ENGINE_KIND: "sglang", "http": f"http://{http_host}:{getattr(sa, 'port', 30000)}"}
        if self.role == "prefill":
            endpoints["sglang_bootstrap"] = f"{http_host}:{getattr(sa, 'disaggregation_bootstrap_port', 8998)}"
        info = EngineInfo(engine_id=self.engine_id, role=Role(self.role), gpus=self.gpus, endpoints=endpoints,
                          kv_bytes_per_token=sum(self.kv_item_lens) * self.tp_size // max(1, self.page_size),
                          kv_capacity_bytes=sum(int(x) for x in self.kv_args.kv_data_lens) * self.tp_size)
        self._retry(f"register_engine {self.engine_id}", lambda: self.client.register_engine(info))

    def _register_rank(self) -> None:
        desc = self.transport.descriptor()
        self._retry(f"register_rank {self.engine_id}/{self.rank}",
                    lambda: self.client.register_rank(self.engine_id, self.rank, desc))

    def register_to_bootstrap(self) -> None:
        """Prefill: tell this engine's bootstrap server who we are, so decode can check TP and page size."""
        sa = self.server_args
        port = getattr(sa, "disaggregation_bootstrap_port", None)
        if port is None:
            return
        url = f"http://{_reachable(getattr(sa, 'host', '127.0.0.1'))}:{port}/kvlane/ranks/{self.rank}"
        body = json.dumps({"engine_id": self.engine_id, "rank": self.rank, "tp_size": self.tp_size,
                           "page_size": self.page_size}).encode()

        def put() -> None:
            req = urllib.request.Request(url, data=body, method="PUT", headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=self.cfg.rpc_timeout_s) as r:
                if r.status != 200:
                    raise RuntimeError(f"bootstrap server answered {r.status}")

        self.submit(self._retry, f"register with bootstrap server {url}", put)

    def try_ensure_parallel_info(self, bootstrap_addr: str) -> bool:
        """Decode: fetch (once) what the prefill at `bootstrap_addr` registered. False = try again later."""
        if bootstrap_addr in self.prefill_info_table:
            return True
        try:
            with urllib.request.urlopen(f"http://{bootstrap_addr}/kvlane/info", timeout=2.0) as r:
                info = json.loads(r.read(64 * 1024))
        except (OSError, ValueError, urllib.error.URLError) as exc:
            log.info("kvlane D: prefill bootstrap %s not ready: %s", bootstrap_addr, exc)
            return False
        if not isinstance(info, dict) or not info.get("complete"):
            return False
        error = None
        if info.get("tp_size") != self.tp_size:
            error = (f"prefill {info.get('engine_id')} runs TP={info.get('tp_size')}, this decode TP={self.tp_size}: "
                     "kvlane moves rank i -> rank i and needs equal TP sizes")
        elif info.get("page_size") != self.page_size:
            error = f"prefill page size {info.get('page_size')} != decode page size {self.page_size}"
        self.prefill_info_table[bootstrap_addr] = PrefillInfo(
            engine_id=str(info.get("engine_id")), tp_size=int(info.get("tp_size") or 0),
            page_size=int(info.get("page_size") or 0), error=error)
        return True

    def peer(self, decode: str, deadline: float) -> PeerHandle:
        """Our transport's link to `decode`'s rank with our rank number (cached; reopened once broken)."""
        with self._connect_lock:
            return self._peer(decode, deadline)

    def _peer(self, decode: str, deadline: float) -> PeerHandle:
        with self._lock:
            p = self._peers.get(decode)
            if p is not None and not p.broken_paths():
                return p
        while True:
            ranks = self.client.get_ranks(decode)
            if self.rank in ranks:
                break
            if time.monotonic() + 0.2 > deadline or self._closed.is_set():
                raise TimeoutError(f"decode {decode} has not registered rank {self.rank} (has {sorted(ranks)})")
            self._closed.wait(0.2)
        p = self.transport.connect(ranks[self.rank], deadline=deadline)  # a timed-out handshake is retried
        with self._lock:
            self._peers[decode] = p
        return p

    def copies(self, src_pages: np.ndarray, dst_pages: np.ndarray, src_aux: int | None,
               dst_aux: int | None) -> list[BlockCopy]:
        """Page i of every KV buffer -> page dst[i] of the same buffer, and the aux row (first token etc.)."""
        out: list[BlockCopy] = []
        for region, item in enumerate(self.kv_item_lens):
            out.extend(BlockCopy(region, int(s) * item, int(d) * item, item)
                       for s, d in zip(src_pages.tolist(), dst_pages.tolist(), strict=True))
        if src_aux is not None and dst_aux is not None:
            base = len(self.kv_item_lens)
            out.extend(BlockCopy(base + j, src_aux * item, dst_aux * item, item)
                       for j, item in enumerate(self.aux_item_lens))
        return out

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.leases.close()
        self.transport.close()
        closer = getattr(self.client, "close", None)
        if closer is not None:
            closer()

    teardown = close


def _reachable(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


class _Transfer:
    """State shared by sender and receiver: one ordered KVPoll state, the first error wins."""

    kv_mgr: KVLaneKVManager
    room: int

    def _init_state(self) -> None:
        self._lock = threading.Lock()
        self._state = KVPoll.Bootstrapping
        self._error: str | None = None
        self._from_other_rank = False

    def poll(self) -> int:
        return self._state

    def _set(self, state: int) -> bool:
        """Move forward (never out of a terminal state); True if the state changed."""
        with self._lock:
            if self._state in _TERMINAL or state <= self._state:
                return False
            self._state = state
            return True

    def _fail(self, reason: str, from_other_rank: bool = False) -> bool:
        with self._lock:
            if self._state in _TERMINAL:
                return False
            self._state, self._error, self._from_other_rank = KVPoll.Failed, reason, from_other_rank
        log.warning("kvlane %s room %s rank %d: %s", self.kv_mgr.role, self.room, self.kv_mgr.rank, reason)
        return True

    def failure_exception(self) -> None:
        raise KVLaneTransferError(self.room, self._error or f"transfer in state {self._state}", self._from_other_rank)


class KVLaneKVSender(_Transfer, BaseKVSender):
    """Prefill, one per request per TP rank: announce -> (lease) -> push of every page once the last chunk
    is handed over -> outcome. Poll: Bootstrapping until decode's announce, WaitingForInput, Transferring,
    then Success / Failed."""

    def __init__(self, mgr: KVLaneKVManager, bootstrap_addr: str, bootstrap_room: int,
                 req_has_disagg_prefill_dp_rank: bool = False):
        self.kv_mgr, self.bootstrap_addr, self.room = mgr, bootstrap_addr, int(bootstrap_room)
        self.tid = transfer_id_for_room(self.room)
        self._init_state()
        self._created = time.monotonic()
        self._announce: dict[str, Any] | None = None
        self.num_kv_indices: int | None = None
        self.aux_index: int | None = None
        self._chunks: list[np.ndarray] = []
        self._sent = 0
        self._started = False
        self._lease: LeaseGrant | None = None
        self._result: TransferResult | None = None
        self._abort = threading.Event()
        mgr.submit(self._await_announce)

    # -- SGLang calls ---------------------------------------------------------------------------------
    def pop_decode_prefix_len(self) -> int:
        return int(self._announce["decode_prefix_len"]) if self._announce else 0

    def init(self, num_kv_indices: int, aux_index: int | None = None) -> None:
        self.num_kv_indices, self.aux_index = int(num_kv_indices), aux_index
        if self._announce is not None and len(self._announce["pages"]) != self.num_kv_indices:
            self._fail(f"prefill will send {self.num_kv_indices} pages, decode allocated "
                       f"{len(self._announce['pages'])} (prompt or prefix length differ)")

    def should_send_kv_chunk(self, num_pages: int, last_chunk: bool) -> bool:
        return num_pages > 0 or last_chunk  # a zero-page last chunk still carries the aux row

    def send(self, kv_indices: Any, state_indices: Any = None, num_kv_tokens: int | None = None,
             **_ignored: Any) -> None:
        if self._state in _TERMINAL:
            return
        if state_indices is not None and any(s is not None for s in state_indices):
            self._fail("kvlane does not transfer hybrid (mamba/SWA) state yet")
            return
        if self.num_kv_indices is None or self._announce is None:
            self._fail("send() before init() / before decode announced its pages")
            return
        pages = np.asarray(kv_indices, dtype=np.int64).reshape(-1)
        if self._started:
            if len(pages):
                self._fail(f"{len(pages)} more pages after the last chunk")
            return
        self._sent += len(pages)
        if self._sent > self.num_kv_indices:
            self._fail(f"{self._sent} pages sent, init() announced {self.num_kv_indices}")
            return
        self._chunks.append(pages)
        self._set(KVPoll.Transferring)
        if self._sent == self.num_kv_indices:
            self._started = True
            self.kv_mgr.submit(self._transfer)

    def get_transfer_metric(self) -> KVTransferMetric:
        r = self._result
        if r is None or not r.ok:
            return KVTransferMetric()
        return KVTransferMetric(transfer_latency_s=r.seconds, transfer_total_bytes=r.bytes)

    def abort(self) -> None:
        self._abort.set()
        if self._fail("aborted by the prefill scheduler") and not self._started:
            self.kv_mgr.submit(self._tell_group_aborted)

    def _tell_group_aborted(self) -> None:
        """Aborted before the push: rank 0 tells the other ranks there will be no lease; another rank tells
        rank 0 not to wait for its outcome. Either way nobody waits out a deadline for us."""
        mgr = self.kv_mgr
        if mgr.rank == 0:
            if self._lease is None:
                self._post_lease({"denied": "prefill aborted the request"})
        else:
            _quiet(mgr.client.announce, outcome_key(self.tid, mgr.rank),
                   RankOutcome(rank=mgr.rank, path="none", bytes=0, seconds=0.0, ok=False).to_wire())

    def clear(self) -> None:
        self._chunks = []

    # -- background -----------------------------------------------------------------------------------
    def _await_announce(self) -> None:
        from kvlane.integration.policy_service.protocol import AnnounceTimeout

        mgr = self.kv_mgr
        deadline = self._created + mgr.cfg.bootstrap_timeout_s
        key = rank_key(self.tid, mgr.rank)
        while not self._abort.is_set() and self._state not in _TERMINAL:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._fail(f"decode did not announce {key} within {mgr.cfg.bootstrap_timeout_s:g}s")
                return
            try:
                raw = mgr.client.await_announce(key, timeout_s=min(remaining, 2.0))
            except AnnounceTimeout:
                continue
            except Exception as exc:
                log.warning("kvlane P: await_announce %s failed (%s); retrying", key, exc)
                mgr._closed.wait(min(0.5, max(0.0, remaining)))
                continue
            try:
                ann = decode_announce(raw, rank=mgr.rank, tp_size=mgr.tp_size, page_size=mgr.page_size)
            except ValueError as exc:
                self._fail(f"bad announce from decode: {exc}")
                return
            if ann.get("aborted"):
                self._fail(f"decode aborted the request: {ann['aborted']}", from_other_rank=True)
                return
            self._announce = ann
            self._set(KVPoll.WaitingForInput)
            return

    def _transfer(self) -> None:
        mgr, ann = self.kv_mgr, self._announce
        assert ann is not None and self.num_kv_indices is not None
        t0 = time.monotonic()
        result: TransferResult | None = None
        try:
            src = np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype=np.int64)
            dst = np.asarray(ann["pages"], dtype=np.int64)
            if len(src) != len(dst):
                self._fail(f"prefill sends {len(src)} pages, decode allocated {len(dst)}")
                return
            copies = mgr.copies(src, dst, self.aux_index, ann["aux_index"])
            nbytes = sum(c.nbytes for c in copies)
            path = self._lease_path(ann["decode"], nbytes, t0 + mgr.cfg.lease_timeout_s)
            if path is None:
                return
            if not copies:
                result = TransferResult(self.tid, True, 0, 0.0, path or "none")
            else:
                self._check_not_aborted_by_decode()
                if self._state in _TERMINAL:
                    return
                deadline = time.monotonic() + mgr.cfg.push_timeout_s
                peer = mgr.peer(ann["decode"], deadline)
                if path not in peer.links:
                    path = sorted(peer.links)[0]
                fut = mgr.transport.push(peer, self.tid, path, copies, deadline_s=max(0.1, deadline - time.monotonic()))
                result = fut.result(mgr.cfg.push_timeout_s + 5.0)
            self._result = result
            if result.ok:
                self._set(KVPoll.Success)
            else:
                self._fail(f"push to {ann['decode']} rank {mgr.rank} failed: {result.error}")
        except Exception as exc:
            self._fail(f"transfer failed: {exc.__class__.__name__}: {exc}")
        finally:
            if self._lease is not None or mgr.rank != 0:
                self._report(result, time.monotonic() - t0)

    def _lease_path(self, decode: str, nbytes: int, deadline: float) -> str | None:
        """Rank 0 takes the group's lease and posts it; other ranks read it. Our rank's granted path."""
        from kvlane.integration.policy_service.protocol import AnnounceTimeout

        mgr = self.kv_mgr
        if mgr.rank == 0:
            req = LeaseRequest(transfer_id=self.tid, prefill=mgr.engine_id, decode=decode, bytes=nbytes * mgr.tp_size)
            why = "no answer"
            while self._state not in _TERMINAL:
                wait = 0.2
                try:
                    ans = mgr.client.acquire_lease(req)
                    if isinstance(ans, LeaseGrant):
                        self._lease = ans
                        # push (push_timeout_s) then the other ranks' outcomes (push_timeout_s more)
                        mgr.leases.hold(ans, until=time.monotonic() + 2 * mgr.cfg.push_timeout_s + 10.0)
                        break
                    assert isinstance(ans, LeaseDenied)
                    why, wait = ans.reason, max(0.05, ans.retry_after)
                except Exception as exc:
                    why = f"{exc.__class__.__name__}: {exc}"
                if time.monotonic() + wait >= deadline:
                    self._post_lease({"denied": why})
                    self._fail(f"no lease for {self.tid}: {why}")
                    return None
                mgr._closed.wait(wait)
            if self._lease is None:
                return None
            paths = {str(g.rank): g.path for g in self._lease.paths}
            self._post_lease({"lease_id": self._lease.lease_id, "paths": paths})
            return paths.get("0", "")
        while self._state not in _TERMINAL:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._fail(f"rank 0 posted no lease for {self.tid} in time", from_other_rank=True)
                return None
            try:
                posted = mgr.client.await_announce(lease_key(self.tid), timeout_s=min(remaining, 2.0))
            except AnnounceTimeout:
                continue
            except Exception as exc:
                log.warning("kvlane P: reading the lease of %s failed (%s)", self.tid, exc)
                mgr._closed.wait(0.2)
                continue
            if "denied" in posted:
                self._fail(f"no lease for {self.tid}: {posted['denied']}", from_other_rank=True)
                return None
            return str(posted.get("paths", {}).get(str(mgr.rank), ""))
        return None

    def _post_lease(self, payload: dict[str, Any]) -> None:
        try:
            self.kv_mgr.client.announce(lease_key(self.tid), payload)
        except Exception as exc:  # the other ranks then time out on their own deadline
            log.warning("kvlane P: posting the lease of %s failed: %s", self.tid, exc)

    def _check_not_aborted_by_decode(self) -> None:
        try:
            raw = self.kv_mgr.client.await_announce(rank_key(self.tid, self.kv_mgr.rank), timeout_s=0.01)
        except Exception:
            return
        if isinstance(raw, dict) and raw.get("aborted"):
            self._fail(f"decode aborted the request: {raw['aborted']}", from_other_rank=True)

    def _report(self, result: TransferResult | None, seconds: float) -> None:
        """Every rank posts its outcome; rank 0 collects them and releases the lease with the feedback."""
        from kvlane.integration.policy_service.protocol import AnnounceTimeout

        mgr = self.kv_mgr
        mine = RankOutcome(rank=mgr.rank, path=(result.path if result else None) or "none",
                           bytes=result.bytes if result and result.ok else 0,
                           seconds=result.seconds if result else seconds, ok=bool(result and result.ok))
        if mgr.rank != 0:
            try:
                mgr.client.announce(outcome_key(self.tid, mgr.rank), mine.to_wire())
            except Exception as exc:
                log.warning("kvlane P: posting the outcome of %s failed: %s", self.tid, exc)
            return
        assert self._lease is not None
        outcomes, errors = [mine], [] if mine.ok else [f"rank 0: {self._error or 'failed'}"]
        deadline = time.monotonic() + mgr.cfg.push_timeout_s
        for r in range(1, mgr.tp_size):
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    errors.append(f"rank {r}: no outcome")
                    break
                try:
                    outcomes.append(RankOutcome.model_validate(
                        mgr.client.await_announce(outcome_key(self.tid, r), timeout_s=min(remaining, 2.0))))
                    break
                except AnnounceTimeout:
                    continue
                except Exception as exc:
                    errors.append(f"rank {r}: {exc}")
                    break
        ok = not errors and all(o.ok for o in outcomes) and len(outcomes) == mgr.tp_size
        outcome = TransferOutcome(lease_id=self._lease.lease_id, ok=ok, bytes=sum(o.bytes for o in outcomes),
                                  seconds=max(o.seconds for o in outcomes), error="; ".join(errors)[:2000] or None,
                                  ranks=outcomes)
        mgr.leases.drop(self._lease.lease_id)
        mgr._retry(f"release lease {self._lease.lease_id}",
                   lambda: mgr.client.release_lease(self._lease.lease_id, outcome), time.monotonic() + 3.0)


class KVLaneKVReceiver(_Transfer, BaseKVReceiver):
    """Decode, one per request per TP rank: init -> send_metadata arms the transport for the pre-allocated
    pages and announces them -> Success once every byte landed, Failed at the deadline or on abort."""

    def __init__(self, mgr: KVLaneKVManager, bootstrap_addr: str, bootstrap_room: int | None = None,
                 **_ignored: Any):
        if bootstrap_room is None:
            raise ValueError("kvlane needs a bootstrap_room on every request (the router sets it)")
        self.kv_mgr, self.bootstrap_addr, self.room = mgr, bootstrap_addr, int(bootstrap_room)
        self.tid = transfer_id_for_room(self.room)
        self._init_state()
        self._fut: Future[TransferResult] | None = None
        self._result: TransferResult | None = None

    def init(self, prefill_dp_rank: int = 0) -> None:
        info = self.kv_mgr.prefill_info_table.get(self.bootstrap_addr)
        if info is not None and info.error:
            self._fail(info.error, from_other_rank=False)
            return
        self._set(KVPoll.WaitingForInput)

    def send_metadata(self, kv_indices: Any, aux_index: int | None = None, state_indices: Any = None,
                      decode_prefix_len: int | None = None, destination: Any = "device", **_ignored: Any) -> None:
        if self._state in _TERMINAL:
            return
        if str(getattr(destination, "value", destination)) != "device":
            self._fail("kvlane receives into device (KV pool) pages only, not host staging")
            return
        if state_indices is not None and any(s is not None for s in state_indices):
            self._fail("kvlane does not transfer hybrid (mamba/SWA) state yet")
            return
        mgr = self.kv_mgr
        pages = np.asarray(kv_indices, dtype=np.int64).reshape(-1)
        try:
            payload = encode_announce(decode=mgr.engine_id, rank=mgr.rank, tp_size=mgr.tp_size,
                                      page_size=mgr.page_size, pages=pages, aux_index=aux_index,
                                      decode_prefix_len=int(decode_prefix_len or 0))
            copies = mgr.copies(pages, pages, aux_index, aux_index)  # receiver side reads the dst half only
            if copies:
                c = mgr.cfg
                self._fut = mgr.transport.expect(self.tid, copies, c.bootstrap_timeout_s + c.lease_timeout_s + c.push_timeout_s)
        except ValueError as exc:
            self._fail(f"cannot receive into these pages: {exc}")
            return
        self._set(KVPoll.Transferring)
        if self._fut is None:
            self._set(KVPoll.Success)
        else:
            self._fut.add_done_callback(self._landed)
        mgr.submit(self._announce, payload)

    def _landed(self, fut: Future[TransferResult]) -> None:
        r = fut.result()
        self._result = r
        if r.ok:
            self._set(KVPoll.Success)
        else:
            self._fail(f"receive of {self.tid} failed: {r.error}")

    def _announce(self, payload: dict[str, Any]) -> None:
        mgr = self.kv_mgr
        key = rank_key(self.tid, mgr.rank)
        ok = mgr._retry(f"announce {key}", lambda: mgr.client.announce(key, payload),
                        time.monotonic() + mgr.cfg.bootstrap_timeout_s)
        if not ok and self._fail(f"could not announce {key} to the policy service"):
            mgr.transport.cancel(self.tid)

    def abort(self) -> None:
        if not self._fail("aborted by the decode scheduler"):
            return
        mgr = self.kv_mgr
        if self._fut is not None:
            mgr.transport.cancel(self.tid)
        mgr.submit(lambda: _quiet(mgr.client.announce, rank_key(self.tid, mgr.rank),
                                  {"v": 1, "aborted": "decode aborted the request"}))

    def clear(self) -> None:
        """SGLang is done with the request (it may reuse the pages now): withdraw a receive still armed, so
        no late byte can land in them."""
        fut, self._fut = self._fut, None
        if fut is not None and not fut.done():
            self._fail("cleared before the transfer finished")
            self.kv_mgr.transport.cancel(self.tid)


def _quiet(fn: Any, *a: Any) -> None:
    try:
        fn(*a)
    except Exception as exc:
        log.info("kvlane: %s", exc)


class KVLaneKVBootstrapServer(BaseKVBootstrapServer):
    """Prefill engine's registry of its TP ranks (see `bootstrap.py`); SGLang builds it with (host, port)."""

    def __init__(self, host: str, port: int, **_ignored: Any):
        self._server = BootstrapServerThread(host, int(port))
        self.host, self.port = host, self._server.port

    @property
    def registry(self) -> Any:
        return self._server.registry

    def close(self) -> None:
        self._server.close()
