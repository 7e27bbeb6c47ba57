"""Clients of the policy service, all with one typed API: `PolicyClient` (asyncio, TCP, multiplexed by
request id, per-call deadline, reconnects), `SyncPolicyClient` (the same calls from plain threads, e.g.
vLLM's synchronous scheduler hooks, run on a private event-loop thread) and `EmbeddedPolicy` (in-process,
no sockets). Runs in router / connector / CLI processes; never decides anything itself, never pickles.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Literal, TypeVar

import msgpack
from kvlane.policy.types import (
    EngineInfo,
    LeaseDenied,
    LeaseGrant,
    LeaseRequest,
    LoadReport,
    PairDecision,
    PairRequest,
    PolicyError,
    SchemaError,
    TransferOutcome,
    WireModel,
)

from . import protocol as P
from .service import PolicyService

log = logging.getLogger("kvlane.policy_client")

T = TypeVar("T")
W = TypeVar("W", bound=WireModel)


def parse_address(address: str) -> tuple[str, int]:
    """`tcp://HOST:PORT` (IPv6 as `tcp://[::1]:PORT`) -> (host, port). Raises ValueError naming the problem."""
    prefix = "tcp://"
    if not address.startswith(prefix):
        raise ValueError(f"policy address {address!r} must look like tcp://HOST:PORT")
    rest = address[len(prefix):].rstrip("/")
    host, sep, port_s = rest.rpartition(":")
    if not sep or not host or not port_s.isdigit():
        raise ValueError(f"policy address {address!r} must look like tcp://HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_s)
    if not 0 < port < 65536:
        raise ValueError(f"policy address {address!r}: port {port} out of range")
    return host, port


def _reply(model: type[W], body: dict[str, Any]) -> W:
    try:
        return model.from_wire(body)
    except SchemaError as exc:
        raise P.ServiceError(f"server sent an invalid reply: {exc}", code="bad_reply") from None


def _body(model: type[W], **fields: Any) -> dict[str, Any]:
    """Build and validate a request body client-side; a bad argument raises BadRequest naming the field."""
    try:
        return model.from_wire(fields).to_wire()
    except SchemaError as exc:
        raise P.BadRequest(f"invalid body: {exc}") from None


class PolicyApi:
    """The typed calls, shared by every client; subclasses implement `_call(op, body, timeout)`."""

    async def _call(self, op: str, body: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        raise NotImplementedError

    async def ping(self, timeout: float | None = None) -> float:
        """Round trip; returns the server clock's `now`."""
        return _reply(P.PingReply, await self._call("ping", {}, timeout)).server_time

    async def register_engine(self, info: EngineInfo, timeout: float | None = None) -> None:
        await self._call("register_engine", info.to_wire(), timeout)

    async def remove_engine(self, engine_id: str, timeout: float | None = None) -> bool:
        body = await self._call("remove_engine", {"engine_id": engine_id}, timeout)
        return _reply(P.RemovedReply, body).removed

    async def engines(self, timeout: float | None = None) -> list[EngineInfo]:
        return _reply(P.EnginesReply, await self._call("list_engines", {}, timeout)).engines

    async def report_load(self, report: LoadReport, timeout: float | None = None) -> None:
        await self._call("report_load", report.to_wire(), timeout)

    async def select_pair(self, req: PairRequest, timeout: float | None = None) -> PairDecision:
        return _reply(PairDecision, await self._call("select_pair", req.to_wire(), timeout))

    async def acquire_lease(self, req: LeaseRequest, timeout: float | None = None) -> LeaseGrant | LeaseDenied:
        reply = _reply(P.LeaseReply, await self._call("acquire_lease", req.to_wire(), timeout))
        result = reply.grant if reply.grant is not None else reply.denied
        assert result is not None
        return result

    async def release_lease(
        self, lease_id: str, outcome: TransferOutcome | None = None, timeout: float | None = None
    ) -> bool:
        body = _body(P.ReleaseLeaseBody, lease_id=lease_id, outcome=outcome)
        return _reply(P.ReleasedReply, await self._call("release_lease", body, timeout)).released

    async def renew_lease(self, lease_id: str, timeout: float | None = None) -> float | None:
        """Keep a lease of a transfer still in flight: its new `expires_at` (service clock), or None when the
        lease is gone (expired, released, unknown): stop the transfer, its credits are no longer held."""
        body = _body(P.RenewLeaseBody, lease_id=lease_id)
        return _reply(P.RenewedReply, await self._call("renew_lease", body, timeout)).expires_at

    async def snapshot(
        self, timeout: float | None = None, *, max_paths: int | None = None, hottest: int | None = None
    ) -> dict[str, Any]:
        """The policy's state. `max_paths` / `hottest` cap the path list and the hottest tables."""
        body = _body(P.SnapshotBody, max_paths=max_paths, hottest=hottest)
        return await self._call("snapshot", {k: v for k, v in body.items() if v is not None}, timeout)

    async def announce(self, transfer_id: str, payload: dict[str, Any], timeout: float | None = None) -> float:
        """Post where transfer `transfer_id`'s KV should land (decode side). Returns the entry's expiry."""
        body = await self._call("announce", {"transfer_id": transfer_id, "payload": payload}, timeout)
        return _reply(P.AnnounceReply, body).expires_at

    async def await_announce(
        self, transfer_id: str, timeout_s: float, timeout: float | None = None
    ) -> dict[str, Any]:
        """Long-poll for the announce of `transfer_id` (prefill side); raises AnnounceTimeout after
        `timeout_s`. `timeout` (the call deadline) defaults to `timeout_s` plus the client's own timeout."""
        body = await self._call(
            "await_announce", {"transfer_id": transfer_id, "timeout_s": timeout_s}, self._long(timeout_s, timeout)
        )
        return _reply(P.AwaitAnnounceReply, body).payload

    async def abort_transfer(self, transfer_id: str, reason: str, timeout: float | None = None) -> None:
        """Prefill side: tell the decode engine waiting for `transfer_id` that its KV will not come."""
        await self._call("abort_transfer", _body(P.AbortTransferBody, transfer_id=transfer_id, reason=reason[:500]),
                         timeout)

    async def transfer_status(self, transfer_ids: list[str], timeout: float | None = None) -> dict[str, str]:
        """Decode side: transfer_id -> why it ended without its KV, for those of `transfer_ids` that did."""
        body = _body(P.TransferStatusBody, transfer_ids=list(transfer_ids))
        return _reply(P.TransferStatusReply, await self._call("transfer_status", body, timeout)).aborted

    async def register_rank(
        self, engine_id: str, rank: int, descriptor: bytes, timeout: float | None = None
    ) -> None:
        body = _body(P.RegisterRankBody, engine_id=engine_id, rank=rank, descriptor=descriptor)
        await self._call("register_rank", body, timeout)

    async def get_ranks(self, engine_id: str, timeout: float | None = None) -> dict[int, bytes]:
        """rank -> descriptor for every rank `engine_id` registered so far (empty if none)."""
        reply = _reply(P.RanksReply, await self._call("get_ranks", {"engine_id": engine_id}, timeout))
        return {e.rank: e.descriptor for e in reply.ranks}

    def _long(self, timeout_s: float, timeout: float | None) -> float | None:
        return timeout if timeout is not None else timeout_s + getattr(self, "timeout", 5.0)


