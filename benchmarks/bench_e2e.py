"""End-to-end TTFT of a kvlane 1P1D pair vs vLLM's own NixlConnector (pull) on the same tiny model, plus
each connector's own measured transfer time for the same KV sizes, side by side from one run.

    .venv/bin/python benchmarks/bench_e2e.py                    # 128..4096-token prompts, 5 requests each
    .venv/bin/python benchmarks/bench_e2e.py --requests 3       # on a loaded machine
    .venv/bin/python benchmarks/bench_e2e.py --lengths 128,1024 --skip nixl

Runs the pairs one after the other (never together: 2 cores), P pinned to core 0 and D to core 1:
1. kvlane: policy service + P + D (KVLaneConnector, default transport) + `kvlane router serve`; requests stream
   through the router. The single-engine reference is kvlane's P called directly (no kv_transfer_params).
2. NIXL: P + D with `{"kv_connector":"NixlConnector","kv_role":"kv_both"}`; this script is the proxy
   (vLLM's pull flow: P with `do_remote_decode` and max_tokens=1, then D streamed with P's returned
   `kv_transfer_params`), so NIXL's front has no extra process hop while kvlane's has the router.
TTFT = client send -> first streamed content chunk. Prefix caching is off on every engine and every prompt
is fresh random token ids, so no request hits a cache. Transfer time: kvlane's own per-transfer log line on
P (`pushed N bytes (k blocks) in S`), NIXL's `vllm:nixl_xfer_time_seconds` / `vllm:nixl_bytes_transferred`
histograms scraped from D before and after each request (the engines run with stats logging on).
On this machine end-to-end TTFT is dominated by CPU contention (idle vLLM workers spin a core each;
FACTS.md); the transfer columns are the fair connector comparison. Never part of the test suite.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import re
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvlane.integration.launch import (
    EngineProcess,
    ProcessSet,
    free_port,
    start_policy_service,
    start_router,
    vllm_command,
    vllm_env,
)
from kvlane.integration.tiny_model import build_tiny_llama, default_cache_dir

MODEL = "tiny"
BLOCK = 32
MAX_POS = 4352  # 4096-token prompt + output, a multiple of the block size
SPECIAL_IDS = 4  # <unk> <s> </s> <pad> are ids 0..3 in the tiny tokenizer
P_CORE, D_CORE = 0, 1

PUSH_LINE = re.compile(r"kvlane P \S+: transfer (\S+) \(request \S+\) to \S+ (ok|FAILED): pushed (\d+) bytes "
                       r"\((\d+) blocks\) in ([0-9.]+)s, lease wait [0-9.]+s, path [^ ]+(?: \(rank \d+: ([^)]*)\))?")
METRIC_LINE = re.compile(r"^(vllm:nixl_(?:xfer_time_seconds|bytes_transferred)_(?:sum|count))(?:\{[^}]*\})?\s+(\S+)$",
                         re.M)


@dataclass
class Sample:
    ttft: float | None = None  # seconds; None = failed
    tokens: list[int] | None = None
    error: str = ""
    xfer_s: float | None = None
    xfer_bytes: int | None = None
    p_hop_s: float | None = None  # NIXL only: the proxy's P request (prefill, max_tokens=1) until P answered
    steps: str = ""  # kvlane only: the push's steps from P's log line ("arm 1.2 ms, send 3.4 ms, confirm 0.9 ms")


@dataclass
class Results:
    # setup -> prompt length -> samples
    runs: dict[str, dict[int, list[Sample]]] = field(default_factory=dict)

    def add(self, setup: str, length: int, s: Sample) -> None:
        self.runs.setdefault(setup, {}).setdefault(length, []).append(s)


# ---------------------------------------------------------------------------------------------- HTTP


def _post_json(url: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"POST {url}: HTTP {exc.code}: {exc.read()[:300]!r}") from None


def stream_completion(base: str, body: dict[str, Any], timeout: float, t0: float | None = None
                      ) -> tuple[float, list[int], dict[str, str]]:
    """POST a streamed completion; returns (seconds from t0 to the first content chunk, all token ids, headers).
    Raises on HTTP errors, in-band stream errors and when the whole stream takes longer than `timeout`."""
    t0 = time.monotonic() if t0 is None else t0
    deadline = t0 + timeout
    host, port = base.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
        ttft: float | None = None
        ids: list[int] = []
        for raw in resp:
            if time.monotonic() > deadline:
                raise TimeoutError(f"stream still running after {timeout:.0f}s")
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                raise RuntimeError(f"stream error: {str(ev['error'])[:300]}")
            for ch in ev.get("choices", []):
                if ttft is None and (ch.get("text") or ch.get("token_ids")):
                    ttft = time.monotonic() - t0
                ids.extend(ch.get("token_ids") or [])
        if ttft is None:
            raise RuntimeError("stream ended without content")
        return ttft, ids, headers
    finally:
        conn.close()


def scrape_nixl(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for name, value in METRIC_LINE.findall(text):
        out[name] = out.get(name, 0.0) + float(value)
    return out


# ---------------------------------------------------------------------------------------------- engines


def start_engine(model: Path, name: str, core: int, port: int, kv_cfg: dict[str, Any], logs: Path,
                 env: dict[str, str] | None = None) -> EngineProcess:
    """One vLLM server from `vllm_command` with the raw `--kv-transfer-config` `kv_cfg`, stats logging on
    (vLLM collects connector stats only then) and prefix caching off."""
    argv = vllm_command(model, port, block_size=BLOCK, max_model_len=MAX_POS, served_model_name=MODEL,
                        extra_args=["--no-enable-prefix-caching",
                                    "--kv-transfer-config", json.dumps(kv_cfg, separators=(",", ":"))])
    argv.remove("--disable-log-stats")
    tmp = Path(tempfile.mkdtemp(prefix=f"kvl-{name}-", dir="/tmp"))
    proc = EngineProcess(name=f"vllm:{name}", argv=argv, log_file=logs / f"{name}.log",
                         env=vllm_env(cpu_cores=[core], tmpdir=tmp, env=env), engine_id=name, port=port,
                         cleanup_dirs=[tmp])
    return proc.start()  # type: ignore[return-value]


def kvlane_cfg(role: str, engine_id: str, policy: str, port: int, gpu: str) -> dict[str, Any]:
    return {"kv_connector": "KVLaneConnector", "kv_connector_module_path": "kvlane.connector.vllm",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"policy": policy, "role": role, "engine_id": engine_id,
                                          "http": f"http://127.0.0.1:{port}", "gpus": [gpu]}}


NIXL_CFG = {"kv_connector": "NixlConnector", "kv_role": "kv_both"}


def wait_push_line(log: Path, transfer_id: str, timeout: float = 10.0) -> tuple[float, int, str] | None:
    """kvlane P's own per-transfer log line for `transfer_id`: (seconds, bytes, steps), None if failed/absent."""
    deadline = time.monotonic() + timeout
    while True:
        for m in PUSH_LINE.finditer(log.read_text(errors="replace")):
            if m.group(1) == transfer_id:
                return (float(m.group(5)), int(m.group(3)), m.group(6) or "") if m.group(2) == "ok" else None
        if time.monotonic() > deadline:
            return None
        time.sleep(0.2)


