"""`KVTransport`: the synchronous face of kvlane.transport, one per (engine, TP rank) in the vLLM worker
process. It owns a background thread running one asyncio loop that hosts every path backend and the
transfer protocol (offer → ready → data → done). It never picks a path or a peer and never blocks a
caller past a deadline; failures come back as ``TransferResult(ok=False, error=...)``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from . import auth, ranks
from .config import TransportConfig
from .memory import Region, as_region, span
from .types import (
    AuthError,
    BlockCopy,
    HandshakeTimeout,
    LayoutMismatchError,
    PeerError,
    TransferResult,
    TransportError,
    coalesce,
    dst_intervals,
)
from .wire import (
    MAX_RUNS,
    Auth,
    Challenge,
    Data,
    Descriptor,
    Done,
    Fail,
    Hello,
    HelloErr,
    HelloOk,
    Offer,
    PathAddress,
    Ready,
    RegionInfo,
    Reject,
    Wire,
)

log = logging.getLogger("kvlane.transport")
#: Open challenges (hellos not yet answered) a receiver keeps at once; more hellos are refused until some
#: are answered or time out after connect_timeout_s (bounds what strangers can make us hold).
MAX_PENDING_CHALLENGES = 1024
#: Longest silence between two copies of an unanswered offer (the first repeat comes after offer_retry_s).
OFFER_RETRY_MAX_S = 8.0
#: Finished expects a receiver remembers (transfer id → outcome) to answer late or repeated offers at once.
MAX_ENDED = 4096


class Link(Protocol):
    """One connection to one peer on one path, as a backend provides it."""

    peer_key: str
    dead: asyncio.Future[str]  # resolves with the reason when the link breaks

    async def send_ctrl(self, msg: Wire) -> None: ...

    async def send_runs(self, tid: str, tag_base: int, views: list[Any]) -> None: ...

    def arm_recv(self, tid: str, tag_base: int, views: list[Any]) -> asyncio.Future[None]: ...

    def disarm(self, tid: str) -> None: ...

    def close(self) -> None: ...


class Backend(Protocol):
    async def start(self) -> PathAddress: ...

    async def open(self, peer_key: str, addr: PathAddress, hello: Hello) -> Link: ...

    async def stop(self) -> None: ...


@dataclass(eq=False)
class PeerHandle:
    """What `connect()` returns: the validated peer and its per-path links (used only via KVTransport)."""

    descriptor: Descriptor
    links: dict[str, Link] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.descriptor.key

    def broken_paths(self) -> dict[str, str]:
        """Paths whose link broke (peer died, endpoint error) → reason; reconnect to use them again."""
        return {p: link.dead.result() for p, link in self.links.items() if link.dead.done()}


@dataclass(eq=False)
class _Expect:
    tid: str
    spans: list[tuple[int, int, int]]
    nbytes: int
    future: concurrent.futures.Future[TransferResult]
    t0: float
    timer: asyncio.TimerHandle | None = None
    link: Link | None = None
    path: str = ""
    offer: Offer | None = None
    state: str = "waiting"  # waiting → receiving (→ abandoning) → finished


@dataclass(eq=False)
class _Ended:
    """Receiver side: how an expect finished, kept (bounded, MAX_ENDED) to answer copies and late offers."""

    offer: Offer | None  # the offer it was bound to (None: none came)
    path: str
    ok: bool
    nbytes: int
    error: str | None
    at: float  # time.monotonic() when it finished


@dataclass(eq=False)
class _HeldOffer:
    link: Link
    offer: Offer
    path: str
    timer: asyncio.TimerHandle


@dataclass(eq=False)
class _Pending:
    """Receiver side: a hello waiting for the AUTH answer to our challenge ``nonce`` (single use)."""

    link: Link
    path: str
    desc: Descriptor
    descriptor: bytes  # the hello's descriptor bytes, as MACed
    sender_nonce: bytes
    nonce: bytes
    timer: asyncio.TimerHandle | None = None


@dataclass(eq=False)
class _Session:
    """One authenticated handshake: the key that MACs offers, and its offer sequence numbers."""

    key: bytes
    seqs: auth.SeqWindow = field(default_factory=auth.SeqWindow)
    next_seq: int = 0


def _addr(link: Link) -> str:
    """The peer's network address for logs (tcp: host:port; ucx: the endpoint's claimed owner)."""
    return getattr(link, "peer_addr", None) or f"the endpoint of {link.peer_key}"


class RankMismatchError(ranks.RankMismatchError, TransportError):
    """Raised by connect()/push() for a peer of another TP rank without a configured mapping."""


def _elapsed(t0: float) -> float:
    return time.perf_counter() - t0


class KVTransport:
    def __init__(self, engine_id: str, rank: int, config: TransportConfig | None = None) -> None:
        self.engine_id = engine_id
        self.rank = rank
        self.config = config or TransportConfig()
        if rank >= self.config.tp_size:
            raise ValueError(f"rank {rank} is outside tp_size {self.config.tp_size}")
        self.key = f"{engine_id}/rank{rank}"
        self.backend = resolve_backend(self.config.backend)
        self._pushes: dict[concurrent.futures.Future[TransferResult], tuple[str, str]] = {}
        self._regions: list[Region] = []
        self._layout_tag = ""
        self._expects: dict[str, _Expect] = {}
        self._offers: dict[str, _HeldOffer] = {}
        self._ended: OrderedDict[str, _Ended] = OrderedDict()  # receiver: tid → outcome of its last expect
        self._waiters: dict[str, asyncio.Queue[Wire]] = {}
        self._reconnecting: dict[tuple[str, str], asyncio.Lock] = {}
        secret = self.config.secret
        self._secret: bytes | None = secret.get_secret_value() if secret is not None else None
        self._pending: dict[bytes, _Pending] = {}  # receiver: challenge nonce → hello awaiting its AUTH
        self._rx_sessions: dict[tuple[str, str], _Session] = {}  # receiver: (path, sender key) → session
        self._tx_sessions: dict[Link, _Session] = {}  # sender: our link → session
        self._refusals: set[asyncio.Future[None]] = set()  # refusals still telling the peer before closing
        self._reply_keys: dict[str, tuple[bytes, int, int]] = {}  # sender: tid → (session key, seq, tag base)
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"kvlane-transport-{self.key}",
                                        daemon=True)
        self._thread.start()
        if self.config.thread_cpus is not None:  # before _start(): ucxx's threads inherit the loop thread's
            try:
                os.sched_setaffinity(self._thread.native_id, self.config.thread_cpus)
            except OSError as exc:
                self._stop_loop()
                raise ValueError(f"thread_cpus {sorted(self.config.thread_cpus)}: cannot run the transport "
                                 f"threads there ({exc.strerror}); allowed here: "
                                 f"{sorted(os.sched_getaffinity(0))}") from None
        self._backends: dict[str, Backend] = {}
        self._addresses: dict[str, PathAddress] = {}
        try:
            self._call(self._start(), timeout=60.0)
        except BaseException:
            self._stop_loop()
            raise

    # ---------- sync API ----------

    def register_regions(self, regions: list[Any], layout_tag: str = "") -> None:
        """Register the KV tensors (one per layer, ``shape[0]`` = blocks); replaces earlier ones."""
        if not regions:
            raise ValueError("register_regions needs at least one region")
        self._regions = [as_region(r) for r in regions]
        self._layout_tag = layout_tag

    @property
    def regions(self) -> list[Region]:
        return list(self._regions)

    def descriptor(self) -> bytes:
        if not self._regions:
            raise TransportError("register_regions() before descriptor()")
        return Descriptor(
            engine_id=self.engine_id, rank=self.rank, tp_size=self.config.tp_size, backend=self.backend,
            paths=self._addresses, layout_tag=self._layout_tag,
            regions=[RegionInfo(dtype=r.dtype, block_shape=list(r.shape[1:]), block_bytes=r.block_bytes,
                                num_blocks=r.num_blocks, nbytes=r.nbytes) for r in self._regions],
        ).to_msgpack()

    def connect(self, peer_descriptor: bytes, paths: list[str] | None = None,
                deadline: float | None = None) -> PeerHandle:
        """Validate the peer (rank, layout) and open a link on each path (default: all configured). A handshake
        that times out (`HandshakeTimeout`) is tried again on a fresh link while the monotonic `deadline` leaves
        room for a whole attempt (`connect_timeout_s`); without a deadline it is tried once. Refusals (layout,
        rank, authentication) are never retried."""
        self._check_open()
        desc = Descriptor.from_msgpack(peer_descriptor)
        self._check_peer(desc)
        wanted = list(self._backends) if paths is None else paths
        for p in wanted:
            if p not in self._backends:
                raise ValueError(f"unknown path {p!r}; configured paths: {sorted(self._backends)}")
            if p not in desc.paths:
                raise PeerError(f"peer {desc.key} has no path {p!r} (it offers {sorted(desc.paths)})")
        peer = PeerHandle(desc)
        try:
            for p in wanted:
                peer.links[p] = self._open_until(p, desc, deadline)
        except BaseException:
            self._close_peer(peer)
            raise
        return peer

    def _open_until(self, path: str, desc: Descriptor, deadline: float | None) -> Link:
        attempt = 1
        while True:
            try:
                return self._call(self._open(path, desc), timeout=self.config.connect_timeout_s + 5)
            except HandshakeTimeout as exc:
                if deadline is None or deadline - time.monotonic() < self.config.connect_timeout_s:
                    raise
                attempt += 1
                log.warning("kvlane transport %s: %s; attempt %d", self.key, exc, attempt)

    def push(self, peer: PeerHandle, transfer_id: str, path: str, copies: list[BlockCopy],
             deadline_s: float) -> concurrent.futures.Future[TransferResult]:
        """Send ``copies`` (source = our regions, destination = the peer's) and resolve once the peer
        confirms every byte landed, or with ok=False at ``deadline_s`` at the latest."""
        self._check_open()
        self._check_peer(peer.descriptor)
        if path not in peer.links:
            raise ValueError(f"no link to {peer.key} on path {path!r}; connected paths: {sorted(peer.links)}")
        runs = self._validate_copies(copies, peer.descriptor, sending=True)
        _check_tid(transfer_id)
        _check_deadline(deadline_s)
        fut: concurrent.futures.Future[TransferResult] = concurrent.futures.Future()
        fut.set_running_or_notify_cancel()
        self._pushes[fut] = (transfer_id, path)
        fut.add_done_callback(lambda f: self._pushes.pop(f, None))
        asyncio.run_coroutine_threadsafe(
            self._push(peer, transfer_id, path, runs, deadline_s, fut), self._loop)
        return fut

    def expect(self, transfer_id: str, copies: list[BlockCopy],
               deadline_s: float) -> concurrent.futures.Future[TransferResult]:
        """Arm receipt of ``copies`` (their dst side, in our regions) from whichever peer offers
        ``transfer_id``; resolves when every byte is in place, or with ok=False at the deadline."""
        self._check_open()
        _check_tid(transfer_id)
        _check_deadline(deadline_s)
        runs = self._validate_copies(copies, None, sending=False)
        spans = dst_intervals([(c.region, c.dst_offset, c.nbytes) for c in runs])
        fut: concurrent.futures.Future[TransferResult] = concurrent.futures.Future()
        fut.set_running_or_notify_cancel()
        self._loop.call_soon_threadsafe(self._arm_expect, transfer_id, spans, deadline_s, fut)
        return fut

    def cancel(self, transfer_id: str) -> None:
        """Withdraw an `expect` (e.g. the request was aborted): its future resolves with ok=False, the
        sender gets a FAIL, and bytes still in flight are kept out of our regions. No-op if unknown."""
        self._check_open()
        self._loop.call_soon_threadsafe(self._cancel, transfer_id)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._call(self._shutdown(), timeout=15.0)
        except Exception as exc:  # closing must not raise into the engine's shutdown path
            log.warning("kvlane transport %s: unclean shutdown: %s", self.key, exc)
        self._stop_loop()
        for fut, (tid, path) in list(self._pushes.items()):  # nobody may wait forever on a closed transport
            _resolve(fut, TransferResult(tid, False, 0, 0.0, path, "transport closed before the push finished"))

    def __enter__(self) -> KVTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------- checks ----------

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError(f"transport {self.key} is closed")

    def _check_peer(self, desc: Descriptor) -> None:
        if desc.backend != self.backend:
            raise PeerError(f"peer {desc.key} runs backend {desc.backend!r}, we run {self.backend!r}")
        het = self.config.hetero_tp
        if het is None:
            if desc.rank != self.rank:
                raise RankMismatchError(
                    f"TP rank {self.rank} of {self.engine_id} may only talk to TP rank {self.rank}, "
                    f"peer {desc.key} is rank {desc.rank} (configure hetero_tp for a different TP layout)")
        else:
            if {desc.tp_size, self.config.tp_size} != {het.p_tp, het.d_tp} and not (
                    desc.tp_size == self.config.tp_size == het.p_tp == het.d_tp):
                raise RankMismatchError(
                    f"hetero_tp is P={het.p_tp}/D={het.d_tp} but the TP sizes are {self.config.tp_size} (us) "
                    f"and {desc.tp_size} (peer {desc.key})")
            ok = False
            for p_rank, d_rank, p_tp, d_tp in ((self.rank, desc.rank, self.config.tp_size, desc.tp_size),
                                               (desc.rank, self.rank, desc.tp_size, self.config.tp_size)):
                if (p_tp, d_tp) == (het.p_tp, het.d_tp):
                    try:
                        ranks.routes_between(p_tp, d_tp, het.total_kv_heads, p_rank, d_rank)
                        ok = True
                    except ranks.RankMismatchError:
                        pass
            if not ok:
                raise RankMismatchError(f"ranks {self.rank} and {desc.rank} share no KV head under {het}")
        self._check_layout(desc)

    def _check_layout(self, desc: Descriptor) -> None:
        if not self._regions:
            raise TransportError("register_regions() before connecting")
        problems = []
        if desc.layout_tag != self._layout_tag:
            problems.append(f"layout tag {desc.layout_tag!r} != ours {self._layout_tag!r}")
        if len(desc.regions) != len(self._regions):
            problems.append(f"{len(desc.regions)} regions != our {len(self._regions)}")
        het = self.config.hetero_tp
        for i, (theirs, ours) in enumerate(zip(desc.regions, self._regions, strict=False)):
            if theirs.dtype != ours.dtype:
                problems.append(f"region {i}: dtype {theirs.dtype} != ours {ours.dtype}")
            if het is None or desc.tp_size == self.config.tp_size:
                if theirs.block_bytes != ours.block_bytes:
                    problems.append(f"region {i}: block bytes {theirs.block_bytes} != ours {ours.block_bytes}")
            elif theirs.block_bytes * desc.tp_size != ours.block_bytes * self.config.tp_size:
                problems.append(f"region {i}: block bytes {theirs.block_bytes}×TP{desc.tp_size} != "
                                f"ours {ours.block_bytes}×TP{self.config.tp_size} (different total KV heads)")
            if len(problems) >= 6:
                break
        if problems:
            raise LayoutMismatchError(f"KV layout of peer {desc.key} differs from {self.key}: " + "; ".join(problems))

    def _validate_copies(self, copies: list[BlockCopy], peer: Descriptor | None, sending: bool) -> list[BlockCopy]:
        if not copies:
            raise ValueError("a transfer needs at least one BlockCopy")
        if not self._regions:
            raise TransportError("register_regions() before moving bytes")
        for c in copies:
            if not isinstance(c, BlockCopy):
                raise TypeError(f"expected BlockCopy, got {type(c).__name__}")
            if c.region >= len(self._regions):
                raise ValueError(f"{c}: region index beyond our {len(self._regions)} regions")
            own = c.src_offset if sending else c.dst_offset
            if own + c.nbytes > self._regions[c.region].nbytes:
                raise ValueError(f"{c}: {'source' if sending else 'destination'} range ends past our region "
                                 f"{c.region} of {self._regions[c.region].nbytes} bytes")
            if peer is not None and c.dst_offset + c.nbytes > peer.regions[c.region].nbytes:
                raise ValueError(f"{c}: destination range ends past peer region {c.region} of "
                                 f"{peer.regions[c.region].nbytes} bytes")
        runs = coalesce(list(copies))
        if len(runs) > MAX_RUNS:
            raise ValueError(f"{len(runs)} runs after coalescing exceed the limit of {MAX_RUNS} per transfer")
        dst_intervals([(c.region, c.dst_offset, c.nbytes) for c in runs])  # refuses overlaps
        return runs

    # ---------- loop side ----------

    def _call(self, coro: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()

    async def _start(self) -> None:
        if self.backend == "ucx":
            for k, v in self.config.ucx_env.items():
                os.environ.setdefault(k, v)
            try:
                from .ucx import UcxBackend  # imported lazily: needs ucxx
            except ImportError as exc:
                raise TransportError(f"backend 'ucx' needs ucxx (pip install 'ucxx-cu12==0.52.*'): {exc}; "
                                     "use backend='tcp' or 'auto'") from None
            make = lambda name, cfg: UcxBackend(self, name, cfg)  # noqa: E731
        else:
            from .tcp import TcpBackend

            make = lambda name, cfg: TcpBackend(self, name, self.config.host)  # noqa: E731
        for name, cfg in self.config.paths.items():
            backend = make(name, cfg)
            self._addresses[name] = await backend.start()
            self._backends[name] = backend

    async def _shutdown(self) -> None:
        for e in list(self._expects.values()):
            self._finish_expect(e, False, "transport closed")
        for held in list(self._offers.values()):
            held.timer.cancel()
        self._offers.clear()
        for pend in list(self._pending.values()):
            if pend.timer is not None:
                pend.timer.cancel()
        self._pending.clear()
        for task in list(self._refusals):
            task.cancel()  # its finally closes the refused link
        await asyncio.gather(*self._refusals, return_exceptions=True)
        async def stop(b: Backend) -> None:
            try:
                await asyncio.wait_for(b.stop(), 5.0)
            except Exception as exc:
                log.warning("kvlane transport %s: stopping a path failed: %s", self.key, exc)

        await asyncio.gather(*(stop(b) for b in self._backends.values()))  # ucx: ~1 s each, in parallel

    def _close_peer(self, peer: PeerHandle) -> None:
        for link in peer.links.values():
            self._loop.call_soon_threadsafe(link.close)

    async def _open(self, path: str, desc: Descriptor) -> Link:
        q = self._waiters.setdefault(f"hello:{path}:{desc.key}", asyncio.Queue())
        link = None
        mine = self.descriptor()
        nonce = auth.new_nonce() if self._secret is not None else None
        try:
            # One deadline for the whole handshake (hello sent, answer, auth): with one per step a slow hello
            # send plus a silent peer outlived connect()'s own wait and surfaced as a bare TimeoutError.
            async with asyncio.timeout(self.config.connect_timeout_s):
                link = await self._backends[path].open(desc.key, desc.paths[path],
                                                       Hello(descriptor=mine, nonce=nonce))
                reply = await _next(q, link, None)
                if isinstance(reply, Challenge):
                    reply = await self._answer(path, desc, link, q, mine, nonce, reply)
                elif isinstance(reply, HelloOk) and self._secret is not None:
                    raise AuthError(f"peer {desc.key} accepted us on path {path!r} without authentication: it has "
                                    "no shared secret configured and we do; refusing to move KV to an "
                                    "unauthenticated peer")
        except BaseException as exc:
            if link is not None:
                link.close()
            if isinstance(exc, TimeoutError):
                raise HandshakeTimeout(f"handshake with {desc.key} on path {path!r} timed out after "
                                f"{self.config.connect_timeout_s}s") from None
            if isinstance(exc, OSError):
                raise PeerError(f"cannot reach {desc.key} on path {path!r}: {exc}") from None
            raise
        finally:
            self._waiters.pop(f"hello:{path}:{desc.key}", None)
        if isinstance(reply, HelloErr):
            link.close()
            raise _raise_type(reply.error)(f"peer {desc.key} refused the handshake: {reply.error}")
        return link

    async def _answer(self, path: str, desc: Descriptor, link: Link, q: asyncio.Queue[Wire], mine: bytes,
                      nonce: bytes | None, challenge: Challenge) -> Wire:
        """Sender side of an authenticated handshake: answer the challenge, check the receiver's proof."""
        if self._secret is None or nonce is None:
            raise AuthError(f"peer {desc.key} requires authentication on path {path!r} (it has a shared secret, "
                            "we have none): configure the same secret on both sides (TransportConfig.secret or "
                            "$KVLANE_SECRET)")
        if challenge.key != desc.key:
            raise AuthError(f"challenge on the link to {desc.key} names {challenge.key!r}")
        mac = auth.sender_mac(self._secret, challenge.nonce, nonce, mine, desc.key, path)
        await link.send_ctrl(Auth(key=self.key, nonce=challenge.nonce, mac=mac))
        reply = await _next(q, link, None)  # within _open's deadline
        if isinstance(reply, HelloOk):
            proof = auth.receiver_mac(self._secret, nonce, challenge.nonce, mine, desc.key, path)
            if not auth.check(proof, reply.mac):
                raise AuthError(f"peer {desc.key} accepted us on path {path!r} but could not prove the shared "
                                "secret (wrong secret on one side?); refusing to move KV to it")
            self._tx_sessions[link] = _Session(
                auth.session_key(self._secret, challenge.nonce, nonce, mine, desc.key, path))
        return reply

    # sender

    async def _push(self, peer: PeerHandle, tid: str, path: str, runs: list[BlockCopy], deadline_s: float,
                    fut: concurrent.futures.Future[TransferResult]) -> None:
        t0 = time.perf_counter()
        nbytes = sum(r.nbytes for r in runs)
        q: asyncio.Queue[Wire] = asyncio.Queue()
        if tid in self._waiters:
            _resolve(fut, TransferResult(tid, False, 0, 0.0, path, f"transfer {tid!r} is already being pushed"))
            return
        self._waiters[tid] = q
        link = peer.links[path]
        stage = ["offer"]
        phases: list[tuple[str, float]] = []
        mark = [t0]

        def done(phase: str) -> None:
            now = time.perf_counter()
            phases.append((phase, now - mark[0]))
            mark[0] = now

        async def steps() -> None:
            nonlocal link
            if link.dead.done():  # a broken link (peer restarted, endpoint closed) gets one fresh handshake
                stage[0] = f"reconnecting (link broke: {link.dead.result()})"
                lock = self._reconnecting.setdefault((peer.key, path), asyncio.Lock())
                async with lock:  # concurrent pushes share one handshake
                    if peer.links[path].dead.done():
                        peer.links[path] = await self._open(path, peer.descriptor)
                link = peer.links[path]
                stage[0] = "offer"
                done("handshake")
            tag_base = int.from_bytes(os.urandom(8), "little") & ~((1 << 20) - 1)
            views = [span(self._regions[r.region], r.src_offset, r.nbytes) for r in runs]
            packed = self._packs(runs, nbytes)
            if packed:  # one message instead of one per run; gathered while the receiver arms
                views = [np.concatenate(views)]
            offer = Offer(tid=tid, sender=self.key, tag_base=tag_base, wait_s=deadline_s,
                          runs=[(r.region, r.dst_offset, r.nbytes) for r in runs], packed=packed)
            if self._secret is not None:
                sess = self._tx_sessions.get(link)
                if sess is None:
                    raise AuthError(f"the link to {link.peer_key} has no authenticated session")
                offer = offer.model_copy(update={"seq": sess.next_seq})
                sess.next_seq += 1
                offer = offer.model_copy(update={"mac": auth.offer_mac(sess.key, offer.to_msgpack())})
                self._reply_keys[tid] = (sess.key, offer.seq, tag_base)
            await link.send_ctrl(offer)
            stage[0] = "waiting for the receiver to arm"
            reply = await self._offer_reply(q, link, offer)
            if isinstance(reply, (Reject, Fail)):
                raise PeerError(f"receiver refused: {reply.error}")
            if not isinstance(reply, Ready):
                raise PeerError(f"unexpected reply {reply.t!r} to an offer")
            done("arm")
            stage[0] = "sending data"
            send = asyncio.ensure_future(link.send_runs(tid, tag_base, views))
            reply = None
            try:
                while reply is None and not send.done() and not link.dead.done():
                    get = asyncio.ensure_future(q.get())
                    try:
                        await asyncio.wait({send, get, link.dead}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        if not get.done():
                            get.cancel()
                    if get.done() and not get.cancelled() and not isinstance(get.result(), Ready):
                        reply = get.result()  # the receiver answered before our sends finished (a failure)
                    # a READY here answers a repeated copy of our offer: already acted on, ignored
            finally:
                if not send.done():
                    send.cancel()
                elif not send.cancelled():
                    send.exception()  # retrieved here; the reason is reported below via the link
            if reply is None:
                if link.dead.done():
                    raise PeerError(f"link to {link.peer_key} broke: {link.dead.result()}")
                send.result()
                done("send")
                stage[0] = "waiting for the receiver's confirmation"
                reply = await _next(q, link, None)
                while isinstance(reply, Ready):  # late answers to repeated copies of our offer
                    reply = await _next(q, link, None)
            if isinstance(reply, Fail):
                raise PeerError(f"receiver failed: {reply.error}")
            if not isinstance(reply, Done) or reply.nbytes != nbytes:
                raise PeerError(f"bad confirmation {reply!r}, expected {nbytes} bytes")
            done("confirm")

        try:
            await asyncio.wait_for(steps(), deadline_s)
            _resolve(fut, TransferResult(tid, True, nbytes, _elapsed(t0), path, phases=tuple(phases)))
        except TimeoutError:
            _resolve(fut, TransferResult(tid, False, 0, _elapsed(t0), path,
                                         f"deadline of {deadline_s}s expired while {stage[0]} (peer {link.peer_key})"))
        except Exception as exc:
            _resolve(fut, TransferResult(tid, False, 0, _elapsed(t0), path,
                                         f"{type(exc).__name__} while {stage[0]}: {exc}"))
        finally:
            self._waiters.pop(tid, None)
            self._reply_keys.pop(tid, None)

    def _packs(self, runs: list[BlockCopy], nbytes: int) -> bool:
        """Whether a push of `runs` travels packed (see Offer.packed): several runs, host memory, small enough."""
        return (len(runs) > 1 and nbytes <= self.config.pack_max_bytes
                and self._all_host(r.region for r in runs))

    def _all_host(self, regions: Iterable[int]) -> bool:
        """Whether every region named is host memory: a packed message is gathered and scattered with numpy."""
        return all(self._regions[r].is_host for r in regions)

    async def _offer_reply(self, q: asyncio.Queue[Wire], link: Link, offer: Offer) -> Wire:
        """The receiver's first answer to ``offer``. Silence for ``offer_retry_s`` (doubling, at most
        OFFER_RETRY_MAX_S) sends the very same offer again: a receiver that has not seen it arms on the copy,
        one that has answers again or ignores it (`_on_offer`); the push's deadline still bounds the wait."""
        interval = self.config.offer_retry_s
        while True:
            try:
                return await _next(q, link, interval)
            except TimeoutError:
                assert interval is not None  # without a timeout _next never times out
                log.info("kvlane transport %s: no answer to offer %s from %s within %.1fs; offering it again",
                         self.key, offer.tid, link.peer_key, interval)
                await link.send_ctrl(offer)
                interval = min(2 * interval, OFFER_RETRY_MAX_S)

    # receiver

    def _arm_expect(self, tid: str, spans: list[tuple[int, int, int]], deadline_s: float,
                    fut: concurrent.futures.Future[TransferResult]) -> None:
        if tid in self._expects:
            _resolve(fut, TransferResult(tid, False, 0, 0.0, "", f"transfer {tid!r} is already expected"))
            return
        e = _Expect(tid, spans, sum(s[2] for s in spans), fut, time.perf_counter())
        self._expects[tid] = e
        e.timer = self._loop.call_later(deadline_s, self._expire, e, deadline_s)
        held = self._offers.pop(tid, None)
        if held is not None:
            held.timer.cancel()
            self._bind(e, held.link, held.offer, held.path)

    def _expire(self, e: _Expect, deadline_s: float) -> None:
        if e.state == "waiting":
            self._finish_expect(e, False, f"deadline of {deadline_s}s expired: no sender offered {e.tid!r}")
        elif e.state == "receiving":
            self._abandon(e, f"deadline of {deadline_s}s expired while receiving {e.nbytes} bytes from "
                             f"{e.link.peer_key}")

    def _abandon(self, e: _Expect, msg: str) -> None:
        if e.state != "receiving":
            self._finish_expect(e, False, msg)
            return
        e.state = "abandoning"  # no other path may finish it meanwhile
        link = e.link

        async def tell_then_disarm() -> None:
            try:  # tell the sender first: a ucx disarm closes the endpoint the FAIL would travel on
                await asyncio.wait_for(link.send_ctrl(self._seal(Fail(tid=e.tid, error=msg), e.path, e.offer)), 1.0)
            except Exception as exc:
                log.info("kvlane transport %s: FAIL for %s not delivered: %s", self.key, e.tid, exc)
            finally:
                link.disarm(e.tid)  # late bytes must never land in blocks that are about to be reused
                e.state = "receiving"
                self._finish_expect(e, False, msg)

        asyncio.ensure_future(tell_then_disarm())

    def _cancel(self, tid: str) -> None:
        e = self._expects.get(tid)
        if e is not None:
            self._abandon(e, f"expect({tid!r}) cancelled by the receiver")

    def _finish_expect(self, e: _Expect, ok: bool, error: str | None = None) -> None:
        if e.state == "finished":
            return
        e.state = "finished"
        if e.timer is not None:
            e.timer.cancel()
        self._expects.pop(e.tid, None)
        self._ended.pop(e.tid, None)
        self._ended[e.tid] = _Ended(e.offer, e.path, ok, e.nbytes, error, time.monotonic())
        while len(self._ended) > MAX_ENDED:
            self._ended.popitem(last=False)
        _resolve(e.future, TransferResult(e.tid, ok, e.nbytes if ok else 0, _elapsed(e.t0), e.path, error))

    def _reply(self, link: Link, msg: Wire) -> None:
        async def send() -> None:
            try:
                await asyncio.wait_for(link.send_ctrl(msg), 5.0)
            except Exception as exc:
                # a timeout only ends our wait: the backend keeps sending it (ucx: the buffer stays alive)
                log.warning("kvlane transport %s: reply %s to %s not confirmed sent within 5 s: %s: %s", self.key, msg.t,
                         link.peer_key, type(exc).__name__, exc)
        asyncio.ensure_future(send())

    def _bind(self, e: _Expect, link: Link, offer: Offer, path: str) -> None:
        e.link, e.path, e.offer = link, path, offer
        try:
            got = dst_intervals(list(offer.runs))
            for region, off, n in offer.runs:
                if region >= len(self._regions) or off + n > self._regions[region].nbytes:
                    raise ValueError(f"run ({region}, {off}, {n}) is outside our regions")
            if got != e.spans:
                raise ValueError(f"offered destination ranges {_short(got)} differ from the expected {_short(e.spans)}")
            views = [span(self._regions[r], off, n) for r, off, n in offer.runs]
            staging = None
            if offer.packed:
                if not self._all_host(r for r, _, _ in offer.runs):
                    raise ValueError("a packed offer can only land in host memory")
                staging = np.empty(e.nbytes, dtype=np.uint8)  # late bytes land here, never in KV blocks
            landed = link.arm_recv(offer.tid, offer.tag_base, [staging] if staging is not None else views)
        except Exception as exc:
            msg = f"offer from {link.peer_key} does not match expect({e.tid!r}): {exc}"
            self._reply(link, self._seal(Reject(tid=e.tid, error=msg), path, offer))
            self._finish_expect(e, False, msg)
            return
        e.state = "receiving"
        self._reply(link, self._seal(Ready(tid=e.tid), path, offer))

        def on_landed(f: asyncio.Future[None]) -> None:
            if not f.cancelled():
                f.exception()  # retrieved even when the expect already ended (its link died first): no asyncio warning
            if e.state != "receiving":
                return
            if f.cancelled() or f.exception() is not None:
                err = "cancelled" if f.cancelled() else f"{type(f.exception()).__name__}: {f.exception()}"
                msg = f"receiving from {link.peer_key} failed: {err}"
                link.disarm(e.tid)
                self._reply(link, self._seal(Fail(tid=e.tid, error=msg), path, offer))
                self._finish_expect(e, False, msg)
            else:
                if staging is not None:  # scatter the packed message into the destination runs
                    at = 0
                    for v in views:
                        np.copyto(v, staging[at: at + v.nbytes])
                        at += v.nbytes
                self._reply(link, self._seal(Done(tid=e.tid, nbytes=e.nbytes), path, offer))
                self._finish_expect(e, True)

        landed.add_done_callback(on_landed)

    # called by backends, in the loop

    def on_hello(self, link: Link, path: str, hello: Hello) -> Descriptor | None:
        """Validate a connecting peer; reply on ``link``. Returns its descriptor if accepted."""
        try:
            desc = Descriptor.from_msgpack(hello.descriptor)
            self._check_peer(desc)
        except Exception as exc:
            if self._secret is not None:
                log.warning("kvlane transport %s: refused a hello from %s on path %s: %s", self.key, _addr(link),
                            path, exc)
            self._reply(link, HelloErr(key=self.key, error=f"{type(exc).__name__}: {exc}"))
            return None
        if self._secret is None:
            self._reply(link, HelloOk(key=self.key))
            return desc
        if hello.nonce is None:
            self._refuse(link, path, f"AuthError: {self.key} requires authentication and the hello from {desc.key} "
                                     "carries no nonce (no shared secret configured on the sender?)")
            return None
        for old, other in list(self._pending.items()):  # a new hello on a link supersedes its open challenge
            if other.link is link:
                if other.timer is not None:
                    other.timer.cancel()
                del self._pending[old]
        if len(self._pending) >= MAX_PENDING_CHALLENGES:
            self._refuse(link, path, f"AuthError: {self.key} has {len(self._pending)} unanswered challenges open; "
                                     "try again later")
            return None
        nonce = auth.new_nonce()
        pend = _Pending(link, path, desc, hello.descriptor, hello.nonce, nonce)
        pend.timer = self._loop.call_later(self.config.connect_timeout_s, self._auth_timeout, nonce)
        self._pending[nonce] = pend
        self._reply(link, Challenge(key=self.key, nonce=nonce))
        return None  # identified only once the AUTH checks out (on_auth)

    def on_auth(self, link: Link | None, path: str, msg: Auth) -> tuple[Link, Descriptor] | None:
        """Check a sender's answer to our challenge. ``link`` is the connection it came on (tcp) or None
        (ucx: control messages arrive on the worker). Returns the now authenticated link and descriptor."""
        pend = self._pending.get(msg.nonce)
        if pend is None or pend.path != path or pend.desc.key != msg.key or (link is not None and pend.link is not link):
            where = _addr(link) if link is not None else f"a ucx endpoint claiming {msg.key}"
            why = ("AuthError: answer to an unknown or already used challenge (replayed?)" if pend is None
                   else "AuthError: answer to a challenge sent to another connection (replayed?)")
            if link is not None:
                self._refuse(link, path, why)
            else:
                log.warning("kvlane transport %s: refused an AUTH from %s on path %s: %s", self.key, where, path, why)
            return None
        del self._pending[msg.nonce]
        if pend.timer is not None:
            pend.timer.cancel()
        assert self._secret is not None
        bind = (pend.descriptor, self.key, path)
        if not auth.check(auth.sender_mac(self._secret, pend.nonce, pend.sender_nonce, *bind), msg.mac):
            self._refuse(pend.link, path, f"AuthError: the handshake answer from {msg.key} does not prove our shared "
                                          "secret (wrong secret on one side?)")
            return None
        self._rx_sessions[(path, pend.desc.key)] = _Session(
            auth.session_key(self._secret, pend.nonce, pend.sender_nonce, *bind))
        self._reply(pend.link, HelloOk(key=self.key, mac=auth.receiver_mac(
            self._secret, pend.sender_nonce, pend.nonce, *bind)))
        log.info("kvlane transport %s: %s authenticated on path %s", self.key, pend.desc.key, path)
        return pend.link, pend.desc

    def _auth_timeout(self, nonce: bytes) -> None:
        pend = self._pending.pop(nonce, None)
        if pend is not None:
            log.warning("kvlane transport %s: %s (claiming %s) did not answer the challenge on path %s within %ss; "
                        "closing", self.key, _addr(pend.link), pend.desc.key, pend.path, self.config.connect_timeout_s)
            pend.link.close()

    def _refuse(self, link: Link, path: str, error: str) -> None:
        """Refuse an unauthenticated peer: log it with its address, tell it why, close its link."""
        log.warning("kvlane transport %s: refused %s on path %s: %s; closing", self.key, _addr(link), path, error)

        async def tell_then_close() -> None:
            try:
                await asyncio.wait_for(link.send_ctrl(HelloErr(key=self.key, error=error[:4000])), 1.0)
                await asyncio.sleep(0.1)  # let the refusal reach the peer before the close does
            except Exception as exc:
                log.info("kvlane transport %s: refusal to %s not delivered: %s", self.key, _addr(link), exc)
            finally:
                link.close()

        task = asyncio.ensure_future(tell_then_close())
        self._refusals.add(task)
        task.add_done_callback(self._refusals.discard)

    def _seal(self, msg: Wire, path: str, offer: Offer | None) -> Wire:
        """With a secret: a reply to ``offer`` carries the session MAC bound to that offer's seq and tag base."""
        if self._secret is None or offer is None or offer.seq is None:
            return msg
        sess = self._rx_sessions.get((path, offer.sender))
        if sess is None:
            return msg
        return msg.model_copy(update={"mac": auth.reply_mac(sess.key, msg.to_msgpack(), offer.seq, offer.tag_base)})

    def _reply_refusal(self, msg: Ready | Reject | Done | Fail) -> str | None:
        """Sender side, secret set: why a reply to our offer is not from the authenticated receiver, or None."""
        bound = self._reply_keys.get(msg.tid)
        if bound is None:
            return "no offer of ours is waiting for it"
        key, seq, tag_base = bound
        if not auth.check(auth.reply_mac(key, msg.model_copy(update={"mac": None}).to_msgpack(), seq, tag_base),
                          msg.mac):
            return "missing or wrong session MAC"
        return None

    def _offer_refusal(self, link: Link, path: str, offer: Offer) -> str | None:
        """Why an offer may not arm receives (secret set), or None if it comes from an authenticated session."""
        sess = self._rx_sessions.get((path, offer.sender))
        if sess is None:
            return "no authenticated handshake with that sender on this path"
        if link.peer_key != offer.sender:
            return f"it arrived on the link of {link.peer_key}"
        if offer.seq is None or offer.mac is None:
            return "it carries no session MAC"
        if not auth.check(auth.offer_mac(sess.key, offer.model_copy(update={"mac": None}).to_msgpack()), offer.mac):
            return "its session MAC is wrong"
        return None

    def _seq_refusal(self, path: str, offer: Offer) -> str | None:
        """Secret set, offer authentic and not a copy of one we hold: why its sequence number is refused."""
        sess = self._rx_sessions[(path, offer.sender)]
        assert offer.seq is not None  # checked by _offer_refusal
        if not sess.seqs.accept(offer.seq):
            return f"its sequence number {offer.seq} was already used (replayed?)"
        return None

    def on_control(self, link: Link | None, path: str, msg: Wire) -> None:
        if isinstance(msg, (HelloOk, HelloErr, Challenge)):
            q = self._waiters.get(f"hello:{path}:{msg.key}")
        elif isinstance(msg, Offer):
            if link is None:
                log.warning("kvlane transport %s: offer %s from unknown sender %s", self.key, msg.tid, msg.sender)
                return
            self._on_offer(link, path, msg)
            return
        elif isinstance(msg, (Ready, Reject, Done, Fail)):
            q = self._waiters.get(msg.tid)
            if q is not None and self._secret is not None:
                why = self._reply_refusal(msg)
                if why is not None:  # e.g. a forged DONE: the push keeps waiting for the real answer
                    log.warning("kvlane transport %s: refused %s for %s on path %s: %s", self.key, msg.t, msg.tid,
                                path, why)
                    return
        else:
            log.warning("kvlane transport %s: unexpected control message %s", self.key, msg.t)
            return
        if q is not None:
            q.put_nowait(msg)

    def _on_offer(self, link: Link, path: str, offer: Offer) -> None:
        if self._secret is not None:
            why = self._offer_refusal(link, path, offer)
            if why is not None:  # nothing is armed, nothing answered: the offer never happened
                log.warning("kvlane transport %s: refused offer %s (claiming sender %s) from %s on path %s: %s",
                            self.key, offer.tid, offer.sender, _addr(link), path, why)
                return
        if self._repeated_offer(link, path, offer):
            return
        if self._secret is not None:
            why = self._seq_refusal(path, offer)
            if why is not None:
                log.warning("kvlane transport %s: refused offer %s (claiming sender %s) from %s on path %s: %s",
                            self.key, offer.tid, offer.sender, _addr(link), path, why)
                return
        e = self._expects.get(offer.tid)
        if e is not None and e.state == "waiting":
            self._bind(e, link, offer, path)
            return
        if e is not None or offer.tid in self._offers:
            self._reply(link, self._seal(Reject(tid=offer.tid, error=f"transfer {offer.tid!r} is already in progress here"),
                                         path, offer))
            return
        ended = self._ended.get(offer.tid)
        if ended is not None:  # the expect is over: say so now rather than hold the offer until the sender's deadline
            ago = time.monotonic() - ended.at
            what = f"ended {ago:.1f}s before this offer arrived: " + (
                "its bytes were already received from another offer" if ended.ok else str(ended.error))
            self._reply(link, self._seal(Reject(tid=offer.tid, error=f"expect({offer.tid!r}) on {self.key} {what}"),
                                         path, offer))
            return
        hold = min(offer.wait_s, self.config.offer_hold_s)

        def drop() -> None:
            if self._offers.pop(offer.tid, None) is not None:
                self._reply(link, self._seal(Reject(tid=offer.tid, error=f"no expect({offer.tid!r}) on {self.key} within "
                                                                      f"{hold}s"), path, offer))

        self._offers[offer.tid] = _HeldOffer(link, offer, path, self._loop.call_later(hold, drop))

    def _repeated_offer(self, link: Link, path: str, offer: Offer) -> bool:
        """True if ``offer`` is a byte-identical copy of one this receiver already took (the sender repeats an
        unanswered offer, `_offer_reply`); it is then answered from the state it created, never bound twice.
        With a secret only an authentic offer gets here, and a copy can only repeat an answer already given
        for that very offer (the replies' MACs bind its seq and tag base): no replay can arm anything."""
        wire = offer.to_msgpack()
        e = self._expects.get(offer.tid)
        if e is not None:
            if e.offer is None or e.offer.to_msgpack() != wire:
                return False
            if e.state == "receiving":  # our READY may be what got lost
                self._reply(link, self._seal(Ready(tid=offer.tid), path, offer))
            return True  # abandoning: the FAIL is on its way
        held = self._offers.get(offer.tid)
        if held is not None:
            return held.offer.to_msgpack() == wire  # still waiting for expect(): nothing to say yet
        ended = self._ended.get(offer.tid)
        if ended is None or ended.offer is None or ended.offer.to_msgpack() != wire:
            return False
        final: Wire = (Done(tid=offer.tid, nbytes=ended.nbytes) if ended.ok
                       else Fail(tid=offer.tid, error=str(ended.error)))
        self._reply(link, self._seal(final, path, offer))
        return True

    def on_link_dead(self, link: Link, reason: str) -> None:
        self._tx_sessions.pop(link, None)
        for nonce, pend in list(self._pending.items()):
            if pend.link is link:
                if pend.timer is not None:
                    pend.timer.cancel()
                del self._pending[nonce]
        for e in list(self._expects.values()):
            if e.link is link and e.state == "receiving":
                link.disarm(e.tid)
                self._finish_expect(e, False, f"link to sender {link.peer_key} broke: {reason}")
        for tid, held in list(self._offers.items()):
            if held.link is link:
                held.timer.cancel()
                del self._offers[tid]


async def _next(q: asyncio.Queue[Wire], link: Link, timeout: float | None) -> Wire:
    """Next reply for this waiter, or PeerError as soon as the link breaks."""
    get = asyncio.ensure_future(q.get())
    try:
        done, _ = await asyncio.wait({get, link.dead}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not get.done():
            get.cancel()
    if get in done:
        return get.result()
    if link.dead.done():
        raise PeerError(f"link to {link.peer_key} broke: {link.dead.result()}")
    raise TimeoutError


def _resolve(fut: concurrent.futures.Future[TransferResult], res: TransferResult) -> None:
    if not fut.done():
        fut.set_result(res)


def resolve_backend(backend: str) -> str:
    """``auto`` → ``ucx`` when ucxx is importable, else ``tcp``."""
    if backend != "auto":
        return backend
    import importlib.util

    return "ucx" if importlib.util.find_spec("ucxx") is not None else "tcp"


def _check_deadline(deadline_s: float) -> None:
    if not isinstance(deadline_s, (int, float)) or not 0 < deadline_s < 86400:
        raise ValueError(f"deadline_s must be a positive number of seconds, got {deadline_s!r}")


def _check_tid(tid: str) -> None:
    if not isinstance(tid, str) or not 1 <= len(tid) <= 256 or not re.fullmatch(r"[A-Za-z0-9_.:/@\-]+", tid):
        raise ValueError(f"transfer id {tid!r} must be 1-256 characters of [A-Za-z0-9_.:/@-]")


def _short(spans: list[tuple[int, int, int]]) -> str:
    return str(spans[:4])[:-1] + (f", … {len(spans) - 4} more]" if len(spans) > 4 else "]")


def _raise_type(error: str) -> type[Exception]:
    if error.startswith("RankMismatchError"):
        return RankMismatchError
    if error.startswith("LayoutMismatchError"):
        return LayoutMismatchError
    if error.startswith("AuthError"):
        return AuthError
    return PeerError


__all__ = ["KVTransport", "PeerHandle", "RankMismatchError", "Link", "Backend", "Data"]