class _Conn:
    """One live TCP connection of a PolicyClient: pending calls by id, and the task reading replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, nonce: bytes, max_frame: int):
        self.reader = reader
        self.writer = writer
        self.nonce = nonce
        self.max_frame = max_frame
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.dead: BaseException | None = None
        #: The server start this connection reached (hello "boot"); None from a server that does not say.
        self.boot: bytes | None = None
        self.task: asyncio.Task[None] | None = None

    def fail_all(self, exc: BaseException) -> None:
        if self.dead is None:
            self.dead = exc
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self.pending.clear()

    async def read_loop(self, address: str) -> None:
        why: BaseException = P.ConnectionLost(f"connection to {address} closed by the client")
        try:
            while True:
                data = await P.read_frame(self.reader, P.MAX_FRAME_CEILING)
                obj = P.decode_body(data, P.MAX_FRAME_CEILING)
                if not isinstance(obj, dict) or not isinstance(obj.get("id"), int):
                    raise P.BadRequest(f"unexpected frame: {str(obj)[:200]}")
                fut = self.pending.pop(obj["id"], None)
                if obj.get("ok") is True and isinstance(obj.get("body"), dict):
                    if fut is not None and not fut.done():
                        fut.set_result(obj["body"])
                    continue
                err = obj.get("error")
                if not isinstance(err, dict):
                    err = {}
                exc = P.error_from_wire(str(err.get("code", "bad_reply")), str(err.get("message", obj)))
                if fut is not None:
                    if not fut.done():
                        fut.set_exception(exc)
                elif obj["id"] == 0:  # a connection-level error: the server closes after it
                    why = exc
                    self.fail_all(exc)
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            if self.dead is None:
                why = P.ConnectionLost(f"connection to {address} lost ({exc.__class__.__name__})")
        except P.ServiceError as exc:
            why = P.ConnectionLost(f"connection to {address} dropped: {exc}")
        finally:
            self.fail_all(why)
            self.writer.close()


class PolicyClient(PolicyApi):
    """Async client: `async with PolicyClient("tcp://127.0.0.1:7000") as c: d = await c.select_pair(req)`.

    `secret="env"` (the default) takes the shared secret from $KVLANE_SECRET (none if unset); pass bytes to
    give it, or None to send no MAC. Calls on one client share one connection (multiplexed by id). A
    dropped connection is re-made on the next call; a call whose request may have reached the server before
    the drop is retried only if its op is idempotent (`protocol.OPS[op].idempotent`), else it raises
    ConnectionLost. Errors come back as the server's PolicyError subclass; a deadline miss raises
    CallTimeout.

    With `reregister=True` (the default) the client remembers what it registered (`register_engine`,
    `register_rank`; `remove_engine` forgets) and its announces of the last `announce_memory_s` seconds (at most
    1024), and when it reconnects to a *restarted* service (the hello's boot id changed: the new service knows
    no engines and has an empty announce board) sends them again before any other request goes out.
    While it has something registered, a dropped connection is re-made in the background (backoff 0.05 s up to
    2 s), so an idle engine re-registers with a restarted service without waiting for its next call.
    """

    def __init__(
        self,
        address: str,
        *,
        secret: bytes | None | Literal["env"] = "env",
        timeout: float = 5.0,
        connect_timeout: float = 5.0,
        reregister: bool = True,
        announce_memory_s: float = 120.0,
    ) -> None:
        self.address = address
        self.host, self.port = parse_address(address)
        self.reregister = reregister
        #: What to register again on a restarted service, in registration order.
        self._engines: dict[str, dict[str, Any]] = {}
        self._ranks: dict[tuple[str, int], dict[str, Any]] = {}
        #: transfer id -> (announce body, loop time after which it is not worth re-announcing).
        self._announces: dict[str, tuple[dict[str, Any], float]] = {}
        self.announce_memory_s = announce_memory_s
        self._boot: bytes | None = None
        self._restarts_seen = 0
        self._reconnector: asyncio.Task[None] | None = None
        self.secret = P.load_secret(None) if secret == "env" else secret
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._conn: _Conn | None = None
        self._connect_lock: asyncio.Lock | None = None
        self._ids = itertools.count(1)
        self._closed = False

    async def __aenter__(self) -> PolicyClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        await self._ensure(asyncio.get_running_loop().time() + self.connect_timeout)

    async def close(self) -> None:
        self._closed = True
        if self._reconnector is not None:
            self._reconnector.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reconnector
            self._reconnector = None
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.writer.close()
            if conn.task is not None:
                conn.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await conn.task
            with contextlib.suppress(Exception):
                await conn.writer.wait_closed()

    async def _ensure(self, deadline: float) -> _Conn:
        if self._closed:
            raise P.ConnectionLost(f"client for {self.address} is closed")
        if self._conn is not None and self._conn.dead is None:
            return self._conn
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if self._conn is not None and self._conn.dead is None:
                return self._conn
            remaining = min(deadline - asyncio.get_running_loop().time(), self.connect_timeout)
            if remaining <= 0:
                raise P.CallTimeout(f"no time left to connect to {self.address}")
            try:
                conn = await asyncio.wait_for(self._open(), remaining)
            except asyncio.TimeoutError:
                raise P.CallTimeout(f"connecting to {self.address} took longer than {remaining:.3g} s") from None
            except (OSError, asyncio.IncompleteReadError) as exc:
                raise P.ConnectionLost(f"cannot connect to {self.address}: {exc}") from None
            try:
                await self._after_restart(conn, deadline)
            except BaseException:
                conn.writer.close()
                if conn.task is not None:
                    conn.task.cancel()
                raise
            self._conn = conn
            return conn

    def forget_announce(self, transfer_id: str) -> None:
        """The transfer is over (its KV arrived or the receiver gave up): a restarted service need not be told
        about its announce again. Without this the client re-sends every announce of the last
        `announce_memory_s` after a restart — hundreds under load, which outlasted the callers' deadlines."""
        self._announces.pop(transfer_id, None)

    @property
    def restarts_seen(self) -> int:
        """How many times this client reconnected to a restarted service (a new boot id)."""
        return self._restarts_seen

    async def _after_restart(self, conn: _Conn, deadline: float) -> None:
        """On a service that is not the one seen before (new boot id), register again what this client had
        registered, before the connection is used for anything else. A registration the new service refuses
        (e.g. a changed topology) is logged and forgotten; a dropped connection fails the caller's call."""
        first = self._boot is None
        new = conn.boot is None or conn.boot != self._boot
        if not first and new:
            self._restarts_seen += 1
            now = asyncio.get_running_loop().time()
            self._announces = {k: v for k, v in self._announces.items() if v[1] > now}
            if self.reregister and (self._engines or self._ranks or self._announces):
                log.warning("policy service %s restarted: registering %d engine(s), %d rank(s) and %d announce(s) "
                            "again", self.address, len(self._engines), len(self._ranks), len(self._announces))
                for op, key, body in [*(("register_engine", k, b) for k, b in self._engines.items()),
                                      *(("register_rank", k, b) for k, b in self._ranks.items()),
                                      *(("announce", k, b) for k, (b, _) in self._announces.items())]:
                    try:
                        await self._roundtrip(conn, op, body, deadline)
                    except asyncio.TimeoutError:
                        raise P.CallTimeout(f"re-registering with restarted {self.address} timed out") from None
                    except (P.ConnectionLost, ConnectionError) as exc:
                        raise P.ConnectionLost(f"{self.address} dropped while re-registering: {exc}") from None
                    except (P.AuthFailed, P.Busy):
                        raise
                    except PolicyError as exc:  # the new service refuses it (e.g. another topology): stale
                        log.warning("re-registering %s %s with %s refused: %s", op, key, self.address, exc)
                        if op == "register_engine":
                            self._engines.pop(str(key), None)
                        elif op == "announce":
                            self._announces.pop(str(key), None)
                        else:
                            self._ranks.pop(key, None)  # type: ignore[arg-type]
        self._boot = conn.boot

    async def _open(self) -> _Conn:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            obj = P.decode_body(await P.read_frame(reader, P.MAX_FRAME_CEILING), P.MAX_FRAME_CEILING)
            if isinstance(obj, dict) and "hello" in obj and obj.get("v") != P.PROTOCOL_VERSION:
                raise P.ServiceError(
                    f"{self.address} speaks protocol version {obj.get('v')!r}; this client speaks "
                    f"{P.PROTOCOL_VERSION}", code="bad_reply")
            hello = obj.get("hello") if isinstance(obj, dict) else None
            if not isinstance(hello, dict) or not isinstance(hello.get("nonce"), bytes):
                err = obj.get("error") if isinstance(obj, dict) else None
                if isinstance(err, dict):
                    raise P.error_from_wire(str(err.get("code")), str(err.get("message")))
                raise P.ServiceError(f"{self.address} is not a kvlane policy service", code="bad_reply")
            if hello.get("auth") and self.secret is None:
                raise P.AuthFailed(f"{self.address} requires a shared secret (--secret-file / KVLANE_SECRET)")
            max_frame = hello.get("max_frame")
            conn = _Conn(reader, writer, hello["nonce"], max_frame if isinstance(max_frame, int) else P.DEFAULT_MAX_FRAME)
            boot = hello.get("boot")
            conn.boot = boot if isinstance(boot, bytes) else None
        except BaseException:
            writer.close()
            raise
        conn.task = asyncio.get_running_loop().create_task(conn.read_loop(self.address))
        conn.task.add_done_callback(lambda _task: self._on_conn_done(conn))
        return conn

    def _on_conn_done(self, conn: _Conn) -> None:
        """The connection is gone: if this client has registrations to keep alive, reconnect in the background."""
        if self._closed or not self.reregister or self._conn is not conn:
            return
        if not (self._engines or self._ranks or self._announces):
            return
        if self._reconnector is None or self._reconnector.done():
            self._reconnector = asyncio.get_running_loop().create_task(self._reconnect_loop())

    async def _reconnect_loop(self) -> None:
        loop = asyncio.get_running_loop()
        delay = 0.05
        while not self._closed:
            try:
                await self._ensure(loop.time() + self.connect_timeout)
                return
            except (PolicyError, OSError) as exc:
                log.debug("reconnecting to %s: %s; next try in %.2g s", self.address, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _call(self, op: str, body: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        timeout = self.timeout if timeout is None else timeout
        deadline = loop.time() + timeout
        spec = P.OPS.get(op)
        attempts = 2 if spec is not None and spec.idempotent else 1
        for attempt in range(attempts):
            conn = await self._ensure(deadline)
            try:
                reply = await self._roundtrip(conn, op, body, deadline)
                self._remember(op, body)
                return reply
            except asyncio.TimeoutError:
                raise P.CallTimeout(f"{op} to {self.address}: no reply within {timeout:g} s") from None
            except (P.ConnectionLost, ConnectionError) as exc:
                conn.fail_all(exc)
                if attempt + 1 < attempts and loop.time() < deadline:
                    continue
                if isinstance(exc, P.ConnectionLost):
                    raise
                raise P.ConnectionLost(f"{op} to {self.address}: {exc}") from None
        raise AssertionError("unreachable")

    async def _roundtrip(self, conn: _Conn, op: str, body: dict[str, Any], deadline: float) -> dict[str, Any]:
        """Send one request on `conn` and wait for its reply until `deadline` (asyncio.TimeoutError after)."""
        loop = asyncio.get_running_loop()
        req_id = next(self._ids)
        auth = P.compute_mac(self.secret, conn.nonce, req_id, op, body) if self.secret is not None else None
        frame = P.encode_frame(P.request_frame(req_id, op, body, auth), conn.max_frame)
        fut: asyncio.Future[dict[str, Any]] = loop.create_future()
        conn.pending[req_id] = fut
        # Written at once, with no await since the id was drawn: ids reach the server in increasing order
        # (the server requires that when auth is on).
        conn.writer.write(frame)

        async def drain_and_wait() -> Any:
            await conn.writer.drain()
            return await fut

        try:
            return await asyncio.wait_for(drain_and_wait(), max(deadline - loop.time(), 0.0))
        finally:
            conn.pending.pop(req_id, None)

    def _remember(self, op: str, body: dict[str, Any]) -> None:
        """Keep what a restarted service must be told again (see `reregister`)."""
        if op == "register_engine":
            self._engines.pop(body["engine_id"], None)
            self._engines[body["engine_id"]] = body
        elif op == "register_rank":
            self._ranks[(body["engine_id"], body["rank"])] = body
        elif op == "announce" and self.reregister and self.announce_memory_s > 0:
            self._announces.pop(body["transfer_id"], None)
            self._announces[body["transfer_id"]] = (body, asyncio.get_running_loop().time() + self.announce_memory_s)
            while len(self._announces) > 1024:
                del self._announces[next(iter(self._announces))]
        elif op == "remove_engine":
            self._engines.pop(body["engine_id"], None)
            for key in [k for k in self._ranks if k[0] == body["engine_id"]]:
                del self._ranks[key]


class EmbeddedPolicy(PolicyApi):
    """The same API over an in-process PolicyService: no sockets, but every body still goes through msgpack
    and the op's schema, so what works embedded works over TCP. Use in tests and single-process demos."""

    def __init__(self, policy: Any = None, *, service: PolicyService | None = None, timeout: float = 5.0, **kw: Any):
        if (policy is None) == (service is None):
            raise ValueError("give exactly one of policy or service")
        self.service = service if service is not None else PolicyService(policy, **kw)
        self.timeout = timeout
        self._started = False

    async def __aenter__(self) -> EmbeddedPolicy:
        self.service.start()
        self._started = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.service.stop()
        self._started = False

    async def _call(self, op: str, body: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        if not self._started:
            self.service.start()
            self._started = True
        wire = msgpack.unpackb(msgpack.packb(body, use_bin_type=True), raw=False)
        limit = self.timeout if timeout is None else timeout
        fault = self.service.message_fault(op)
        try:
            reply = await asyncio.wait_for(self._faulty(op, wire, fault), limit)
        except asyncio.TimeoutError:
            raise P.CallTimeout(f"{op}: no reply within {limit:g} s") from None
        return msgpack.unpackb(msgpack.packb(reply, use_bin_type=True), raw=False)

    async def _faulty(self, op: str, wire: dict[str, Any], fault: tuple[str, float] | None) -> dict[str, Any]:
        """dispatch, with the service's fault plan applied as the TCP server applies it (a lost request or
        reply waits out the caller's deadline)."""
        if fault is not None and fault[0] == "drop_request":
            await asyncio.Event().wait()
        reply = await self.service.dispatch(op, wire)
        if fault is not None:
            if fault[0] == "drop_reply":
                await asyncio.Event().wait()
            await asyncio.sleep(fault[1])
        return reply


class SyncPolicyClient:
    """Blocking twin of PolicyClient for non-async code (vLLM scheduler hooks): each call runs on a private
    event-loop thread and waits at most its deadline. Thread-safe; close() when done.

    `SyncPolicyClient("tcp://127.0.0.1:7000")`, or `SyncPolicyClient(factory=lambda: EmbeddedPolicy(p))` to
    build any PolicyApi inside the private loop.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        secret: bytes | None | Literal["env"] = "env",
        timeout: float = 5.0,
        connect_timeout: float = 5.0,
        factory: Callable[[], PolicyApi] | None = None,
    ) -> None:
        if (address is None) == (factory is None):
            raise ValueError("give exactly one of address or factory")
        if address is not None:
            parse_address(address)  # fail now, in the caller's thread
        self.timeout = timeout
        self._pid = os.getpid()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kvlane-policy-client", daemon=True)
        self._thread.start()

        async def build() -> PolicyApi:
            if factory is not None:
                return factory()
            assert address is not None
            return PolicyClient(address, secret=secret, timeout=timeout, connect_timeout=connect_timeout)

        self._client: PolicyApi = self._run(build(), timeout)
        self._closed = False

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        if os.getpid() != self._pid:  # a forked child has no loop thread: fail at once instead of timing out
            coro.close()
            raise P.ServiceError("SyncPolicyClient used in a forked child process; create one per process",
                                 code="wrong_process")
        if getattr(self, "_closed", False):
            coro.close()
            raise P.ConnectionLost("SyncPolicyClient is closed")
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        limit = (self.timeout if timeout is None else timeout) + 1.0  # the async call times out first
        try:
            return fut.result(limit)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise P.CallTimeout(f"no reply within {limit:g} s") from None

    def _do(self, make: Callable[[PolicyApi], Awaitable[T]], timeout: float | None) -> T:
        async def go() -> T:
            return await make(self._client)

        return self._run(go(), timeout)

    def __enter__(self) -> SyncPolicyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if getattr(self, "_closed", True) or os.getpid() != self._pid:
            return
        closer = getattr(self._client, "close", None)
        if closer is not None:
            with contextlib.suppress(Exception):
                self._run(closer(), self.timeout)
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
        if not self._thread.is_alive():
            self._loop.close()

    # The typed calls, one per PolicyApi method.

    def forget_announce(self, transfer_id: str) -> None:
        """See `PolicyClient.forget_announce` (no I/O; a no-op for clients that remember nothing)."""
        forget = getattr(self._client, "forget_announce", None)
        if forget is not None and not getattr(self, "_closed", True):
            self._loop.call_soon_threadsafe(forget, transfer_id)

    def ping(self, timeout: float | None = None) -> float:
        return self._do(lambda c: c.ping(timeout), timeout)

    def register_engine(self, info: EngineInfo, timeout: float | None = None) -> None:
        return self._do(lambda c: c.register_engine(info, timeout), timeout)

    def remove_engine(self, engine_id: str, timeout: float | None = None) -> bool:
        return self._do(lambda c: c.remove_engine(engine_id, timeout), timeout)

    def engines(self, timeout: float | None = None) -> list[EngineInfo]:
        return self._do(lambda c: c.engines(timeout), timeout)

    def report_load(self, report: LoadReport, timeout: float | None = None) -> None:
        return self._do(lambda c: c.report_load(report, timeout), timeout)

    def select_pair(self, req: PairRequest, timeout: float | None = None) -> PairDecision:
        return self._do(lambda c: c.select_pair(req, timeout), timeout)

    def acquire_lease(self, req: LeaseRequest, timeout: float | None = None) -> LeaseGrant | LeaseDenied:
        return self._do(lambda c: c.acquire_lease(req, timeout), timeout)

    def release_lease(
        self, lease_id: str, outcome: TransferOutcome | None = None, timeout: float | None = None
    ) -> bool:
        return self._do(lambda c: c.release_lease(lease_id, outcome, timeout), timeout)

    def renew_lease(self, lease_id: str, timeout: float | None = None) -> float | None:
        return self._do(lambda c: c.renew_lease(lease_id, timeout), timeout)

    def snapshot(
        self, timeout: float | None = None, *, max_paths: int | None = None, hottest: int | None = None
    ) -> dict[str, Any]:
        return self._do(lambda c: c.snapshot(timeout, max_paths=max_paths, hottest=hottest), timeout)

    def announce(self, transfer_id: str, payload: dict[str, Any], timeout: float | None = None) -> float:
        return self._do(lambda c: c.announce(transfer_id, payload, timeout), timeout)

    def await_announce(self, transfer_id: str, timeout_s: float, timeout: float | None = None) -> dict[str, Any]:
        limit = timeout if timeout is not None else timeout_s + self.timeout
        return self._do(lambda c: c.await_announce(transfer_id, timeout_s, limit), limit)

    def abort_transfer(self, transfer_id: str, reason: str, timeout: float | None = None) -> None:
        return self._do(lambda c: c.abort_transfer(transfer_id, reason, timeout), timeout)

    def transfer_status(self, transfer_ids: list[str], timeout: float | None = None) -> dict[str, str]:
        return self._do(lambda c: c.transfer_status(transfer_ids, timeout), timeout)

    def register_rank(self, engine_id: str, rank: int, descriptor: bytes, timeout: float | None = None) -> None:
        return self._do(lambda c: c.register_rank(engine_id, rank, descriptor, timeout), timeout)

    def get_ranks(self, engine_id: str, timeout: float | None = None) -> dict[int, bytes]:
        return self._do(lambda c: c.get_ranks(engine_id, timeout), timeout)