def wait_all(engines: list[EngineProcess], timeout: float) -> float:
    t0 = time.monotonic()
    for e in engines:
        e.wait_healthy(max(timeout - (time.monotonic() - t0), 1.0))
    return time.monotonic() - t0


# ---------------------------------------------------------------------------------------------- runs


def body_for(prompt: list[int], max_tokens: int) -> dict[str, Any]:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "return_token_ids": True}


def _attempt(fn: Callable[[Sample], None]) -> Sample:
    s = Sample()
    try:
        fn(s)
    except Exception as exc:  # recorded in the table, never a hang or an abort of the run
        s.ttft, s.error = None, f"{type(exc).__name__}: {exc}"[:200]
    return s


def _fmt(s: Sample) -> str:
    if s.ttft is None:
        return f"FAILED ({s.error})"
    x = f", xfer {s.xfer_s * 1e3:.1f} ms / {s.xfer_bytes} B" if s.xfer_s is not None else ""
    if s.p_hop_s is not None:
        x += f", P hop {s.p_hop_s * 1e3:.0f} ms"
    if s.steps:
        x += f" ({s.steps})"
    return f"{s.ttft * 1e3:.0f} ms{x}"


def run_kvlane(model: Path, prompts: dict[int, list[list[int]]], args: argparse.Namespace, logs: Path,
               res: Results, say: Callable[[str], None]) -> None:
    with ProcessSet() as procs:
        pol = procs.add(start_policy_service("loopback:gpus=2", free_port(), log_file=logs / "policy.log"))
        addr = pol.addr  # type: ignore[attr-defined]
        engines: list[EngineProcess] = []
        for name, role, core, gpu in (("kv-p0", "prefill", P_CORE, "n0.g0"), ("kv-d0", "decode", D_CORE, "n0.g1")):
            port = free_port()
            engines.append(procs.add(start_engine(model, name, core, port,  # type: ignore[arg-type]
                                                  kvlane_cfg(role, name, addr, port, gpu), logs)))
        say(f"kvlane: P {engines[0].url} (core {P_CORE}), D {engines[1].url} (core {D_CORE}); starting ...")
        say(f"kvlane pair healthy after {wait_all(engines, args.startup_timeout):.0f}s")
        router = procs.add(start_router(addr, free_port(), log_file=logs / "router.log"))
        p, r_url = engines[0], router.url  # type: ignore[attr-defined]

        def single(prompt: list[int]) -> Sample:
            def go(s: Sample) -> None:
                s.ttft, s.tokens, _ = stream_completion(p.url, body_for(prompt, args.max_tokens), args.timeout)
            return _attempt(go)

        def pd(prompt: list[int]) -> Sample:
            def go(s: Sample) -> None:
                s.ttft, s.tokens, hdrs = stream_completion(r_url, body_for(prompt, args.max_tokens), args.timeout)
                got = wait_push_line(p.log_file, hdrs.get("x-kvlane-transfer-id", "?"))
                if got is not None:
                    s.xfer_s, s.xfer_bytes, s.steps = got
            return _attempt(go)

        _measure(prompts, args, res, {"single": single, "kvlane": pd}, say)


