"""Real vLLM (CPU) prefill/decode through KVLaneConnector: token-exact output against a single engine,
a negative control (corrupted KV changes the output), sticky-session deltas (only the blocks D lacks are
pushed, byte-exact), the router in front, a decode whose prefill never comes (error at the deadline, no
hang) and a decode engine killed mid-request (clear error, no lease left behind).

Engines start once for the module: P (core 0), D (core 1) and a second D with `fault_injection.corrupt_kv`
(core 1), all against one `kvlane policy serve --topology loopback:gpus=3`. The single-engine reference is
P itself called without kv_transfer_params.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

from kvlane.integration.launch import free_port, start_policy_service, start_router, start_vllm_engine  # noqa: E402
from kvlane.integration.policy_service.client import SyncPolicyClient  # noqa: E402
from kvlane.integration.tiny_model import build_tiny_llama, default_cache_dir  # noqa: E402

pytestmark = pytest.mark.vllm

MODEL = "tiny"
BLOCK = 32
RECV_TIMEOUT = 20.0  # D's wait for a push; P pushes within milliseconds of its prefill here


def _post(url: str, body: dict[str, Any], timeout: float = 300.0) -> dict[str, Any]:
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"{url}: HTTP {exc.code}: {exc.read()[:500]!r}") from None


class Deployment:
    def __init__(self, model: Path, policy_addr: str, engines: dict[str, Any], logs: Path):
        self.model = model
        self.logs = logs
        self.policy = policy_addr
        self.engines = engines

    def url(self, name: str) -> str:
        return self.engines[name].url

    def params(self, prefill: str, decode: str, session: str | None = None) -> dict[str, Any]:
        p = {"kvlane": 1, "transfer_id": "t-" + uuid.uuid4().hex[:12], "prefill": prefill, "decode": decode,
             "policy": self.policy}
        if session:
            p["session_id"] = session
        return p

    def reference(self, prompt: Any, max_tokens: int) -> dict[str, Any]:
        return _post(self.url("p0"), {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})

    def pd(self, prompt: Any, max_tokens: int, prefill: str = "p0", decode: str = "d0",
           session: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """What the router does: the same params to P (max_tokens=1) and D, concurrently."""
        params = self.params(prefill, decode, session)
        out: dict[str, Any] = {}

        def call(key: str, url: str, body: dict[str, Any]) -> None:
            try:
                out[key] = _post(url, body)
            except Exception as exc:  # surfaced below
                out[key] = exc

        ts = [
            threading.Thread(target=call, args=("p", self.url(prefill), {
                "model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0,
                "kv_transfer_params": {**params, "role": "prefill"}})),
            threading.Thread(target=call, args=("d", self.url(decode), {
                "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "kv_transfer_params": {**params, "role": "decode"}})),
        ]
        for t in ts:
            t.start()
        for t in ts:
            t.join(400)
        for k in ("p", "d"):
            if isinstance(out.get(k), Exception):
                raise AssertionError(f"{k} request failed: {out[k]}") from out[k]
        return out["p"], out["d"]


@pytest.fixture(scope="module")
def deployment():
    # Not tmp_path_factory: pytest prunes old basetemps, and these logs are what one reads after a failure.
    logs = Path(tempfile.mkdtemp(prefix="kvlane-vllm-pd-"))
    model = build_tiny_llama(default_cache_dir() / "tiny-llama-test")
    pol = start_policy_service("loopback:gpus=3", free_port(), log_file=logs / "policy.log")
    engines: dict[str, Any] = {}
    common = {"recv_timeout_s": RECV_TIMEOUT, "announce_timeout_s": 30.0}
    try:
        for name, role, core, gpu, extra in (
            ("p0", "prefill", 0, "n0.g0", {}),
            ("d0", "decode", 1, "n0.g1", {}),
            ("dbad", "decode", 1, "n0.g2", {"fault_injection": {"corrupt_kv": True}}),
        ):
            engines[name] = start_vllm_engine(
                model, free_port(), role=role, engine_id=name, policy_addr=pol.addr, cpu_cores=[core],
                served_model_name=MODEL, block_size=BLOCK, max_model_len=4096,
                extra_connector_config={"gpus": [gpu], **common, **extra},
                log_file=logs / f"{name}.log", tmpdir=logs / f"tmp-{name}",
            )
        for e in engines.values():
            e.wait_healthy(600)
        yield Deployment(model, pol.addr, engines, logs)
    finally:
        for e in engines.values():
            e.stop()
        pol.stop()


def _block_bytes(model: Path) -> int:
    cfg = json.loads((model / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 4 * BLOCK  # K+V, fp32


def _prompt(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    words = ["river", "stone", "cloud", "amber", "signal", "vector", "lantern", "orbit", "maple", "quartz",
             "harbor", "copper", "meadow", "pixel", "thunder", "velvet", "glacier", "ember", "falcon", "nimbus"]
    return " ".join(rng.choice(words) for _ in range(n_words))


def _tokens(d: Deployment, text: str, special: bool = True) -> list[int]:
    body = {"model": MODEL, "prompt": text, "add_special_tokens": special}
    req = urllib.request.Request(d.url("p0") + "/tokenize", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())["tokens"]


def test_pd_output_is_token_exact(deployment):
    bb = _block_bytes(deployment.model)
    lengths = []
    for i, n_words in enumerate((5, 20, 45, 90, 140)):
        prompt = _prompt(n_words, seed=i)
        n_tokens = len(_tokens(deployment, prompt))
        lengths.append(n_tokens)
        ref = deployment.reference(prompt, 24)["choices"][0]["text"]
        p_out, d_out = deployment.pd(prompt, 24)
        assert p_out["kv_transfer_params"]["status"] == "pushing"
        got = d_out["kv_transfer_params"]
        assert got["status"] == "done", got
        # D held none of this prompt: every block of it came over the wire.
        assert got["first_block"] == 0
        assert got["received_bytes"] == -(-n_tokens // BLOCK) * bb, (n_tokens, got)
        assert d_out["choices"][0]["text"] == ref, f"prompt {i} ({n_tokens} tokens) differs"
    assert lengths[0] <= 40 and lengths[-1] >= 500, lengths  # short and long prompts, 1 to ~20 blocks


def test_negative_control_corrupted_kv_changes_output(deployment):
    prompt = _prompt(120, seed=99)
    ref = deployment.reference(prompt, 24)["choices"][0]["text"]
    _, good = deployment.pd(prompt, 24)
    assert good["choices"][0]["text"] == ref
    other = _prompt(120, seed=100)  # a prompt the corrupting D holds nothing of: every block is pushed
    _, bad = deployment.pd(other, 24, decode="dbad")
    ref_bad = deployment.reference(other, 24)["choices"][0]["text"]
    assert bad["kv_transfer_params"]["status"] == "done"  # the transfer itself "worked"...
    assert bad["kv_transfer_params"]["first_block"] == 0
    assert bad["choices"][0]["text"] != ref_bad  # ...but D decoded from the flipped bytes, not a recompute


def test_through_the_router(deployment):
    """The router picks the pair (the policy knows p0 and d0 once the corrupting D is gone) and sends both
    halves; the client gets D's answer, token-exact, with the transfer's receipt."""
    client = SyncPolicyClient(deployment.policy, timeout=10.0)
    try:
        assert client.remove_engine("dbad")
    finally:
        client.close()
    deployment.engines["dbad"].stop()
    router = start_router(deployment.policy, free_port(), log_file=deployment.logs / "router.log")
    try:
        prompt = _prompt(70, seed=31)
        req = urllib.request.Request(router.url + "/v1/completions", data=json.dumps(
            {"model": MODEL, "prompt": prompt, "max_tokens": 16, "temperature": 0}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            pair = r.headers["x-kvlane-pair"]
            out = json.loads(r.read())
        assert "p0" in pair and "d0" in pair, pair
        assert out["kv_transfer_params"]["status"] == "done", out.get("kv_transfer_params")
        assert out["choices"][0]["text"] == deployment.reference(prompt, 16)["choices"][0]["text"]
    finally:
        router.stop()


def test_sticky_second_turn_pushes_only_the_delta(deployment):
    bb = _block_bytes(deployment.model)
    turn1 = _tokens(deployment, _prompt(60, seed=7))
    extra = _tokens(deployment, " " + _prompt(60, seed=8), special=False)
    turn2 = turn1 + extra
    session = "s-" + uuid.uuid4().hex[:8]
    _, d1 = deployment.pd(turn1, 8, session=session)
    assert d1["kv_transfer_params"]["status"] == "done"
    assert d1["choices"][0]["text"] == deployment.reference(turn1, 8)["choices"][0]["text"]
    _, d2 = deployment.pd(turn2, 16, session=session)
    got = d2["kv_transfer_params"]
    held = len(turn1) // BLOCK  # D's prefix cache keeps turn 1's full prompt blocks
    assert got["status"] == "done" and got["first_block"] == held, got
    new_blocks = -(-len(turn2) // BLOCK) - held
    assert new_blocks > 0 and got["received_bytes"] == new_blocks * bb
    assert d2["choices"][0]["text"] == deployment.reference(turn2, 16)["choices"][0]["text"]


def test_decode_without_its_prefill_fails_cleanly_at_the_deadline(deployment):
    """No P ever pushes: D's armed blocks expire after recv_timeout_s, vLLM's kv_load_failure_policy
    (default "fail") ends the request with an error instead of a hang, and D keeps serving."""
    d = deployment
    params = d.params("p0", "d0")
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match="HTTP 500"):
        _post(d.url("d0"), {"model": MODEL, "prompt": _prompt(30, seed=3), "max_tokens": 4, "temperature": 0,
                            "kv_transfer_params": {**params, "role": "decode"}})
    waited = time.monotonic() - t0
    assert RECV_TIMEOUT - 1 <= waited < RECV_TIMEOUT + 30, waited
    prompt = _prompt(30, seed=4)
    _, out = d.pd(prompt, 8)
    assert out["choices"][0]["text"] == d.reference(prompt, 8)["choices"][0]["text"]


def test_killed_decode_engine_clear_error_and_no_leaked_lease(deployment):
    """D announces its blocks, then dies while its client waits on the stream. P's push then fails (the
    receiver is gone), P releases the lease with a failed outcome and frees its blocks; the policy shows
    no lease left, and P keeps serving. Runs last: it kills the module's D."""
    d = deployment
    prompt = _prompt(100, seed=5)
    params = d.params("p0", "d0")
    outcome: dict[str, Any] = {}

    def stream() -> None:
        req = urllib.request.Request(d.url("d0") + "/v1/completions", data=json.dumps({
            "model": MODEL, "prompt": prompt, "max_tokens": 500, "temperature": 0, "stream": True,
            "kv_transfer_params": {**params, "role": "decode"}}).encode(), headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                outcome["body"] = r.read()
        except Exception as exc:
            outcome["error"] = exc

    t = threading.Thread(target=stream)
    t.start()
    client = SyncPolicyClient(d.policy, timeout=10.0)
    try:
        announced = client.await_announce(params["transfer_id"], timeout_s=60.0)
        assert announced["decode"] == "d0" and announced["block_ids"]
        t_kill = time.monotonic()
        os.killpg(d.engines["d0"].pid, signal.SIGKILL)  # a crash, not a graceful shutdown
        t.join(60)
        assert not t.is_alive()
        d.engines["d0"].stop()
        # The client sees a broken stream (connection error), not a hang and not a normal end.
        assert "error" in outcome, outcome
        assert isinstance(outcome["error"], (ConnectionError, http.client.HTTPException, urllib.error.URLError))
        assert time.monotonic() - t_kill < 60
        p_out = _post(d.url("p0"), {"model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0,
                                    "kv_transfer_params": {**params, "role": "prefill"}})
        assert p_out["kv_transfer_params"]["status"] == "pushing"
        deadline = time.monotonic() + 60
        log = Path(d.engines["p0"].log_file)
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            if f"transfer {params['transfer_id']}" in text and "FAILED" in text:
                break
            time.sleep(0.5)
        else:
            raise AssertionError("P never reported the failed push")
        while time.monotonic() < deadline and client.snapshot()["leases"]:
            time.sleep(0.5)
        assert client.snapshot()["leases"] == []
        # P is healthy and still serves plain requests.
        assert d.reference(_prompt(20, seed=1), 4)["choices"][0]["text"]
    finally:
        client.close()
