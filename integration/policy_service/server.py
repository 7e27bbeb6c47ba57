"""The policy service's TCP front: asyncio server speaking the framed msgpack protocol of `protocol.py`, with
optional HMAC authentication, plus the optional Prometheus `/metrics` HTTP endpoint. Runs in the
policy-service process (`kvlane policy serve`). A bad client can only lose its own connection: it must never
stall the loop, exhaust memory past the frame limit, or affect other connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
from typing import Any

from aiohttp import web
from kvlane.policy.types import PolicyError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import protocol as P
from .service import PolicyService

log = logging.getLogger("kvlane.policy_service")


def is_loopback(host: str) -> bool:
    """True when `host` only reaches this machine: `localhost` or a loopback IP (127.0.0.0/8, ::1). Any
    other name may resolve to a routable address, and "" / 0.0.0.0 / :: mean every interface."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, secret: bytes | None, what: str = "policy service") -> str | None:
    """The warning to log when `host` is reachable from other machines and no shared secret is set (anyone
    who can reach the port can then register engines, take leases and steer pairing), else None."""
    if secret is not None or is_loopback(host):
        return None
    where = "ALL interfaces" if host in ("", "0.0.0.0", "::", "[::]") else f"non-loopback address {host!r}"
    return (f"{what} binding to {where} WITHOUT a shared secret: any host that reaches this port can steer "
            "the policy. Set --secret-file / $KVLANE_SECRET, or bind 127.0.0.1 (the default).")