def nixl_setup_name(tls: str) -> str:
    return "nixl" if tls == "default" else f"nixl[{tls}]"


def run_nixl(model: Path, prompts: dict[int, list[list[int]]], args: argparse.Namespace, logs: Path,
             res: Results, say: Callable[[str], None], tls: str) -> None:
    """One NixlConnector pair; `tls` is UCX_TLS for both engines ("default": UCX chooses, on one host
    that includes shared memory)."""
    setup = nixl_setup_name(tls)
    tag = "" if tls == "default" else "-" + re.sub(r"[^a-z0-9]", "", tls)
    with ProcessSet() as procs:
        engines: list[EngineProcess] = []
        for name, core in ((f"nixl{tag}-p0", P_CORE), (f"nixl{tag}-d0", D_CORE)):
            env = {"VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port()), "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1"}
            if tls != "default":
                env["UCX_TLS"] = tls
            engines.append(procs.add(start_engine(model, name, core, free_port(), NIXL_CFG, logs, env)))  # type: ignore[arg-type]
        say(f"{setup}: P {engines[0].url} (core {P_CORE}), D {engines[1].url} (core {D_CORE}), UCX_TLS={tls}; "
            "starting ...")
        say(f"{setup} pair healthy after {wait_all(engines, args.startup_timeout):.0f}s")
        p, d = engines

        def pd(prompt: list[int]) -> Sample:
            def go(s: Sample) -> None:
                before = scrape_nixl(d.url)
                t0 = time.monotonic()
                body = body_for(prompt, args.max_tokens)
                pre = _post_json(p.url + "/v1/completions", {
                    **body, "max_tokens": 1, "stream": False,
                    "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False,
                                           "remote_engine_id": None, "remote_block_ids": None,
                                           "remote_host": None, "remote_port": None}}, args.timeout)
                s.p_hop_s = time.monotonic() - t0
                params = pre.get("kv_transfer_params")
                if not params:
                    raise RuntimeError(f"P returned no kv_transfer_params: {str(pre)[:200]}")
                left = args.timeout - (time.monotonic() - t0)
                s.ttft, s.tokens, _ = stream_completion(d.url, {**body, "kv_transfer_params": params}, left, t0=t0)
                deadline = time.monotonic() + 10.0
                while True:  # the D engine's stats reach /metrics with its engine-core outputs
                    after = scrape_nixl(d.url)
                    n = after.get("vllm:nixl_xfer_time_seconds_count", 0) - before.get(
                        "vllm:nixl_xfer_time_seconds_count", 0)
                    if n > 0 or time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
                if n > 0:
                    s.xfer_s = (after["vllm:nixl_xfer_time_seconds_sum"]
                                - before.get("vllm:nixl_xfer_time_seconds_sum", 0.0))
                    s.xfer_bytes = int(after.get("vllm:nixl_bytes_transferred_sum", 0.0)
                                       - before.get("vllm:nixl_bytes_transferred_sum", 0.0))
            return _attempt(go)

        def alone(prompt: list[int]) -> Sample:
            def go(s: Sample) -> None:
                s.ttft, s.tokens, _ = stream_completion(p.url, body_for(prompt, args.max_tokens), args.timeout)
            return _attempt(go)

        # NIXL's P called directly as well: its own prefill speed next to the kvlane P's ("single")
        _measure(prompts, args, res, {f"single[{setup} P]": alone, setup: pd}, say)


