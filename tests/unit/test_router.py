"""The P/D router against fake engines (aiohttp apps recording what they receive) and the real policy
(embedded): fan-out with one transfer id, P's one-token copy, sticky sessions, clear 400/502/503s, streaming."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from kvlane.integration.launch import free_port
from kvlane.integration.policy_service import EmbeddedPolicy, PolicyClient
from kvlane.integration.router import Router, RouterConfig, exposure_warning, serve
from kvlane.policy.types import EngineInfo, Role
from multidict import CIMultiDict

core = pytest.importorskip("kvlane.policy.core")
topology = pytest.importorskip("kvlane.policy.topology")

POLICY_ADDR = "tcp://127.0.0.1:7999"
SSE_CHUNKS = [b'data: {"choices":[{"text":"a"}]}\n\n', b'data: {"choices":[{"text":"b"}]}\n\n', b"data: [DONE]\n\n"]


@dataclass
class FakeEngine:
    """A stand-in vLLM OpenAI server. `mode`: ok | error400 | error500 | slow | die | die_mid_stream."""

    name: str
    mode: str = "ok"
    received: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    headers: list[CIMultiDict[str]] = field(default_factory=list)
    model: str = "tiny"
    cancelled: int = 0
    url: str = ""
    runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received.append((request.path, body))
        self.headers.append(CIMultiDict(request.headers))
        if self.mode == "error400":
            return web.json_response({"error": {"message": f"{self.name}: bad max_tokens"}}, status=400)
        if self.mode == "error500":
            return web.json_response({"error": {"message": f"{self.name} exploded"}}, status=500)
        if self.mode == "die":
            request.transport.close()
            await asyncio.sleep(1)
        if self.mode == "slow":
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for i, chunk in enumerate(SSE_CHUNKS):
                if self.mode == "die_mid_stream" and i == 1:
                    request.transport.close()
                    return resp
                await resp.write(chunk)
                await asyncio.sleep(0.01)
            await resp.write_eof()
            return resp
        return web.json_response({"engine": self.name, "max_tokens": body.get("max_tokens"),
                                  "choices": [{"text": f"from {self.name}"}]})

    async def models(self, request: web.Request) -> web.StreamResponse:
        if self.mode == "error500":
            return web.json_response({"error": {"message": "down"}}, status=500)
        return web.json_response({"object": "list", "data": [{"id": self.model, "owned_by": self.name}]})

    async def start(self) -> FakeEngine:
        app = web.Application()
        app.router.add_post("/v1/completions", self.handle)
        app.router.add_post("/v1/chat/completions", self.handle)
        app.router.add_post("/generate", self.handle)
        app.router.add_get("/v1/models", self.models)
        self.runner = web.AppRunner(app, handler_cancellation=True)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        return self

    def kv(self, i: int = 0) -> dict[str, Any]:
        return self.received[i][1]["kv_transfer_params"]


class Stack:
    def __init__(self, engines: dict[str, FakeEngine], router: Router, base: str, policy: Any) -> None:
        self.engines, self.router, self.base, self.policy = engines, router, base, policy

    async def post(self, path: str, body: Any, headers: dict[str, str] | None = None):
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        async with aiohttp.ClientSession() as s, s.post(self.base + path, data=data, headers=headers) as r:
            return r.status, await r.read(), CIMultiDict(r.headers)

    def served(self, role: str) -> list[FakeEngine]:
        return [e for n, e in self.engines.items() if n.startswith(role) and e.received]


async def _router_server(policy: Any, addr: str = POLICY_ADDR,
                         request_timeout: float = 20.0) -> tuple[Router, web.AppRunner, str]:
    router = Router(policy, RouterConfig(policy_addr=addr, policy_timeout=2.0, request_timeout=request_timeout))
    runner = web.AppRunner(router.app(), handler_cancellation=True)  # as serve() runs it
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return router, runner, f"http://127.0.0.1:{port}"


@pytest.fixture
async def stack():
    engines = {n: await FakeEngine(n).start() for n in ("p0", "p1", "d0", "d1")}
    policy = EmbeddedPolicy(core.Policy(topology.load_topology("loopback:gpus=4")))
    for i, (name, eng) in enumerate(engines.items()):
        role = Role.PREFILL if name.startswith("p") else Role.DECODE
        await policy.register_engine(EngineInfo(engine_id=name, role=role, gpus=[f"n0.g{i}"],
                                                endpoints={"http": eng.url}, kv_bytes_per_token=1024))
    router, runner, base = await _router_server(policy)
    yield Stack(engines, router, base, policy)
    await runner.cleanup()
    await policy.close()
    for e in engines.values():
        await e.runner.cleanup()


async def test_one_transfer_id_p_gets_one_token_d_gets_the_request(stack):
    body = {"model": "tiny", "prompt": "hello world", "max_tokens": 7, "temperature": 0,
            "kv_transfer_params": {"trace": "abc"}}
    status, payload, headers = await stack.post("/v1/completions", body)
    assert status == 200, payload
    [p] = stack.served("p")
    [d] = stack.served("d")
    assert json.loads(payload) == {"engine": d.name, "max_tokens": 7, "choices": [{"text": f"from {d.name}"}]}
    (p_path, p_body), (d_path, d_body) = p.received[0], d.received[0]
    assert p_path == d_path == "/v1/completions"
    assert p_body["max_tokens"] == 1 and p_body["stream"] is False and p_body["prompt"] == "hello world"
    assert d_body["max_tokens"] == 7 and d_body["prompt"] == "hello world" and "stream" not in d_body
    tid = headers["x-kvlane-transfer-id"]
    common = {"kvlane": 1, "transfer_id": tid, "session_id": None, "prefill": p.name, "decode": d.name,
              "policy": POLICY_ADDR, "trace": "abc"}
    assert p.kv() == {**common, "role": "prefill"}
    assert d.kv() == {**common, "role": "decode"}
    assert headers["x-kvlane-pair"].startswith(f"p={p.name}; d={d.name}; score=")
    assert stack.router.inflight() == {p.name: 0, d.name: 0}


async def test_sticky_session_keeps_its_decode_engine(stack):
    homes = set()
    for turn in range(3):
        msgs = [{"role": "user", "content": f"turn {turn}"}]
        status, _, headers = await stack.post("/v1/chat/completions", {"messages": msgs, "max_tokens": 3},
                                              headers={"x-session-id": "alice"})
        assert status == 200
        homes.add(headers["x-kvlane-pair"].split("; ")[1])
        if turn:
            assert "sticky=1" in headers["x-kvlane-pair"]
    assert len(homes) == 1
    [d] = stack.served("d")
    assert [b["kv_transfer_params"]["session_id"] for _, b in d.received] == ["alice"] * 3
    # the OpenAI `user` field names a session too; one that is not a policy name is hashed stably
    _, _, h1 = await stack.post("/v1/completions", {"prompt": "x", "user": "Bob Smith"})
    _, _, h2 = await stack.post("/v1/completions", {"prompt": "y", "user": "Bob Smith"})
    assert h1["x-kvlane-pair"].split("; ")[1] == h2["x-kvlane-pair"].split("; ")[1]
    assert "sticky=1" in h2["x-kvlane-pair"]
    bob = [b["kv_transfer_params"]["session_id"] for e in stack.engines.values() for _, b in e.received
           if b.get("user") == "Bob Smith" and b["kv_transfer_params"]["role"] == "decode"]
    assert len(bob) == 2 and bob[0] == bob[1] and bob[0].startswith("s-") and len(bob[0]) == 26


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/v1/completions", b"{not json", "not valid JSON"),
        ("/v1/completions", b"[1, 2]", "must be a JSON object"),
        ("/v1/completions", {"model": "tiny"}, "missing field 'prompt'"),
        ("/v1/chat/completions", {"prompt": "hi"}, "missing field 'messages'"),
        ("/v1/chat/completions", {"messages": []}, "'messages' must be a non-empty list"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "'max_tokens' must be an integer >= 1"),
        ("/v1/completions", {"prompt": "hi", "n": 2}, "n=1"),
        ("/v1/completions", {"prompt": ["a", "b"]}, "a batch of 2 prompts"),
        ("/v1/completions", {"prompt": [[1, 2], [3]]}, "a batch of 2 prompts"),
        ("/v1/completions", {"prompt": "hi", "kv_transfer_params": {"transfer_id": "x"}},
         "kv_transfer_params.transfer_id is set by the router"),
        ("/v1/completions", {"prompt": "hi", "kv_transfer_params": {"decode": "d1"}},
         "kv_transfer_params.decode is set by the router"),
        ("/v1/completions", {"prompt": "hi", "kv_transfer_params": [1]}, "must be an object"),
    ],
)
async def test_bad_requests_are_400_with_the_reason(stack, path, body, message):
    status, payload, _ = await stack.post(path, body)
    assert status == 400
    assert message in json.loads(payload)["error"]["message"]
    assert not any(e.received for e in stack.engines.values())


async def test_no_pair_is_503_with_reason(stack):
    for name in ("d0", "d1"):
        await stack.policy.remove_engine(name)
    status, payload, _ = await stack.post("/v1/completions", {"prompt": "hi"})
    assert status == 503
    assert "no prefill/decode pair available" in json.loads(payload)["error"]["message"]


async def test_unreachable_policy_is_503_with_reason():
    addr = f"tcp://127.0.0.1:{free_port()}"
    client = PolicyClient(addr, timeout=1.0, connect_timeout=1.0)
    router, runner, base = await _router_server(client, addr)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(base + "/v1/completions", json={"prompt": "hi"}) as r:
                assert r.status == 503
                msg = (await r.json())["error"]["message"]
            async with s.get(base + "/health") as r:
                assert r.status == 503
    finally:
        await runner.cleanup()
        await client.close()
    assert f"policy service {addr} unreachable" in msg


async def test_streaming_is_passed_through_byte_for_byte(stack):
    body = {"prompt": "stream me", "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}
    status, payload, headers = await stack.post("/v1/completions", body)
    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    assert payload == b"".join(SSE_CHUNKS)
    [p] = stack.served("p")
    [d] = stack.served("d")
    assert p.received[0][1]["stream"] is False and "stream_options" not in p.received[0][1]
    assert d.received[0][1]["stream"] is True and d.received[0][1]["stream_options"] == {"include_usage": True}
    assert p.kv()["transfer_id"] == d.kv()["transfer_id"] == headers["x-kvlane-transfer-id"]


async def test_prefill_failure_cancels_decode_and_is_502(stack):
    for n in ("p0", "p1"):
        stack.engines[n].mode = "error500"
    for n in ("d0", "d1"):
        stack.engines[n].mode = "slow"
    for stream in (False, True):
        status, payload, _ = await stack.post("/v1/completions", {"prompt": "hi", "stream": stream})
        assert status == 502
        assert "prefill engine p" in json.loads(payload)["error"]["message"]
        assert "exploded" in json.loads(payload)["error"]["message"]
    await asyncio.sleep(0.2)
    assert sum(stack.engines[n].cancelled for n in ("d0", "d1")) == 2
    assert set(stack.router.inflight().values()) == {0}


async def test_decode_errors_pass_through_and_dead_decode_is_502(stack):
    for n in ("d0", "d1"):
        stack.engines[n].mode = "error400"
    status, payload, _ = await stack.post("/v1/completions", {"prompt": "hi"})
    assert status == 400 and "bad max_tokens" in json.loads(payload)["error"]["message"]
    status, payload, _ = await stack.post("/v1/completions", {"prompt": "hi", "stream": True})
    assert status == 400 and "bad max_tokens" in json.loads(payload)["error"]["message"]
    for n in ("d0", "d1"):
        stack.engines[n].mode = "die"
    status, payload, _ = await stack.post("/v1/completions", {"prompt": "hi"})
    assert status == 502
    assert "decode engine d" in json.loads(payload)["error"]["message"]
    assert "failed mid-request" in json.loads(payload)["error"]["message"]


async def test_decode_dying_mid_stream_ends_the_stream_with_an_error_event(stack):
    for n in ("d0", "d1"):
        stack.engines[n].mode = "die_mid_stream"
    status, payload, _ = await stack.post("/v1/completions", {"prompt": "hi", "stream": True})
    assert status == 200  # the headers were already sent
    assert payload.startswith(SSE_CHUNKS[0])
    last = payload.strip().split(b"\n\n")[-1]
    err = json.loads(last.removeprefix(b"data: "))["error"]
    assert err["code"] == 502 and "failed mid-stream" in err["message"]


async def test_inflight_load_is_reported_to_the_policy(stack):
    for n in ("d0", "d1"):
        stack.engines[n].mode = "slow"
    task = asyncio.ensure_future(stack.post("/v1/completions", {"prompt": "hi"}))
    for _ in range(100):
        await asyncio.sleep(0.02)
        snap = await stack.policy.snapshot()
        queues = {e["engine_id"]: e["queue_depth"] for e in snap["engines"]}
        if sum(queues.values()) == 2:
            break
    busy = {k for k, v in stack.router.inflight().items() if v == 1}
    assert len(busy) == 2 and {k for k, v in queues.items() if v == 1} == busy
    task.cancel()
    for n in ("d0", "d1"):
        stack.engines[n].mode = "ok"


async def test_models_health_and_metrics(stack):
    async with aiohttp.ClientSession() as s:
        async with s.get(stack.base + "/v1/models") as r:
            assert r.status == 200 and (await r.json())["data"][0]["id"] == "tiny"
        async with s.get(stack.base + "/health") as r:
            assert r.status == 200 and (await r.json())["policy"] == POLICY_ADDR
        await stack.post("/v1/completions", {"prompt": "hi"})
        await stack.post("/v1/completions", b"{")
        async with s.get(stack.base + "/metrics") as r:
            text = await r.text()
    assert 'kvlane_router_requests_total{endpoint="completions"} 2.0' in text
    assert 'kvlane_router_errors_total{reason="bad_request"} 1.0' in text
    assert "kvlane_router_pair_decisions_total{" in text
    assert "kvlane_router_ttft_seconds_bucket" in text


# ---------------------------------------------------------------------------------------------- SGLang engines

BOOTSTRAP = {"p0": "127.0.0.1:8998", "p1": "127.0.0.1:8999"}


async def _sglang_stack(kinds: dict[str, str], bootstrap: dict[str, str] = BOOTSTRAP) -> Stack:
    """Fake engines named p*/d*, each registered as `kinds[name]` ("sglang" or "vllm") the way its backend does."""
    engines = {n: await FakeEngine(n).start() for n in kinds}
    policy = EmbeddedPolicy(core.Policy(topology.load_topology("loopback:gpus=4")))
    for i, (name, eng) in enumerate(engines.items()):
        role = Role.PREFILL if name.startswith("p") else Role.DECODE
        endpoints = {"http": eng.url}
        if kinds[name] == "sglang":
            endpoints["engine"] = "sglang"
            if role is Role.PREFILL and name in bootstrap:
                endpoints["sglang_bootstrap"] = bootstrap[name]
        await policy.register_engine(EngineInfo(engine_id=name, role=role, gpus=[f"n0.g{i}"], endpoints=endpoints,
                                                kv_bytes_per_token=1024))
    router, runner, base = await _router_server(policy)
    stack = Stack(engines, router, base, policy)
    stack.runner = runner  # type: ignore[attr-defined]
    return stack


async def _close(stack: Stack) -> None:
    await stack.runner.cleanup()  # type: ignore[attr-defined]
    await stack.policy.close()
    for e in stack.engines.values():
        await e.runner.cleanup()


@pytest.fixture
async def sglang_stack():
    stack = await _sglang_stack({"p0": "sglang", "p1": "sglang", "d0": "sglang", "d1": "sglang"})
    yield stack
    await _close(stack)


async def test_sglang_pair_gets_one_bootstrap_room_and_no_kv_transfer_params(sglang_stack):
    body = {"model": "tiny", "prompt": "hello world", "max_tokens": 7, "bootstrap_room": 5,
            "kv_transfer_params": {"trace": "abc"}}
    status, payload, headers = await sglang_stack.post("/v1/completions", body)
    assert status == 200, payload
    [p] = sglang_stack.served("p")
    [d] = sglang_stack.served("d")
    assert json.loads(payload) == {"engine": d.name, "max_tokens": 7, "choices": [{"text": f"from {d.name}"}]}
    (p_path, p_body), (d_path, d_body) = p.received[0], d.received[0]
    assert p_path == d_path == "/v1/completions"
    host, port = BOOTSTRAP[p.name].split(":")
    room = d_body["bootstrap_room"]
    assert room != 5 and isinstance(room, int)  # the client's room is overwritten by a fresh one
    for b in (p_body, d_body):
        assert b["bootstrap_host"] == host and b["bootstrap_port"] == int(port) and b["bootstrap_room"] == room
        assert "kv_transfer_params" not in b
        assert b["prompt"] == "hello world" and b["max_tokens"] == 7
    assert p_body["stream"] is False and "stream" not in d_body
    assert headers["x-kvlane-transfer-id"] == f"sglang-{room}"
    assert headers["x-kvlane-pair"].startswith(f"p={p.name}; d={d.name}; score=")
    assert sglang_stack.router.inflight() == {p.name: 0, d.name: 0}


async def test_sglang_stream_passes_decode_through_and_prefill_is_not_streamed(sglang_stack):
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True,
            "stream_options": {"include_usage": True}}
    status, payload, headers = await sglang_stack.post("/v1/chat/completions", body)
    assert status == 200
    assert payload == b"".join(SSE_CHUNKS)
    [p] = sglang_stack.served("p")
    [d] = sglang_stack.served("d")
    p_body, d_body = p.received[0][1], d.received[0][1]
    assert p_body["stream"] is False and "stream_options" not in p_body
    assert d_body["stream"] is True and d_body["stream_options"] == {"include_usage": True}
    assert p_body["bootstrap_room"] == d_body["bootstrap_room"]
    assert headers["x-kvlane-transfer-id"] == f"sglang-{d_body['bootstrap_room']}"
    # a second request draws a new room
    await sglang_stack.post("/v1/chat/completions", body)
    rooms = {b["bootstrap_room"] for e in sglang_stack.engines.values() for _, b in e.received}
    assert len(rooms) == 2


async def test_sglang_prefill_failure_cancels_decode_and_is_502(sglang_stack):
    for n in ("p0", "p1"):
        sglang_stack.engines[n].mode = "error500"
    for n in ("d0", "d1"):
        sglang_stack.engines[n].mode = "slow"
    status, payload, _ = await sglang_stack.post("/v1/completions", {"prompt": "hi"})
    assert status == 502 and "exploded" in json.loads(payload)["error"]["message"]
    await asyncio.sleep(0.2)
    assert sum(sglang_stack.engines[n].cancelled for n in ("d0", "d1")) == 1


@pytest.mark.parametrize("kinds", [{"p0": "vllm", "d0": "sglang"}, {"p0": "sglang", "d0": "vllm"}])
async def test_a_pool_of_a_vllm_and_an_sglang_engine_has_no_pair_503(kinds):
    """The policy pairs only engines of one kind: a vLLM P with an SGLang D is never proposed; the client gets
    503 with the reason and no engine sees the request."""
    stack = await _sglang_stack(kinds)
    try:
        status, payload, _ = await stack.post("/v1/completions", {"prompt": "hi"})
    finally:
        await _close(stack)
    assert status == 503
    err = json.loads(payload)["error"]
    assert err["type"] == "no_pair" and "same engine kind" in err["message"], err
    assert not any(e.received for e in stack.engines.values())


async def test_sglang_prefill_without_bootstrap_endpoint_is_503_naming_it():
    stack = await _sglang_stack({"p0": "sglang", "d0": "sglang"}, bootstrap={})
    try:
        status, payload, _ = await stack.post("/v1/completions", {"prompt": "hi"})
    finally:
        await _close(stack)
    assert status == 503
    msg = json.loads(payload)["error"]["message"]
    assert "p0" in msg and "bootstrap endpoint" in msg
    assert not any(e.received for e in stack.engines.values())


# ---------------------------------------------------------------------------------------------- exposure


@pytest.mark.parametrize(("host", "where"), [("0.0.0.0", "ALL interfaces"), ("::", "ALL interfaces"),
                                             ("10.1.2.3", "non-loopback address '10.1.2.3'"),
                                             ("router.example", "non-loopback address 'router.example'")])
async def test_binding_a_non_loopback_address_logs_a_loud_warning(monkeypatch, caplog, host, where):
    """serve() on a routable address warns before binding. TCPSite is swapped for one that records the host it
    was asked for and binds 127.0.0.1 instead: nothing here listens beyond loopback."""
    asked: list[str] = []
    real_site = web.TCPSite

    def loopback_site(runner, h, port, **kw):
        asked.append(h)
        return real_site(runner, "127.0.0.1", port, **kw)

    monkeypatch.setattr(web, "TCPSite", loopback_site)
    policy = EmbeddedPolicy(core.Policy(topology.load_topology("loopback:gpus=2")))
    router = Router(policy, RouterConfig(policy_addr=POLICY_ADDR))
    ready, stop = asyncio.Event(), asyncio.Event()
    with caplog.at_level(logging.INFO, logger="kvlane.router"):
        task = asyncio.ensure_future(serve(router, host, 0, ready=ready, stop=stop))
        await asyncio.wait_for(ready.wait(), 10)
        stop.set()
        await task
    await policy.close()
    assert asked == [host]
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert f"router binding to {where}" in warning.getMessage()
    assert "NO authentication" in warning.getMessage()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.5"])
async def test_loopback_binds_without_a_warning(caplog, host):
    assert exposure_warning(host) is None
    if host != "127.0.0.1":
        return  # bind only the one address every machine has
    policy = EmbeddedPolicy(core.Policy(topology.load_topology("loopback:gpus=2")))
    ready, stop = asyncio.Event(), asyncio.Event()
    with caplog.at_level(logging.INFO, logger="kvlane.router"):
        task = asyncio.ensure_future(serve(Router(policy, RouterConfig(policy_addr=POLICY_ADDR)), port=0,
                                           ready=ready, stop=stop))
        await asyncio.wait_for(ready.wait(), 10)
        stop.set()
        await task
    await policy.close()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("router listening on http://127.0.0.1:" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------- what router users expect


async def test_models_is_the_union_of_the_engines_lists(stack):
    stack.engines["d1"].model = "big"
    stack.engines["p1"].mode = "error500"  # one engine failing does not hide the others
    async with aiohttp.ClientSession() as s, s.get(stack.base + "/v1/models") as r:
        assert r.status == 200
        listing = await r.json()
    assert listing["object"] == "list"
    # engines are asked in name order and the first entry of an id wins: "tiny" comes from d0
    assert listing["data"] == [{"id": "tiny", "owned_by": "d0"}, {"id": "big", "owned_by": "d1"}]
    for e in stack.engines.values():
        e.mode = "error500"
    async with aiohttp.ClientSession() as s, s.get(stack.base + "/v1/models") as r:
        assert r.status == 503 and "no registered engine answered" in (await r.json())["error"]["message"]


async def test_request_id_is_passed_to_both_engines_and_echoed(stack):
    trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    status, _, headers = await stack.post("/v1/completions", {"prompt": "hi"},
                                          headers={"x-request-id": "req-42", "traceparent": trace})
    assert status == 200 and headers["x-request-id"] == "req-42"
    [p] = stack.served("p")
    [d] = stack.served("d")
    assert p.headers[0]["X-Request-Id"] == d.headers[0]["X-Request-Id"] == "req-42"
    assert p.headers[0]["traceparent"] == d.headers[0]["traceparent"] == trace
    # no max_tokens from the client: D uses the engine's default, P still makes exactly one token
    assert "max_tokens" not in d.received[0][1] and p.received[0][1]["max_tokens"] == 1
    # without one, the answer names the transfer id and the engines get no X-Request-Id from the router
    status, _, headers = await stack.post("/v1/completions", {"prompt": "hi", "stream": True})
    assert status == 200 and headers["x-request-id"] == headers["x-kvlane-transfer-id"]
    later = [h for e in stack.engines.values() for h in e.headers if h is not p.headers[0] and h is not d.headers[0]]
    assert len(later) == 2 and all("X-Request-Id" not in h and "traceparent" not in h for h in later)
    # errors carry it too; a malformed one is refused
    status, _, headers = await stack.post("/v1/completions", b"{", headers={"x-request-id": "r-bad-body"})
    assert status == 400 and headers["x-request-id"] == "r-bad-body"
    status, payload, _ = await stack.post("/v1/completions", {"prompt": "hi"}, headers={"x-request-id": "x" * 300})
    assert status == 400 and "x-request-id" in json.loads(payload)["error"]["message"]


async def test_engine_timeout_is_504_naming_the_engine_and_the_limit():
    engines = {n: await FakeEngine(n).start() for n in ("p0", "d0")}
    engines["d0"].mode = "slow"
    policy = EmbeddedPolicy(core.Policy(topology.load_topology("loopback:gpus=2")))
    for i, (name, eng) in enumerate(engines.items()):
        await policy.register_engine(EngineInfo(engine_id=name, role=Role.PREFILL if i == 0 else Role.DECODE,
                                                gpus=[f"n0.g{i}"], endpoints={"http": eng.url}))
    router, runner, base = await _router_server(policy, request_timeout=1.0)
    stack = Stack(engines, router, base, policy)
    try:
        for stream in (False, True):
            status, payload, _ = await stack.post("/v1/completions", {"prompt": "hi", "stream": stream})
            assert status == 504, payload
            msg = json.loads(payload)["error"]["message"]
            assert msg.startswith("decode engine d0 (") and "request timeout of 1 s" in msg
    finally:
        await runner.cleanup()
        await policy.close()
        for e in engines.values():
            await e.runner.cleanup()
    assert router.inflight() == {"p0": 0, "d0": 0}


@pytest.mark.parametrize("stream", [False, True])
async def test_client_disconnect_cancels_the_engine_requests(stack, stream):
    for n in ("d0", "d1"):
        stack.engines[n].mode = "slow"
    for n in ("p0", "p1"):
        stack.engines[n].mode = "slow"
    with pytest.raises(asyncio.TimeoutError):
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.5)) as s:
            await s.post(stack.base + "/v1/completions", json={"prompt": "hi", "stream": stream})
    for _ in range(100):
        if sum(e.cancelled for e in stack.engines.values()) == 2:
            break
        await asyncio.sleep(0.05)
    assert sorted(e.name for e in stack.engines.values() if e.cancelled) == sorted(
        e.name for e in stack.engines.values() if e.received)
    assert sum(e.cancelled for e in stack.engines.values()) == 2
    assert set(stack.router.inflight().values()) == {0}


async def test_sglang_native_generate_is_routed_to_sglang_pairs(sglang_stack):
    body = {"text": "hello", "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
    status, payload, headers = await sglang_stack.post("/generate", body, headers={"x-session-id": "s1"})
    assert status == 200, payload
    [p] = sglang_stack.served("p")
    [d] = sglang_stack.served("d")
    assert json.loads(payload)["engine"] == d.name
    (p_path, p_body), (d_path, d_body) = p.received[0], d.received[0]
    assert p_path == d_path == "/generate"
    assert p_body["stream"] is False and "stream" not in d_body
    for b in (p_body, d_body):
        assert b["text"] == "hello" and b["sampling_params"] == body["sampling_params"]
        assert b["bootstrap_room"] == d_body["bootstrap_room"] and b["bootstrap_port"] == 8998 + int(p.name[1])
    assert headers["x-kvlane-transfer-id"] == f"sglang-{d_body['bootstrap_room']}"
    status, payload, _ = await sglang_stack.post("/generate", {"input_ids": [1, 2, 3], "stream": True})
    assert status == 200 and payload == b"".join(SSE_CHUNKS)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"sampling_params": {}}, "exactly one of the fields 'text' and 'input_ids'"),
        ({"text": "a", "input_ids": [1]}, "exactly one of the fields 'text' and 'input_ids'"),
        ({"text": ["a", "b"]}, "field 'text' must be a non-empty string"),
        ({"input_ids": [[1], [2]]}, "field 'input_ids' must be a non-empty list of integers"),
        ({"text": "a", "sampling_params": {"n": 2}}, "n=1"),
        ({"text": "a", "sampling_params": [1]}, "'sampling_params' must be an object"),
    ],
)
async def test_bad_generate_bodies_are_400(sglang_stack, body, message):
    status, payload, _ = await sglang_stack.post("/generate", body)
    assert status == 400 and message in json.loads(payload)["error"]["message"]
    assert not any(e.received for e in sglang_stack.engines.values())


async def test_generate_on_a_vllm_pair_is_400(stack):
    status, payload, _ = await stack.post("/generate", {"text": "hello"})
    assert status == 400
    assert "SGLang's native API, but the policy chose vLLM engines" in json.loads(payload)["error"]["message"]
    assert not any(e.received for e in stack.engines.values())
