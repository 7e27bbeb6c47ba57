"""The P/D router: an OpenAI-compatible HTTP front (aiohttp) that asks the policy service for a (prefill,
decode) pair per request, sends the request to D and a one-token copy to P concurrently with one shared
`kv_transfer_params` (vLLM engines) or one shared bootstrap room (SGLang engines), and returns (or streams)
D's answer. Runs in the router process (`kvlane router serve`); decides nothing about pairs, paths or credits
itself, and never touches KV bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from kvlane.connector.sglang.router_fields import is_sglang_engine, sglang_pd_bodies
from kvlane.integration.policy_service.server import is_loopback
from kvlane.policy.types import (
    EngineInfo,
    LoadReport,
    NoPairAvailable,
    PairDecision,
    PairRequest,
    PolicyError,
)
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from . import params as RP

log = logging.getLogger("kvlane.router")

#: Service-layer error codes that mean "the policy service cannot be reached / did not answer".
_UNREACHABLE_CODES = {"connection_lost", "call_timeout", "timeout", "busy", "auth_failed"}
#: Client headers forwarded to both engines as they are (besides Authorization and X-Request-Id).
_PASSED_HEADERS = ("traceparent", "tracestate")


@dataclass
class RouterConfig:
    #: The policy service address given to engines in kv_transfer_params (tcp://HOST:PORT).
    policy_addr: str
    #: Longest one engine request may take end to end (both P and D), seconds.
    request_timeout: float = 600.0
    #: Deadline of each policy call, seconds.
    policy_timeout: float = 5.0
    #: Re-read the engine list from the policy at most this often (and whenever an engine id is unknown).
    engines_ttl: float = 5.0
    #: Deadline of each engine's answer to GET /v1/models (the router asks all engines at once), seconds.
    models_timeout: float = 5.0
    max_body_bytes: int = 8 << 20


class EngineFailed(Exception):
    """An engine answered with an error or its connection broke. `status` is what the client gets."""

    def __init__(self, message: str, status: int = 502, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.requests = Counter("kvlane_router_requests", "Requests received, per endpoint", ["endpoint"], registry=r)
        self.errors = Counter("kvlane_router_errors", "Requests answered with an error, per reason", ["reason"],
                              registry=r)
        self.decisions = Counter("kvlane_router_pair_decisions", "Pairs chosen by the policy",
                                 ["prefill", "decode", "sticky"], registry=r)
        self.ttft = Histogram("kvlane_router_ttft_seconds", "Time to D's first streamed byte (streaming requests)",
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.latency = Histogram("kvlane_router_request_seconds", "Whole request, router in to last byte out",
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=r)
        self.inflight = Gauge("kvlane_router_inflight", "Requests in flight per engine", ["engine"], registry=r)


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": kind, "code": status}}
    return web.json_response(body, status=status, headers=headers)


class Router:
    """State of one router: the policy client, engine endpoints, in-flight counts, metrics, HTTP session.

    `policy` is any `kvlane.integration.policy_service.PolicyApi` (a TCP `PolicyClient` in production, an
    `EmbeddedPolicy` in tests). `clock` only times metrics.
    """

    def __init__(self, policy: Any, config: RouterConfig, *, metrics: RouterMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.config = config
        self.metrics = metrics or RouterMetrics()
        self.clock = clock
        self._endpoints: dict[str, str] = {}
        self._engines: dict[str, EngineInfo] = {}
        self._endpoints_at = float("-inf")
        self._inflight: dict[str, int] = {}
        self._report_tasks: dict[str, asyncio.Task[None]] = {}
        self._dirty: set[str] = set()
        self._session: aiohttp.ClientSession | None = None

    # ------------------------------------------------------------------------------------------ app

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/generate", self.generate)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_view)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _startup(self, _app: web.Application) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.config.request_timeout, sock_connect=10),
            # Idle pooled connections are dropped after 2 s, before vLLM's OpenAI server (uvicorn) closes them
            # at its 5 s keep-alive (VLLM_HTTP_TIMEOUT_KEEP_ALIVE): reusing one the engine is closing fails the
            # request with ServerDisconnectedError (aiohttp keeps them 15 s by default; 2 of 1,000 load-test
            # requests failed so).
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=2.0),
        )

    async def _cleanup(self, _app: web.Application) -> None:
        for task in list(self._report_tasks.values()):
            task.cancel()
        for task in list(self._report_tasks.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("router not started (use Router.app() in an aiohttp runner)")
        return self._session

    # ------------------------------------------------------------------------------------------ engines

    async def _refresh_endpoints(self) -> None:
        infos = await self.policy.engines(timeout=self.config.policy_timeout)
        self._endpoints = {e.engine_id: e.endpoints["http"].rstrip("/") for e in infos if "http" in e.endpoints}
        self._engines = {e.engine_id: e for e in infos}
        self._endpoints_at = self.clock()

    async def engine(self, engine_id: str) -> tuple[EngineInfo, str]:
        """What engine `engine_id` registered with the policy and its HTTP base URL (refreshed when unknown)."""
        stale = self.clock() - self._endpoints_at > self.config.engines_ttl
        if engine_id not in self._endpoints or stale:
            await self._refresh_endpoints()
        url = self._endpoints.get(engine_id)
        if url is None:
            raise EngineFailed(f"engine {engine_id!r} registered no http endpoint with the policy", status=503)
        return self._engines[engine_id], url

    async def endpoint(self, engine_id: str) -> str:
        """The HTTP base URL engine `engine_id` registered with the policy (refreshed when unknown)."""
        return (await self.engine(engine_id))[1]

    # ------------------------------------------------------------------------------------------ load

    def _load_change(self, engine_id: str, delta: int) -> None:
        n = self._inflight.get(engine_id, 0) + delta
        self._inflight[engine_id] = n
        self.metrics.inflight.labels(engine=engine_id).set(n)
        self._dirty.add(engine_id)
        task = self._report_tasks.get(engine_id)
        if task is None or task.done():
            self._report_tasks[engine_id] = asyncio.get_running_loop().create_task(self._report(engine_id))

    async def _report(self, engine_id: str) -> None:
        """Send the engine's in-flight count (requests this router has sent it and not yet seen finish) to the
        policy as its queue depth; coalesces changes made while a report is on the wire."""
        while engine_id in self._dirty:
            self._dirty.discard(engine_id)
            n = self._inflight.get(engine_id, 0)
            try:
                await self.policy.report_load(LoadReport(engine_id=engine_id, queue_depth=n),
                                              timeout=self.config.policy_timeout)
            except Exception as exc:  # load reports are advisory: never fail a request over one
                log.debug("report_load(%s, %d) failed: %s", engine_id, n, exc)

    def inflight(self) -> dict[str, int]:
        return dict(self._inflight)

    # ------------------------------------------------------------------------------------------ handlers

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "completions", "/v1/completions")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "chat", "/v1/chat/completions")

    async def generate(self, request: web.Request) -> web.StreamResponse:
        """SGLang's native API (`text` or `input_ids`, `sampling_params`); SGLang pairs only."""
        return await self._handle(request, "generate", "/generate")

    async def models(self, request: web.Request) -> web.StreamResponse:
        """The union of the registered engines' model lists (asked concurrently; the first entry seen for a
        model id wins). 503 when no engine answers."""
        try:
            await self._refresh_endpoints()
        except PolicyError as exc:
            return self._policy_error(exc)
        headers = {"Authorization": request.headers["Authorization"]} if "Authorization" in request.headers else {}
        timeout = aiohttp.ClientTimeout(total=self.config.models_timeout)

        async def one(engine_id: str, url: str) -> list[Any] | None:
            try:
                async with self.session.get(url + "/v1/models", headers=headers, timeout=timeout) as resp:
                    if resp.status != 200:
                        log.debug("GET /v1/models on %s answered %d", engine_id, resp.status)
                        return None
                    data = (await resp.json(content_type=None)).get("data")
                    return data if isinstance(data, list) else None
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, AttributeError) as exc:
                log.debug("GET /v1/models on %s failed: %s", engine_id, exc)
                return None

        answers = await asyncio.gather(*(one(e, u) for e, u in sorted(self._endpoints.items())))
        if all(a is None for a in answers):
            return _error(503, "no registered engine answered /v1/models", "no_engine")
        models: dict[str, Any] = {}
        for entries in answers:
            for m in entries or []:
                if isinstance(m, dict) and isinstance(m.get("id"), str):
                    models.setdefault(m["id"], m)
        return web.json_response({"object": "list", "data": list(models.values())})

    async def health(self, request: web.Request) -> web.StreamResponse:
        try:
            await self.policy.ping(timeout=self.config.policy_timeout)
        except PolicyError as exc:
            return _error(503, f"policy service {self.config.policy_addr} unreachable: {exc}", "policy_unreachable")
        return web.json_response({"status": "ok", "policy": self.config.policy_addr, "inflight": self.inflight()})

    async def metrics_view(self, request: web.Request) -> web.StreamResponse:
        resp = web.Response(body=generate_latest(self.metrics.registry))
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    # ------------------------------------------------------------------------------------------ core

    def _policy_error(self, exc: PolicyError) -> web.Response:
        code = getattr(exc, "code", "policy_error")
        if isinstance(exc, NoPairAvailable) or code == "no_pair":
            self.metrics.errors.labels(reason="no_pair").inc()
            return _error(503, f"no prefill/decode pair available: {exc}", "no_pair")
        if code in _UNREACHABLE_CODES:
            self.metrics.errors.labels(reason="policy_unreachable").inc()
            return _error(503, f"policy service {self.config.policy_addr} unreachable: {exc}", "policy_unreachable")
        if code in ("bad_request", "invalid_request"):
            self.metrics.errors.labels(reason="bad_request").inc()
            return _error(400, f"the policy refused the request: {exc}", "invalid_request_error")
        self.metrics.errors.labels(reason="policy_error").inc()
        return _error(503, f"policy error ({code}): {exc}", "policy_error")

    async def _handle(self, request: web.Request, endpoint: RP.Endpoint, path: str) -> web.StreamResponse:
        """Route one request; every answer carries `x-request-id` (the client's, else a fresh id that is also
        the transfer id of a vLLM pair)."""
        self.metrics.requests.labels(endpoint=endpoint).inc()
        try:
            client_rid = RP.request_id(request.headers.get("x-request-id"))
        except RP.BadRequest as exc:
            self.metrics.errors.labels(reason="bad_request").inc()
            return _error(400, str(exc), "invalid_request_error")
        fresh = uuid.uuid4().hex
        rid = client_rid or fresh
        resp = await self._route(request, endpoint, path, fresh, rid, client_rid)
        if not resp.prepared:
            resp.headers["x-request-id"] = rid
        return resp

    async def _route(self, request: web.Request, endpoint: RP.Endpoint, path: str, transfer_id: str, rid: str,
                     client_rid: str | None) -> web.StreamResponse:
        t0 = self.clock()
        try:
            raw = await request.read()
            body = RP.parse_body(raw, endpoint, self.config.max_body_bytes)
            client_params = RP.client_kv_params(body)
            session = RP.session_id(request.headers.get("x-session-id"), body)
        except RP.BadRequest as exc:
            self.metrics.errors.labels(reason="bad_request").inc()
            return _error(400, str(exc), "invalid_request_error")

        try:
            decision: PairDecision = await self.policy.select_pair(
                PairRequest(request_id=transfer_id, session_id=session,
                            prompt_tokens=RP.estimate_prompt_tokens(body, endpoint)),
                timeout=self.config.policy_timeout,
            )
            p_info, p_url = await self.engine(decision.prefill)
            d_info, d_url = await self.engine(decision.decode)
        except PolicyError as exc:
            return self._policy_error(exc)
        except EngineFailed as exc:
            self.metrics.errors.labels(reason="no_endpoint").inc()
            return _error(exc.status, str(exc), "no_engine")
        sglang = is_sglang_engine(p_info)
        if sglang != is_sglang_engine(d_info):
            self.metrics.errors.labels(reason="mixed_pair").inc()
            kinds = {True: "SGLang", False: "vLLM"}
            return _error(503, f"the policy paired prefill engine {decision.prefill} ({kinds[sglang]}) with decode "
                               f"engine {decision.decode} ({kinds[not sglang]}): a vLLM engine and an SGLang engine "
                               "cannot exchange KV (kvlane's policy pairs within one engine kind: is the policy "
                               "service an older version?)",
                          "mixed_pair")

        self.metrics.decisions.labels(prefill=decision.prefill, decode=decision.decode,
                                      sticky=str(decision.sticky).lower()).inc()
        headers = {
            "x-kvlane-pair": RP.pair_header(decision.prefill, decision.decode, decision.score, decision.sticky,
                                            decision.locality),
            "x-kvlane-transfer-id": transfer_id,
            "x-request-id": rid,
        }
        if endpoint == "generate" and not sglang:
            self.metrics.errors.labels(reason="bad_request").inc()
            return _error(400, f"POST /generate is SGLang's native API, but the policy chose vLLM engines "
                               f"{decision.prefill}/{decision.decode}: use /v1/completions or /v1/chat/completions",
                          "invalid_request_error")
        if sglang:
            # SGLang's PD protocol: both halves carry the prefill's bootstrap host/port and one random room (the
            # room names the transfer); no kv_transfer_params, not even the client's.
            try:
                p_body, d_body, transfer_id = sglang_pd_bodies(
                    {k: v for k, v in body.items() if k != "kv_transfer_params"}, p_info, d_info)
            except ValueError as exc:
                self.metrics.errors.labels(reason="no_endpoint").inc()
                return _error(503, f"cannot route to the SGLang pair {decision.prefill}/{decision.decode}: {exc}",
                              "no_engine")
            headers["x-kvlane-transfer-id"] = transfer_id
        else:
            kv = RP.kvlane_params(transfer_id=transfer_id, session=session, prefill=decision.prefill,
                                  decode=decision.decode, policy=self.config.policy_addr)
            p_body = RP.prefill_body(body, kv, client_params)
            d_body = RP.decode_body(body, kv, client_params)
        log.debug("transfer %s session=%s pair p=%s d=%s score=%.4g locality=%s sticky=%s breakdown=%s",
                  transfer_id, session, decision.prefill, decision.decode, decision.score, decision.locality,
                  decision.sticky, json.dumps(decision.breakdown, sort_keys=True))
        fwd_headers = {"Content-Type": "application/json"}
        if "Authorization" in request.headers:
            fwd_headers["Authorization"] = request.headers["Authorization"]
        if client_rid is not None:
            fwd_headers["X-Request-Id"] = client_rid
        for name in _PASSED_HEADERS:  # W3C trace context: vLLM/SGLang continue the client's trace
            if name in request.headers:
                fwd_headers[name] = request.headers[name]
        stream = bool(body.get("stream", False))

        self._load_change(decision.prefill, +1)
        self._load_change(decision.decode, +1)
        p_task = asyncio.ensure_future(self._prefill(decision.prefill, p_url + path, p_body, fwd_headers))
        try:
            if stream:
                return await self._stream_decode(request, decision.decode, d_url + path, d_body, fwd_headers,
                                                 p_task, headers, t0)
            return await self._unary_decode(decision.decode, d_url + path, d_body, fwd_headers, p_task, headers)
        finally:
            if not p_task.done():
                p_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await p_task
            self._load_change(decision.prefill, -1)
            self._load_change(decision.decode, -1)
            self.metrics.latency.observe(self.clock() - t0)

    def _broken(self, role: str, engine_id: str, url: str, exc: BaseException, where: str) -> EngineFailed:
        """The error for an engine connection that failed: 504 when it hit the router's request timeout."""
        if isinstance(exc, asyncio.TimeoutError):
            return EngineFailed(f"{role} engine {engine_id} ({url}) did not answer {where} within the router's "
                                f"request timeout of {self.config.request_timeout:g} s", status=504)
        return EngineFailed(f"{role} engine {engine_id} ({url}) failed {where}: {exc.__class__.__name__}: {exc}")

    async def _prefill(self, engine_id: str, url: str, body: dict[str, Any], headers: dict[str, str]) -> None:
        """P's one-token request; raises EngineFailed on an error answer or a broken connection."""
        try:
            async with self.session.post(url, json=body, headers=headers) as resp:
                text = await resp.text()
                if resp.status != 200:
                    raise EngineFailed(f"prefill engine {engine_id} ({url}) answered {resp.status}: {text[:500]}")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise self._broken("prefill", engine_id, url, exc, "mid-request") from None

    async def _race_prefill(self, p_task: asyncio.Future[None], work: asyncio.Future[Any]) -> Any:
        """Wait for `work` (D's part) but fail as soon as P fails: a failed prefill means D would wait for
        KV that never comes. Once D has produced output, P's outcome no longer matters for this answer.
        If the handler is cancelled (the client went away), D's request is cancelled too (the caller cancels P's)."""
        try:
            done, _ = await asyncio.wait({p_task, work}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            work.cancel()
            raise
        if work in done:
            return work.result()
        exc = p_task.exception()
        if exc is None:
            return await work
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await work
        raise exc

    async def _unary_decode(self, engine_id: str, url: str, body: dict[str, Any], headers: dict[str, str],
                            p_task: asyncio.Future[None], out_headers: dict[str, str]) -> web.StreamResponse:
        async def call() -> tuple[int, bytes, str]:
            try:
                async with self.session.post(url, json=body, headers=headers) as resp:
                    return resp.status, await resp.read(), resp.headers.get("Content-Type", "application/json")
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise self._broken("decode", engine_id, url, exc, "mid-request") from None

        try:
            status, payload, ctype = await self._race_prefill(p_task, asyncio.ensure_future(call()))
        except EngineFailed as exc:
            reason = "prefill_failed" if str(exc).startswith("prefill") else "decode_failed"
            self.metrics.errors.labels(reason=reason).inc()
            return _error(exc.status, str(exc), reason, headers=out_headers)
        if status != 200:
            self.metrics.errors.labels(reason="decode_error").inc()
        resp = web.Response(status=status, body=payload, headers=out_headers)
        resp.headers["Content-Type"] = ctype
        return resp

    async def _stream_decode(self, request: web.Request, engine_id: str, url: str, body: dict[str, Any],
                             headers: dict[str, str], p_task: asyncio.Future[None], out_headers: dict[str, str],
                             t0: float) -> web.StreamResponse:
        def broken(exc: BaseException, where: str) -> EngineFailed:
            return self._broken("decode", engine_id, url, exc, where)

        async def first() -> tuple[aiohttp.ClientResponse, bytes]:
            """Open D's stream and read its first bytes (until then an error can still be a clean HTTP error)."""
            try:
                resp = await self.session.post(url, json=body, headers=headers)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise broken(exc, "mid-request") from None
            try:
                if resp.status != 200:
                    payload = await resp.read()
                    raise EngineFailed(f"decode engine {engine_id} answered {resp.status}", status=resp.status,
                                       body=payload)
                return resp, await resp.content.readany()
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                resp.close()
                raise broken(exc, "mid-request") from None
            except BaseException:
                resp.close()
                raise

        try:
            d_resp, chunk = await self._race_prefill(p_task, asyncio.ensure_future(first()))
        except EngineFailed as exc:
            reason = "prefill_failed" if str(exc).startswith("prefill") else "decode_failed"
            self.metrics.errors.labels(reason=reason).inc()
            if exc.body is not None:  # D's own error answer: pass it through
                resp = web.Response(status=exc.status, body=exc.body, headers=out_headers)
                resp.headers["Content-Type"] = "application/json"
                return resp
            return _error(exc.status, str(exc), reason, headers=out_headers)

        self.metrics.ttft.observe(self.clock() - t0)
        out = web.StreamResponse(status=200, headers=out_headers)
        out.headers["Content-Type"] = d_resp.headers.get("Content-Type", "text/event-stream")
        out.headers["Cache-Control"] = "no-cache"
        client_gone = False
        try:
            await out.prepare(request)
            while chunk:
                try:
                    await out.write(chunk)
                except (ConnectionResetError, aiohttp.ClientConnectionResetError):
                    client_gone = True
                    log.info("client went away during the stream of %s", out_headers["x-kvlane-transfer-id"])
                    break
                try:
                    chunk = await d_resp.content.readany()
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    # Headers are gone: tell the client in-band, the way OpenAI-style streams carry errors.
                    self.metrics.errors.labels(reason="decode_failed").inc()
                    failed = broken(exc, "mid-stream")
                    log.warning(str(failed))
                    err = {"error": {"message": str(failed), "type": "decode_failed", "code": failed.status}}
                    with contextlib.suppress(Exception):
                        await out.write(f"data: {json.dumps(err)}\n\n".encode())
                    break
        finally:
            if d_resp.content.at_eof():
                d_resp.release()
            else:
                d_resp.close()  # stops D's generation (vLLM aborts a request whose client left)
        if not client_gone:
            with contextlib.suppress(ConnectionResetError, RuntimeError):
                await out.write_eof()
        return out


def exposure_warning(host: str) -> str | None:
    """The warning to log when the router binds `host` and that address is reachable from other machines
    (the HTTP front has no authentication of its own), else None."""
    if is_loopback(host):
        return None
    where = "ALL interfaces" if host in ("", "0.0.0.0", "::", "[::]") else f"non-loopback address {host!r}"
    return (f"router binding to {where}: its HTTP front has NO authentication, so any host that reaches this port "
            "can send requests to every engine behind it and read /metrics. Bind 127.0.0.1 (the default) and put "
            "an authenticating proxy in front, or firewall the port. (The client's Authorization header is "
            "forwarded to the engines, so engines started with --api-key still check keys.)")


async def serve(router: Router, host: str = "127.0.0.1", port: int = 8000, *, ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Run the router's HTTP server until `stop` is set (or the task is cancelled). Binds loopback unless told
    otherwise and logs a WARNING for any other address. Logs `router listening on http://HOST:PORT` when ready."""
    warning = exposure_warning(host)
    if warning is not None:
        log.warning(warning)
    # handler_cancellation: a client that disconnects cancels its handler, which closes both engine requests
    # (vLLM and SGLang abort a request whose client left), instead of generating for nobody.
    runner = web.AppRunner(router.app(), access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    sockets = getattr(site._server, "sockets", None) or []  # the bound port when port=0
    bound = sockets[0].getsockname()[1] if sockets else port
    log.info("router listening on http://%s:%d (policy %s)", host, bound, router.config.policy_addr)
    if ready is not None:
        ready.set()
    try:
        await (stop or asyncio.Event()).wait()
    finally:
        await runner.cleanup()
