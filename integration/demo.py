"""The 1P1D demo: a tiny offline Llama served by one prefill and one decode vLLM engine (CPU) joined by
KVLaneConnector, a policy service on a 2-GPU loopback topology and the router; a few requests (one a
2-turn session, one streamed) are answered through the router and compared token for token with a
single engine's greedy output. Runs in the user's process (`kvlane demo pd`, examples/demo_1p1d.py);
every child it starts is stopped before it returns, also on Ctrl-C or error.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .launch import (
    EngineProcess,
    ProcessSet,
    free_port,
    start_policy_service,
    start_router,
    start_vllm_engine,
)
from .tiny_model import build_tiny_llama, default_cache_dir

MODEL_NAME = "tiny-llama"
TOPOLOGY = "loopback:gpus=2"
#: (engine_id, role, topology GPU, CPU core): P on core 0, D on core 1 (idle vLLM CPU workers spin a core).
ENGINES = (("prefill-0", "prefill", "n0.g0", 0), ("decode-0", "decode", "n0.g1", 1))
SESSION = "demo-session"


@dataclass
class DemoOptions:
    #: Where the tiny model is built (reused when it exists with the same parameters).
    cache_dir: Path = field(default_factory=default_cache_dir)
    #: Logs of every child process; a fresh temporary directory when None.
    log_dir: Path | None = None
    max_tokens: int = 24
    #: The single-engine greedy output the P/D answers are compared with, token for token:
    #: "prefill" = the prefill engine itself, called directly without kv_transfer_params after the routed
    #: requests (no extra engine start); "separate" = a plain engine (no connector) run before the cluster;
    #: "none" = no comparison.
    reference: Literal["prefill", "separate", "none"] = "prefill"
    #: Engines without connector (the demo registers them with the policy itself): checks the plumbing
    #: (policy, router, fan-out) when KVLaneConnector is not available; D then recomputes the prompt.
    plain: bool = False
    #: More `kv_connector_extra_config` for both engines, e.g. {"transport": "ucx"} (passed through as is).
    connector_extra: dict[str, Any] = field(default_factory=dict)
    startup_timeout: float = 600.0
    request_timeout: float = 300.0
    kv_cache_gib: int = 1


@dataclass
class Answer:
    label: str
    text: str
    token_ids: list[int] | None
    pair: str = ""
    seconds: float = 0.0


@dataclass
class DemoResult:
    answers: list[Answer]
    reference: list[Answer] | None
    snapshot: dict[str, Any]
    log_dir: Path

    def matches(self) -> list[bool] | None:
        if self.reference is None:
            return None
        return [_same(a, r) for a, r in zip(self.answers, self.reference, strict=True)]


def _same(a: Answer, r: Answer) -> bool:
    if a.token_ids is not None and r.token_ids is not None:
        return a.token_ids == r.token_ids
    return a.text == r.text


# ----------------------------------------------------------------------------------------------- HTTP


def _post(url: str, body: dict[str, Any], timeout: float, headers: dict[str, str] | None = None
          ) -> tuple[dict[str, Any] | list[dict[str, Any]], dict[str, str]]:
    """POST JSON; returns the JSON answer (or the list of SSE events when streaming) and the headers."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            hdrs = {k.lower(): v for k, v in resp.headers.items()}
            if not body.get("stream"):
                return json.loads(resp.read()), hdrs
            events = []
            for line in resp:
                line = line.strip()
                if line.startswith(b"data: ") and line != b"data: [DONE]":
                    events.append(json.loads(line[6:]))
            return events, hdrs
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:1000]
        raise RuntimeError(f"POST {url} answered {exc.code}: {detail}") from None


def _answer(label: str, payload: Any, chat: bool) -> Answer:
    if isinstance(payload, list):  # streamed events
        texts, ids = [], []
        for ev in payload:
            if "error" in ev:
                raise RuntimeError(f"{label}: the stream ended with an error: {ev['error']}")
            for ch in ev.get("choices", []):
                texts.append((ch.get("delta") or {}).get("content") or "" if chat else ch.get("text") or "")
                if ch.get("token_ids"):
                    ids.extend(ch["token_ids"])
        return Answer(label, "".join(texts), ids or None)
    choice = payload["choices"][0]
    text = choice["message"]["content"] if chat else choice["text"]
    return Answer(label, text, choice.get("token_ids"))


