"""UCX backend of kvlane.transport (ucxx 0.52): one UCX context + worker per path (its own UCX_TLS /
UCX_NET_DEVICES), endpoints by worker address with peer error handling on, control messages on one
tag per worker, KV runs as tagged sends received in place into the destination views (zero-copy on
receive). Runs inside KVTransport's loop thread in blocking progress mode; never uses a listener
(FACTS.md: listener connect with error handling degrades to TCP).
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import PathConfig
from .wire import (
    MAX_CONTROL_BYTES,
    Auth,
    Descriptor,
    Hello,
    Offer,
    PathAddress,
    Wire,
    WireError,
    decode_control,
    encode_control,
)

if TYPE_CHECKING:
    from .core import KVTransport

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
os.environ.setdefault("UCX_MM_ERROR_HANDLING", "y")

import ucxx  # noqa: E402,F401  (sets UCX env defaults at import; must follow ours)
import ucxx._lib.libucxx as ucx_api  # noqa: E402
from ucxx._lib_async import ApplicationContext  # noqa: E402
from ucxx._lib_async.application_context import ProgressTasks  # noqa: E402
from ucxx._lib_async.continuous_ucx_progress import BlockingMode, ThreadMode  # noqa: E402
from ucxx.types import Tag  # noqa: E402

log = logging.getLogger("kvlane.transport.ucx")
#: KVLANE_UCX_TRACE=1: one stderr line per control message, endpoint creation and send completion, with
#: wall-clock milliseconds and pid, so that a slow handshake inside vLLM (whose logging hides ours) can be
#: lined up across processes and with UCX's own UCX_LOG_LEVEL=debug log (docs/transport.md, "TCP path
#: handshakes").
_trace = logging.getLogger("kvlane.transport.ucx.trace")
if os.environ.get("KVLANE_UCX_TRACE"):
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d kvlane-ucx-trace pid %(process)d %(message)s",
                                            "%H:%M:%S"))
    _trace.addHandler(_handler)
    _trace.setLevel(logging.DEBUG)
    _trace.propagate = False
#: Control messages of every peer arrive on this tag ("kvlane" + 0x0001); data tags are random per transfer.
CTRL_TAG = 0x6B766C616E650001
_LEN = struct.Struct("<I")
#: Receives (and, via max_inflight_sends, sends) in flight per transfer; below ucxx's pool of 100 futures.
POST_WINDOW = 48


@dataclass(eq=False)
class _Arm:
    tasks: list[asyncio.Future[Any]]
    fut: asyncio.Future[None]


class UcxLink:
    def __init__(self, backend: UcxBackend, peer_key: str, ep: Any) -> None:
        self.backend = backend
        self.peer_key = peer_key
        self.ep = ep
        self.loop = asyncio.get_running_loop()
        self.dead: asyncio.Future[str] = self.loop.create_future()
        self._arms: dict[str, _Arm] = {}
        ep.set_close_callback(self._on_close)

    def _on_close(self, *args: Any) -> None:
        # UCX calls this from progress (our loop thread in blocking mode); stay thread-safe anyway.
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._kill, "UCX endpoint error or close (peer gone?)")

    async def send_ctrl(self, msg: Wire) -> None:
        data = encode_control(msg)
        t0 = time.perf_counter()
        _trace.debug("%s send %s to %s start", self.backend.path, msg.t, self.peer_key)
        try:
            await self._send(np.frombuffer(_LEN.pack(len(data)) + data, dtype=np.uint8), CTRL_TAG)
        finally:
            _trace.debug("%s send %s to %s done after %.3fs", self.backend.path, msg.t, self.peer_key, time.perf_counter() - t0)

    async def _send(self, view: Any, tag: int) -> None:
        if self.dead.done():
            raise ConnectionError(f"link to {self.peer_key} is down: {self.dead.result()}")
        self.backend.top_up()
        # UCX reads `view` until the request completes, which can be long after our caller stopped waiting
        # (a reply's 5 s wait_for, a push deadline): a send on an endpoint still wiring up (UCX tcp) waits in
        # UCX's pending queue and copies the bytes only then. The send therefore runs in a task the backend
        # keeps (its frame holds `view`) and we only stop *waiting* for it; cancelling the send itself
        # freed the buffer and the peer later got whatever reused that memory (docs/transport.md).
        send = self.backend.keep(self.ep.send(view, tag=Tag(tag), force_tag=True))
        try:
            await asyncio.shield(send)
        except ucx_api.UCXError as exc:
            self._kill(f"{type(exc).__name__}: {exc}")
            raise ConnectionError(f"send to {self.peer_key} failed: {exc}") from None

    async def send_runs(self, tid: str, tag_base: int, views: list[Any]) -> None:
        sem = asyncio.Semaphore(self.backend.core.config.max_inflight_sends)

        async def one(i: int, v: Any) -> None:
            async with sem:
                await self._send(v, tag_base + i)

        tasks = [asyncio.ensure_future(one(i, v)) for i, v in enumerate(views)]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()

    def arm_recv(self, tid: str, tag_base: int, views: list[Any]) -> asyncio.Future[None]:
        fut = self.loop.create_future()
        if self.dead.done():
            fut.set_exception(ConnectionError(f"link is down: {self.dead.result()}"))
            return fut
        # Receives are posted on this endpoint so that closing it cancels them (ucxx tracks them per ep),
        # at most POST_WINDOW at a time (ucxx's futures pool holds 100; a sender's run that arrives
        # before its receive is posted waits in UCX's unexpected queue).
        window = asyncio.Semaphore(POST_WINDOW)
        ep = self.ep

        async def one(i: int, v: Any) -> None:
            async with window:
                self.backend.top_up()
                await ep.recv(v, tag=Tag(tag_base + i), force_tag=True)

        tasks = [asyncio.ensure_future(one(i, v)) for i, v in enumerate(views)]
        arm = _Arm(tasks, fut)
        self._arms[tid] = arm

        def done(g: asyncio.Future[Any]) -> None:
            self._arms.pop(tid, None)
            exc = None if g.cancelled() else g.exception()  # always retrieved
            if fut.done():
                return
            if g.cancelled():
                fut.cancel()
            elif exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(None)

        asyncio.gather(*tasks, return_exceptions=False).add_done_callback(done)
        return fut

    def disarm(self, tid: str) -> None:
        arm = self._arms.pop(tid, None)
        if arm is None:
            return
        if not all(t.done() for t in arm.tasks):
            # A posted UCX receive cannot be withdrawn on its own: close the endpoint, which cancels
            # it, so that late bytes can never land in KV blocks that are about to be reused. The
            # next offer from this sender reopens a link (the backend remembers its address).
            self._kill(f"transfer {tid} abandoned with receives still posted")
        if not arm.fut.done():
            arm.fut.cancel()

    def _kill(self, reason: str) -> None:
        if self.dead.done():
            return
        self.dead.set_result(reason)
        for tid in list(self._arms):
            arm = self._arms.pop(tid)
            if not arm.fut.done():
                arm.fut.set_exception(ConnectionError(reason))
        ep, self.ep = self.ep, None
        if ep is not None:
            try:
                ep.abort(period=10**8)
            except Exception as exc:  # closing a broken endpoint may itself complain
                log.debug("abort of endpoint to %s: %s", self.peer_key, exc)
        self.backend.forget(self)
        self.backend.core.on_link_dead(self, reason)

    def close(self) -> None:
        self._kill("closed locally")


class UcxBackend:
    def __init__(self, core: KVTransport, path: str, cfg: PathConfig) -> None:
        self.core = core
        self.path = path
        self.cfg = cfg
        self.ctx: Any = None
        self._progress: Any = None
        self._ctrl: asyncio.Task[None] | None = None
        self._reverse: dict[str, UcxLink] = {}  # sender key → link we reply on
        self._senders: dict[str, bytes] = {}  # sender key → its worker address (to reopen)
        self._links: set[UcxLink] = set()
        self._sends: set[asyncio.Future[Any]] = set()  # sends UCX may still read from (see UcxLink._send)
        self._ctrl_buf = np.zeros(_LEN.size + MAX_CONTROL_BYTES, dtype=np.uint8)

    async def start(self) -> PathAddress:
        loop = asyncio.get_running_loop()
        options = {**self.core.config.ucx_defaults, **self.cfg.ucx}
        mode = self.core.config.ucx_progress_mode
        # thread mode: ucxx's progress thread + Python futures resolved by its notifier thread. Without
        # futures every pending request is awaited by a sleep(0) loop (ucxx wait_yield), and our control
        # receive is always pending: ~25 % of a core per idle process, measured.
        self.ctx = ApplicationContext(config_dict=options, progress_mode=mode,
                                      enable_python_future=(mode == "thread"))
        if mode == "thread":
            self.ctx.worker.populate_python_futures_pool()  # before the first request (else ucxx warns)
        task = ProgressTasks.get(loop)
        if task is None or task.worker is not self.ctx.worker:
            # ucxx keeps one progress task per event loop; a second path on the same loop needs its own.
            task = BlockingMode(self.ctx.worker, loop) if mode == "blocking" else ThreadMode(self.ctx.worker, loop)
        self._progress = task  # strong ref: ucxx clears its global table when any context dies
        self._ctrl = asyncio.ensure_future(self._ctrl_loop())
        return PathAddress(ucx_address=bytes(self.ctx.worker_address.tobytes()))

    async def _endpoint(self, address: bytes) -> Any:
        addr = ucx_api.UCXAddress.create_from_buffer(address)
        t0 = time.perf_counter()
        try:
            return await self.ctx.create_endpoint_from_worker_address(addr, endpoint_error_handling=True)
        finally:
            _trace.debug("%s %s: endpoint created in %.3fs", self.path, self.core.key, time.perf_counter() - t0)

    async def open(self, peer_key: str, addr: PathAddress, hello: Hello) -> UcxLink:
        if addr.ucx_address is None:
            raise OSError(f"peer {peer_key} published no UCX worker address for path {self.path!r}")
        link = UcxLink(self, peer_key, await self._endpoint(addr.ucx_address))
        self._links.add(link)
        await link.send_ctrl(hello)
        return link

    async def _ctrl_loop(self) -> None:
        buf = self._ctrl_buf  # lives as long as the backend: a receive posted at stop() may still be filled
        while True:
            try:
                self.top_up()
                await self.ctx.recv(buf, Tag(CTRL_TAG))
                (n,) = _LEN.unpack(buf[: _LEN.size].tobytes())
                if n > MAX_CONTROL_BYTES:
                    raise WireError(f"control message claims {n} bytes")
                msg = decode_control(buf[_LEN.size: _LEN.size + n].tobytes())
                _trace.debug("%s %s: received %s", self.path, self.core.key, msg.t)
                await self._dispatch(msg)
            except asyncio.CancelledError:
                return
            except Exception as exc:  # one bad message must not stop the control plane
                log.warning("ucx path %s of %s: dropped a control message: %s", self.path, self.core.key, exc)

    async def _dispatch(self, msg: Wire) -> None:
        if isinstance(msg, Hello):
            desc = Descriptor.from_msgpack(msg.descriptor)
            addr = desc.paths.get(self.path)
            if addr is None or addr.ucx_address is None:
                raise WireError(f"hello from {desc.key} carries no UCX address for path {self.path!r}")
            link = UcxLink(self, desc.key, await self._endpoint(addr.ucx_address))
            self._links.add(link)
            if self.core.on_hello(link, self.path, msg) is not None:
                self._adopt(link, desc.key, addr.ucx_address)
            # with a secret the new link waits for the AUTH (core closes it if none comes); offers from
            # this sender keep using the previous authenticated link until then
        elif isinstance(msg, Auth):
            got = self.core.on_auth(None, self.path, msg)
            if got is not None:
                link, desc = got
                address = desc.paths[self.path].ucx_address
                assert address is not None  # checked on the hello
                self._adopt(link, desc.key, address)
        elif isinstance(msg, Offer):
            link = self._reverse.get(msg.sender)
            if link is None and msg.sender in self._senders:
                link = UcxLink(self, msg.sender, await self._endpoint(self._senders[msg.sender]))
                self._links.add(link)
                self._reverse[msg.sender] = link
            self.core.on_control(link, self.path, msg)
        else:
            self.core.on_control(None, self.path, msg)

    def _adopt(self, link: UcxLink, key: str, address: bytes) -> None:
        """``link`` (an accepted hello) becomes the one offers from ``key`` arm receives on."""
        old = self._reverse.pop(key, None)
        if old is not None and old is not link:
            old.close()
        self._reverse[key] = link
        self._senders[key] = address

    def top_up(self) -> None:
        """Refill ucxx's pool of Python futures before a request (thread mode): its notifier refills it
        only periodically, and a dry pool makes ucxx print a warning per request."""
        if self.ctx is not None and self.core.config.ucx_progress_mode == "thread":
            self.ctx.worker.populate_python_futures_pool()

    def keep(self, send: Any) -> asyncio.Future[Any]:
        """Run the send coroutine ``send`` to completion even if whoever awaits it gives up; returns its task."""
        task = asyncio.ensure_future(send)
        self._sends.add(task)
        task.add_done_callback(self._sent)
        return task

    def _sent(self, task: asyncio.Future[Any]) -> None:
        self._sends.discard(task)
        if not task.cancelled() and task.exception() is not None:  # retrieved: the waiter may have gone
            log.debug("ucx path %s: send finished with %s", self.path, task.exception())

    def forget(self, link: UcxLink) -> None:
        self._links.discard(link)
        if self._reverse.get(link.peer_key) is link:
            del self._reverse[link.peer_key]

    async def stop(self) -> None:
        if self._ctrl is not None:
            self._ctrl.cancel()
            try:
                await self._ctrl
            except BaseException:
                pass
        for link in list(self._links):
            link.close()
        if self._sends:  # aborted endpoints cancel their sends; let those finish before the worker goes
            await asyncio.wait(list(self._sends), timeout=1.0)
        self._reverse.clear()
        self._senders.clear()
        if self.ctx is not None:
            if self.core.config.ucx_progress_mode == "thread":
                t0 = time.perf_counter()
                await asyncio.to_thread(self.ctx.stop_notifier_thread)
                t1 = time.perf_counter()
                await asyncio.to_thread(self.ctx.worker.stop_progress_thread)
                log.debug("ucx path %s: notifier stopped in %.3fs, progress thread in %.3fs", self.path,
                          t1 - t0, time.perf_counter() - t1)
            self.ctx = None
