"""Fuzzing the router's request parsing through its real aiohttp app (hypothesis): random bytes, random JSON
and mutated OpenAI bodies posted to /v1/completions and /v1/chat/completions, with fake engines behind it and
the real policy (embedded). Property: every request gets 200 or a 4xx JSON error naming the problem — never a
500, never an unhandled exception logged — and the router keeps serving a good client afterwards."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import threading
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvlane.integration.launch import free_port
from kvlane.integration.policy_service import EmbeddedPolicy
from kvlane.policy.types import EngineInfo, Role
from policy_raw import make_policy

router_mod = pytest.importorskip("kvlane.integration.router")

FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
PATHS = ("/v1/completions", "/v1/chat/completions")


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


async def _engine(name: str) -> tuple[web.AppRunner, str]:
    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        assert body["kv_transfer_params"]["kvlane"] == 1  # what reaches an engine went through the router
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(b'data: {"choices":[{"text":"x"}]}\n\ndata: [DONE]\n\n')
            await resp.write_eof()
            return resp
        return web.json_response({"engine": name, "choices": [{"text": "x"}]})

    app = web.Application()
    app.router.add_post("/v1/completions", handle)
    app.router.add_post("/v1/chat/completions", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


class ThreadedRouter:
    """Router + two fake engines + embedded policy on one event-loop thread; plain http.client drives it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.unhandled: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda _loop, ctx: self.unhandled.append(ctx))
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.run(self._start())

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def _start(self) -> None:
        self.engines = [await _engine("p0"), await _engine("d0")]
        self.policy = EmbeddedPolicy(make_policy())
        for i, (name, (_, url)) in enumerate(zip(("p0", "d0"), self.engines, strict=True)):
            role = Role.PREFILL if name == "p0" else Role.DECODE
            await self.policy.register_engine(EngineInfo(engine_id=name, role=role, gpus=[f"n0.g{i}"],
                                                         endpoints={"http": url}, kv_bytes_per_token=1024))
        router = router_mod.Router(self.policy, router_mod.RouterConfig(
            policy_addr="tcp://127.0.0.1:7999", policy_timeout=5.0, request_timeout=10.0, max_body_bytes=1 << 16))
        self.runner = web.AppRunner(router.app())
        await self.runner.setup()
        self.port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def _stop(self) -> None:
        await self.runner.cleanup()
        await self.policy.close()
        for runner, _ in self.engines:
            await runner.cleanup()

    def close(self) -> None:
        self.run(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    def post(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
        try:
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()


@pytest.fixture(scope="module")
def rt():
    errors = _Errors()
    loggers = [logging.getLogger(n) for n in ("aiohttp.server", "aiohttp.web", "kvlane.router", "asyncio")]
    for lg in loggers:
        lg.addHandler(errors)
    server = ThreadedRouter()
    yield server
    server.close()
    for lg in loggers:
        lg.removeHandler(errors)
    assert server.unhandled == []
    assert errors.records == []


def check(status: int, payload: bytes) -> None:
    assert status in (200, 400, 413), (status, payload[:300])
    if status != 200:
        err = json.loads(payload)["error"] if status == 400 else None
        if err is not None:
            assert err["type"] == "invalid_request_error" and err["message"], err


def assert_serves(rt: ThreadedRouter) -> None:
    status, payload = rt.post("/v1/completions", json.dumps({"prompt": "hello", "max_tokens": 2}).encode())
    assert status == 200, payload
    assert json.loads(payload)["engine"] == "d0"


json_scalars = st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats(allow_nan=False,
                                                                                          allow_infinity=False) \
    | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=15)


@FUZZ
@given(path=st.sampled_from(PATHS), data=st.binary(max_size=300))
def test_random_bytes(rt, path, data):
    check(*rt.post(path, data))
    assert_serves(rt)


@FUZZ
@given(path=st.sampled_from(PATHS), obj=json_values)
def test_random_json(rt, path, obj):
    check(*rt.post(path, json.dumps(obj).encode()))


FIELDS = ["prompt", "messages", "stream", "n", "max_tokens", "user", "kv_transfer_params", "model",
          "stream_options", "best_of", "temperature"]


@st.composite
def openai_body(draw: st.DrawFn) -> tuple[str, dict[str, Any], dict[str, str]]:
    path = draw(st.sampled_from(PATHS))
    body: dict[str, Any] = ({"prompt": "hi", "max_tokens": 3} if path == PATHS[0]
                            else {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.sampled_from(FIELDS))
        kind = draw(st.sampled_from(["set", "drop", "kvlane_field", "content_parts"]))
        if kind == "drop":
            body.pop(key, None)
        elif kind == "kvlane_field":
            body["kv_transfer_params"] = {draw(st.sampled_from(["transfer_id", "policy", "role", "trace"])):
                                          draw(json_values)}
        elif kind == "content_parts":
            body["messages"] = [{"role": "user", "content": draw(json_values)}]
        else:
            body[key] = draw(json_values)
    headers = {}
    if draw(st.booleans()):
        headers["x-session-id"] = draw(st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126),
                                               min_size=1, max_size=300))
    return path, body, headers


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=openai_body())
def test_mutated_openai_bodies(rt, case):
    path, body, headers = case
    status, payload = rt.post(path, json.dumps(body).encode(), headers)
    check(status, payload)
    if isinstance(body.get("kv_transfer_params"), dict) and set(body["kv_transfer_params"]) & {
            "transfer_id", "policy", "role"}:
        assert status == 400, payload  # a client can never forge kvlane's fields into what engines get


def test_oversized_body_is_413_and_the_router_serves_on(rt):
    status, _ = rt.post("/v1/completions", b'{"prompt": "' + b"a" * (1 << 17) + b'"}')
    assert status == 413
    assert_serves(rt)


def test_non_utf8_and_huge_numbers(rt):
    for raw in (b'{"prompt": "\xff\xfe"}', b'{"prompt": "a", "max_tokens": ' + b"9" * 5000 + b"}",
                b'{"prompt": "a", "n": 1e999}', b"\xef\xbb\xbf{}"):
        status, payload = rt.post("/v1/completions", raw)
        assert status == 400, (raw[:40], payload)
    assert_serves(rt)