def _script(max_tokens: int) -> list[tuple[str, str, dict[str, Any], dict[str, str]]]:
    """The demo's requests: (label, path, body, headers). The session's 2nd turn is filled in at run time."""
    common = {"model": MODEL_NAME, "max_tokens": max_tokens, "temperature": 0.0, "return_token_ids": True}
    return [
        ("completion", "/v1/completions", {**common, "prompt": "The quick brown fox"}, {}),
        # ~1200 tokens: ~1.2 MB of fp32 KV, enough for the policy to count a bandwidth sample for the path
        ("completion (long prompt)", "/v1/completions",
         {**common, "prompt": "Tell me a story about a small robot who learned to paint. " * 90}, {}),
        ("session turn 1", "/v1/chat/completions",
         {**common, "messages": [{"role": "user", "content": "Hello, how are you today?"}]},
         {"x-session-id": SESSION}),
        ("session turn 2", "/v1/chat/completions", {**common, "messages": []}, {"x-session-id": SESSION}),
        ("streamed completion", "/v1/completions",
         {**common, "prompt": "Explain why the sky is blue.", "stream": True}, {}),
    ]


def run_requests(base_url: str, max_tokens: int, timeout: float, say: Callable[[str], None]) -> list[Answer]:
    """Send the demo's requests to `base_url` (router or single engine), in order; returns the answers."""
    answers: list[Answer] = []
    turn1: Answer | None = None
    for label, path, body, headers in _script(max_tokens):
        if label == "session turn 2":
            assert turn1 is not None
            body = {**body, "messages": [
                {"role": "user", "content": "Hello, how are you today?"},
                {"role": "assistant", "content": turn1.text},
                {"role": "user", "content": "What is the capital of France?"},
            ]}
        t0 = time.monotonic()
        payload, hdrs = _post(base_url + path, body, timeout, headers)
        ans = _answer(label, payload, chat=path.endswith("chat/completions"))
        ans.pair = hdrs.get("x-kvlane-pair", "")
        ans.seconds = time.monotonic() - t0
        if label == "session turn 1":
            turn1 = ans
        answers.append(ans)
        say(f"  {label:<28} {ans.seconds:6.2f}s  {ans.text!r}")
        if ans.pair:
            say(f"  {'':<28} pair: {ans.pair}")
    return answers


# ----------------------------------------------------------------------------------------------- run


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so the `finally` that stops the children runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _reference(model: Path, opts: DemoOptions, log_dir: Path, say: Callable[[str], None]) -> list[Answer]:
    say("reference: one plain vLLM engine (no connector), one OMP thread on core 0 like each of P and D ...")
    with ProcessSet() as procs:
        eng = procs.add(start_vllm_engine(
            model, free_port(), role=None, engine_id="reference", cpu_cores=[0], served_model_name=MODEL_NAME,
            kv_cache_gib=opts.kv_cache_gib, log_file=log_dir / "vllm-reference.log"))
        assert isinstance(eng, EngineProcess)
        t0 = time.monotonic()
        eng.wait_healthy(opts.startup_timeout)
        say(f"  healthy after {time.monotonic() - t0:.0f}s ({eng.url})")
        return run_requests(eng.url, opts.max_tokens, opts.request_timeout, say)


def _wait_registered(policy_addr: str, engine_ids: list[str], timeout: float) -> None:
    from .policy_service import SyncPolicyClient

    with SyncPolicyClient(policy_addr, timeout=5.0) as client:
        deadline = time.monotonic() + timeout
        while True:
            have = {e.engine_id for e in client.engines()}
            missing = [e for e in engine_ids if e not in have]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"engines {missing} did not register with the policy within {timeout:.0f}s "
                                   f"(registered: {sorted(have)}); see their logs")
            time.sleep(0.5)


def _register_plain(policy_addr: str, engines: list[EngineProcess]) -> None:
    from kvlane.policy.types import EngineInfo, Role

    from .policy_service import SyncPolicyClient

    gpus = {eid: gpu for eid, _, gpu, _ in ENGINES}
    with SyncPolicyClient(policy_addr, timeout=5.0) as client:
        for e in engines:
            client.register_engine(EngineInfo(engine_id=e.engine_id, role=Role(e.role), gpus=[gpus[e.engine_id]],
                                              endpoints={"http": e.url}))