def _warm_prompt(rng: random.Random, vocab: int) -> list[int]:
    return [rng.randrange(SPECIAL_IDS, vocab) for _ in range(200)]


def _measure(prompts: dict[int, list[list[int]]], args: argparse.Namespace, res: Results,
             setups: dict[str, Callable[[list[int]], Sample]], say: Callable[[str], None]) -> None:
    rng = random.Random(12345)
    for name, fn in setups.items():  # first requests compile/warm up; not counted
        s = fn(_warm_prompt(rng, args.vocab))
        say(f"  warm-up {name}: {_fmt(s)}")
    for length, plist in prompts.items():
        for i, prompt in enumerate(plist):
            for name, fn in setups.items():
                s = fn(prompt)
                res.add(name, length, s)
                say(f"  {name:<6} {length:5d} tokens #{i}: {_fmt(s)}")


# ---------------------------------------------------------------------------------------------- report


def pct(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty list."""
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _med(xs: list[float]) -> float | None:
    return pct(xs, 50) if xs else None


def _ttft_cell(samples: list[Sample]) -> str:
    if not samples:
        return "not run"
    ok = [s.ttft for s in samples if s.ttft is not None]
    fails = len(samples) - len(ok)
    if not ok:
        return f"all {fails} FAILED"
    return f"{pct(ok, 50) * 1e3:.0f} / {pct(ok, 99) * 1e3:.0f}" + (f" ({fails} FAILED)" if fails else "")


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def report(res: Results, lengths: list[int], say: Callable[[str], None]) -> list[str]:
    """Print (and return) the two tables: TTFT with ratios and token equality, then transfer times."""
    runs = res.runs
    nixls = [n for n in runs if n.startswith("nixl")]
    pds = ["kvlane", *nixls]
    alones = [n for n in runs if n.startswith("single[")]

    def samples(name: str, L: int) -> list[Sample]:
        return runs.get(name, {}).get(L, [])

    def med_ttft(name: str, L: int) -> float | None:
        return _med([s.ttft for s in samples(name, L) if s.ttft is not None])

    def med_xfer(name: str, L: int) -> float | None:
        return _med([s.xfer_s for s in samples(name, L) if s.xfer_s is not None])

    lines = ["TTFT ms, median / p99:",
             "| prompt tokens | single | " + " | ".join(alones + pds) + " | "
             + " | ".join(f"kvlane/{n} TTFT" for n in nixls) + " | "
             + " | ".join(f"{n} P hop ms" for n in nixls) + " | same tokens as single: " + ", ".join(pds) + " |"]
    lines.append("|" + "---|" * (3 + len(alones) + len(pds) + 2 * len(nixls)))
    for L in lengths:
        ref = samples("single", L)
        eq = []
        for n in pds:
            got = samples(n, L)
            same = sum(1 for a, b in zip(got, ref, strict=False) if a.tokens is not None and a.tokens == b.tokens)
            eq.append(f"{same}/{len(got)}" if got and ref else "-")
        hops = [_med([s.p_hop_s for s in samples(n, L) if s.p_hop_s is not None]) for n in nixls]
        lines.append(f"| {L} | {_ttft_cell(ref)} | " + " | ".join(_ttft_cell(samples(n, L)) for n in alones + pds)
                     + " | "
                     + " | ".join(_ratio(med_ttft("kvlane", L), med_ttft(n, L)) for n in nixls) + " | "
                     + " | ".join(f"{h * 1e3:.0f}" if h is not None else "-" for h in hops) + " | "
                     + ", ".join(eq) + " |")
    lines += ["", "Connector transfer time ms, median (each connector's own measurement, same KV bytes):",
              "| prompt tokens | KV bytes | " + " | ".join(pds) + " | "
              + " | ".join(f"kvlane/{n}" for n in nixls) + " |",
              "|" + "---|" * (2 + len(pds) + len(nixls))]
    for L in lengths:
        sizes = sorted({s.xfer_bytes for n in pds for s in samples(n, L) if s.xfer_bytes is not None})
        xs = {n: med_xfer(n, L) for n in pds}
        lines.append(f"| {L} | {', '.join(f'{b / 1e6:.2f} MB' for b in sizes) or '-'} | "
                     + " | ".join(f"{xs[n] * 1e3:.1f}" if xs[n] is not None else "-" for n in pds) + " | "
                     + " | ".join(_ratio(xs["kvlane"], xs[n]) for n in nixls) + " |")
    for line in lines:
        say(line)
    fails = [(n, L, s.error) for n, per in runs.items() for L, ss in per.items() for s in ss if s.error]
    say(f"failures: {len(fails)}")
    for n, L, e in fails:
        say(f"  {n} {L} tokens: {e}")
    say("TTFT = client send -> first streamed chunk, through each setup's front (kvlane: router process; NIXL: "
        "this script as proxy, P then D; 'P hop' = its P request). single = kvlane's P called directly, "
        "single[nixl.. P] = that pair's P called directly. On 2 cores end-to-end TTFT is dominated by "
        "CPU contention between the engines (FACTS.md); the transfer table (each connector's own measured time "
        "for the same KV bytes: kvlane P's per-transfer log, NIXL D's xfer-time histogram) is the fair "
        "connector comparison.")
    return lines


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="128,512,1024,2048,4096", help="prompt lengths in tokens, comma-separated")
    ap.add_argument("--requests", type=int, default=5, help="requests per length and setup (sequential)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=180.0, help="per-request deadline, seconds")
    ap.add_argument("--startup-timeout", type=float, default=900.0)
    ap.add_argument("--skip", choices=["kvlane", "nixl"], action="append", default=[])
    ap.add_argument("--nixl-ucx-tls", action="append", default=None,
                    help="UCX_TLS of one NIXL pair, repeatable; 'default' = UCX chooses (shared memory on one "
                         "host). Default: two pairs, 'default' and 'tcp'")
    ap.add_argument("--logs", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="write every sample here")
    args = ap.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    if not lengths or min(lengths) < 1 or max(lengths) + args.max_tokens > MAX_POS:
        ap.error(f"--lengths: each in 1..{MAX_POS - args.max_tokens} (max model length {MAX_POS} with output)")
    if args.requests < 1:
        ap.error("--requests must be >= 1")
    logs = args.logs or Path(tempfile.mkdtemp(prefix="kvlane-bench-e2e-"))
    logs.mkdir(parents=True, exist_ok=True)

    def say(msg: str) -> None:
        print(msg, flush=True)

    model = build_tiny_llama(default_cache_dir() / "tiny-llama-bench", max_pos=MAX_POS)
    args.vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    rng = random.Random(0)
    prompts = {L: [[rng.randrange(SPECIAL_IDS, args.vocab) for _ in range(L)] for _ in range(args.requests)]
               for L in lengths}
    say(f"bench_e2e: model {model} (vocab {args.vocab}), lengths {lengths}, {args.requests} requests each, "
        f"max_tokens {args.max_tokens}, logs {logs}  [{uuid.uuid4().hex[:6]}]")
    res = Results()
    started = time.monotonic()
    try:
        if "kvlane" not in args.skip:
            run_kvlane(model, prompts, args, logs, res, say)
        if "nixl" not in args.skip:
            for tls in args.nixl_ucx_tls or ["default", "tcp"]:
                run_nixl(model, prompts, args, logs, res, say, tls)
    except KeyboardInterrupt:
        say("interrupted: reporting what was measured")
    say(f"\nresults ({time.monotonic() - started:.0f}s wall, {time.strftime('%Y-%m-%d %H:%M')}):")
    report(res, lengths, say)
    if args.json:
        args.json.write_text(json.dumps({n: {L: [s.__dict__ for s in ss] for L, ss in per.items()}
                                         for n, per in res.runs.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