class PolicyServer:
    """Serve one PolicyService on `tcp://host:port` (port 0 picks a free one; see `.address` after start)."""

    def __init__(
        self,
        service: PolicyService,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        secret: bytes | None = None,
        max_frame: int = P.DEFAULT_MAX_FRAME,
        max_connections: int = 1024,
        max_waiters: int = 256,
        frame_timeout: float = 30.0,
        metrics_port: int | None = None,
        metrics_host: str | None = None,
    ) -> None:
        if not 16 <= max_frame <= P.MAX_FRAME_CEILING:
            raise ValueError(f"max_frame must be within 16..{P.MAX_FRAME_CEILING}, got {max_frame}")
        if secret is not None and len(secret) == 0:
            raise ValueError("an empty secret is not a secret; pass None to disable authentication")
        self.service = service
        self.host = host
        self.port = port
        self.secret = secret
        self.max_frame = max_frame
        self.max_connections = max_connections
        self.max_waiters = max_waiters
        self.frame_timeout = frame_timeout
        self.metrics_port = metrics_port
        self.metrics_host = metrics_host or host
        self._server: asyncio.base_events.Server | None = None
        self._metrics_runner: web.AppRunner | None = None
        self._conns: set[asyncio.Task[Any]] = set()
        #: Identifies this start of the server (sent in every hello; see PolicyClient's re-registration).
        self.boot = os.urandom(8)

    @property
    def address(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    @property
    def metrics_address(self) -> str | None:
        return None if self.metrics_port is None else f"http://{self.metrics_host}:{self.metrics_port}/metrics"

    async def start(self) -> None:
        warning = exposure_warning(self.host, self.secret)
        if warning is not None:
            log.warning("!!! %s", warning)
        if self.metrics_port is not None and not is_loopback(self.metrics_host):
            log.warning("policy service metrics (read-only, unauthenticated) exposed on %s", self.metrics_host)
        self._server = await asyncio.start_server(self._on_connect, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        if self.metrics_port is not None:
            await self._start_metrics()
        self.service.start()

    async def __aenter__(self) -> PolicyServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def serve_forever(self) -> None:
        assert self._server is not None, "start() first"
        await self._server.serve_forever()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        for task in list(self._conns):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
            self._metrics_runner = None
        await self.service.stop()

    # ---------------------------------------------------------------------------------------- metrics

    async def _start_metrics(self) -> None:
        registry = self.service.metrics.registry

        async def metrics(_request: web.Request) -> web.Response:
            return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.metrics_host, self.metrics_port)
        await site.start()
        self._metrics_runner = runner
        server = getattr(site, "_server", None)
        if self.metrics_port == 0 and server is not None and server.sockets:
            self.metrics_port = server.sockets[0].getsockname()[1]

    # ---------------------------------------------------------------------------------------- connections

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        self.service.metrics.connections.inc()
        try:
            await _Connection(self, reader, writer).run()
        except asyncio.CancelledError:
            pass
        finally:
            self.service.metrics.connections.dec()
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class _Connection:
    """One client connection: hello, then a loop of frames. Ordinary ops run to completion in arrival order
    (they never wait); a long poll (await_announce) runs as its own task, at most `max_waiters` per
    connection, so it never holds up the ops behind it. A peer that does not read its replies stalls only
    its own connection (the loop waits for the write buffer to drain before reading more)."""

    def __init__(self, server: PolicyServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.service = server.service
        self.reader = reader
        self.writer = writer
        self.nonce = os.urandom(P.NONCE_BYTES)
        self.last_id = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.write_lock = asyncio.Lock()
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)

    async def send(self, obj: dict[str, Any]) -> None:
        try:
            frame = P.encode_frame(obj, self.server.max_frame)
        except P.FrameTooLarge as exc:
            self.service.metrics.errors.labels(code=exc.code).inc()
            msg = f"reply too large: {exc} (a snapshot shrinks with max_paths / hottest)"
            frame = P.encode_frame(P.error_reply(obj.get("id", 0), exc.code, msg))
        except (ValueError, TypeError, OverflowError) as exc:  # a reply msgpack cannot encode: a bug, not a crash
            log.error("reply %r to %s not encodable: %s", str(obj)[:200], self.peer, exc)
            self.service.metrics.errors.labels(code="internal").inc()
            frame = P.encode_frame(P.error_reply(obj.get("id", 0), "internal", f"reply not encodable: {exc}"))
        async with self.write_lock:
            self.writer.write(frame)
            await self.writer.drain()

    async def fail(self, req_id: int, exc: PolicyError) -> None:
        self.service.metrics.errors.labels(code=exc.code).inc()
        await self.send(P.error_reply(req_id, exc.code, str(exc)))

    async def run(self) -> None:
        if len(self.server._conns) > self.server.max_connections:
            await self.fail(0, P.Busy(f"too many connections (limit {self.server.max_connections})"))
            return
        await self.send(P.hello_frame(self.nonce, self.server.secret is not None, self.server.max_frame,
                                      self.server.boot))
        try:
            await self._loop()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            for task in list(self.tasks):
                task.cancel()
            for task in list(self.tasks):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _loop(self) -> None:
        secret = self.server.secret
        while True:
            try:
                data = await P.read_frame(self.reader, self.server.max_frame, self.server.frame_timeout)
            except (P.FrameTooLarge, P.FrameTimeout) as exc:
                log.warning("closing connection from %s: %s", self.peer, exc)
                await self.fail(0, exc)
                return
            except asyncio.IncompleteReadError:
                return  # EOF (clean between frames, or a truncated frame: either way this connection is done)
            obj: Any = None
            try:
                obj = P.decode_body(data, self.server.max_frame)
                env = P.parse_request(obj)
            except P.BadRequest as exc:
                raw_id = obj.get("id") if isinstance(obj, dict) else None
                req_id = raw_id if isinstance(raw_id, int) and 0 < raw_id < (1 << 63) else 0
                await self.fail(req_id, exc)
                if secret is not None:
                    log.warning("refused %s: unauthenticated malformed frame (%s); closing", self.peer, exc)
                    return  # an unauthenticated peer does not get to keep sending junk
                continue
            if secret is not None:
                if not P.verify_mac(secret, self.nonce, env):
                    why = "missing" if env.auth is None else "wrong"
                    log.warning("refused %s: %s MAC on request %d (op %.64r); closing", self.peer, why, env.id, env.op)
                    await self.fail(env.id, P.AuthFailed(f"{why} request MAC; closing the connection"))
                    return
                if env.id <= self.last_id:
                    log.warning("refused %s: request id %d not above %d (replay?); closing", self.peer, env.id,
                                self.last_id)
                    await self.fail(
                        env.id, P.AuthFailed(f"request id {env.id} not above {self.last_id} (replay?); closing")
                    )
                    return
                self.last_id = env.id
            fault = self.service.message_fault(env.op)
            if fault is not None and fault[0] == "drop_request":
                continue  # lost on the way in: never executed, never answered (the client's deadline fires)
            if env.op == "await_announce":
                if len(self.tasks) >= self.server.max_waiters:
                    await self.fail(env.id, P.Busy(
                        f"{len(self.tasks)} await_announce calls already waiting on this connection "
                        f"(limit {self.server.max_waiters}); retry later or use another connection"))
                    continue
                task = asyncio.get_running_loop().create_task(self._serve(env, fault))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            else:
                await self._serve(env, fault)

    async def _serve(self, env: P.RequestEnvelope, fault: tuple[str, float] | None = None) -> None:
        try:
            reply = P.ok_reply(env.id, await self.service.dispatch(env.op, env.body))
        except PolicyError as exc:  # dispatch already counted it
            reply = P.error_reply(env.id, exc.code, str(exc))
        if fault is not None:
            if fault[0] == "drop_reply":
                return  # executed, but the answer is lost
            if fault[0] == "delay_reply":  # ordinary ops: also holds up the ops behind it, as a slow link would
                await asyncio.sleep(fault[1])
        with contextlib.suppress(ConnectionError):  # the peer left; the read loop sees EOF and ends
            await self.send(reply)