def run_pd_demo(opts: DemoOptions, say: Callable[[str], None] = print) -> DemoResult:
    """Build the model, (optionally) record the single-engine reference, start policy + P + D + router,
    answer the demo's requests through the router, print what happened, stop everything."""
    log_dir = opts.log_dir or Path(tempfile.mkdtemp(prefix="kvlane-demo-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    say(f"kvlane 1P1D demo (logs in {log_dir})")
    model = build_tiny_llama(Path(opts.cache_dir) / "tiny-llama-s0")
    say(f"model: {model} (random-weight Llama, fp32, offline tokenizer)")
    with _sigterm_as_interrupt():
        if opts.reference not in ("prefill", "separate", "none"):
            raise ValueError(f"reference={opts.reference!r}: expected prefill, separate or none")
        reference = _reference(model, opts, log_dir, say) if opts.reference == "separate" else None
        with ProcessSet() as procs:
            policy = procs.add(start_policy_service(TOPOLOGY, free_port(), log_file=log_dir / "policy.log"))
            addr = policy.addr  # type: ignore[attr-defined]
            say(f"policy service: {addr} (topology {TOPOLOGY})")
            engines: list[EngineProcess] = []
            for engine_id, role, gpu, core in ENGINES:
                eng = start_vllm_engine(
                    model, free_port(), role=None if opts.plain else role, engine_id=engine_id,  # type: ignore[arg-type]
                    policy_addr=addr, cpu_cores=[core], served_model_name=MODEL_NAME, kv_cache_gib=opts.kv_cache_gib,
                    extra_connector_config=None if opts.plain else {"gpus": [gpu], **opts.connector_extra},
                    log_file=log_dir / f"vllm-{engine_id}.log")
                eng.role = role
                engines.append(procs.add(eng))  # type: ignore[arg-type]
                extra = "".join(f", {k}={v}" for k, v in sorted(opts.connector_extra.items()))
                mode = "no connector" if opts.plain else f"KVLaneConnector{extra}"
                say(f"{role} engine {engine_id}: {eng.url} on core {core}, GPU {gpu} ({mode})")
            t0 = time.monotonic()
            for eng in engines:
                eng.wait_healthy(max(opts.startup_timeout - (time.monotonic() - t0), 1.0))
            say(f"  both engines healthy after {time.monotonic() - t0:.0f}s")
            ids = [e.engine_id for e in engines]
            if opts.plain:
                _register_plain(addr, engines)
            else:
                _wait_registered(addr, ids, 60.0)
            say(f"  registered with the policy: {', '.join(ids)}")
            router = procs.add(start_router(addr, free_port(), log_file=log_dir / "router.log"))
            say(f"router: {router.url}")  # type: ignore[attr-defined]
            say(f"requests through the router (greedy, max_tokens={opts.max_tokens}):")
            answers = run_requests(router.url, opts.max_tokens, opts.request_timeout, say)  # type: ignore[attr-defined]
            if opts.reference == "prefill":
                p_engine = engines[0]
                say(f"reference: the same requests sent directly to {p_engine.engine_id} as one plain engine "
                    "(no kv_transfer_params, so its connector stays out of the way):")
                reference = run_requests(p_engine.url, opts.max_tokens, opts.request_timeout, say)
            from .policy_service import SyncPolicyClient

            with SyncPolicyClient(addr, timeout=5.0) as client:
                snapshot = client.snapshot()
            (log_dir / "policy-snapshot.json").write_text(json.dumps(snapshot, indent=1, sort_keys=True, default=str))
            _print_snapshot(snapshot, say)
    result = DemoResult(answers, reference, snapshot, log_dir)
    _print_comparison(result, say)
    say("all processes stopped.")
    return result


def _print_snapshot(snap: dict[str, Any], say: Callable[[str], None]) -> None:
    say("policy snapshot:")
    counters = snap.get("counters") or {}
    if counters:
        say("  counters: " + ", ".join(f"{k}={v}" for k, v in sorted(counters.items())))
    for e in snap.get("engines", []):
        say(f"  engine {e.get('engine_id')}: role={e.get('role')} gpus={e.get('gpus')} "
            f"queue={e.get('queue_depth')} streams_in={e.get('streams_in')}")
    say(f"  active leases: {len(snap.get('leases', []))}; sessions: {snap.get('sessions')}")
    for p in snap.get("paths", []):
        if p.get("latency_s") is None and not p.get("failures"):
            continue
        if p.get("measured"):
            bw = f"{p.get('gbps', 0):.3g} Gb/s measured ({p.get('samples')} samples; static {p.get('static_gbps', 0):.3g})"
        else:
            bw = f"{p.get('gbps', 0):.3g} Gb/s static (no transfer of >= 1 MiB measured yet)"
        say(f"  path {p.get('path')} ({' + '.join(p.get('links', []))}): {bw}, "
            f"latency {(p.get('latency_s') or 0) * 1e3:.1f} ms, {p.get('failures')} failures")


def _print_comparison(result: DemoResult, say: Callable[[str], None]) -> None:
    matches = result.matches()
    if matches is None:
        say("no single-engine reference (--reference none).")
        return
    say("comparison with the single engine's greedy output:")
    for ans, ref, ok in zip(result.answers, result.reference or [], matches, strict=True):
        how = "token ids" if ans.token_ids is not None and ref.token_ids is not None else "text"
        say(f"  {ans.label:<28} {'identical' if ok else 'DIFFERENT'} ({how})")
        if not ok:
            say(f"  {'':<28} P/D:       {ans.text!r}\n  {'':<28} reference: {ref.text!r}")
    say(f"{sum(matches)}/{len(matches)} answers identical to the single engine.")


def default_log_dir() -> Path:
    return Path(os.environ.get("KVLANE_DEMO_LOGS", tempfile.gettempdir())) / f"kvlane-demo-{os.getpid()}"
