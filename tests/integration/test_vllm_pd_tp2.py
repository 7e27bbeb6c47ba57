"""Real vLLM (CPU) with tensor parallelism 2 on both sides: each of P's TP ranks pushes its own head slice
of every block to D's rank with the same index (rank i -> rank i), and D's answer is token-exact against P
itself. One P (TP=2, cores 0|1) and one D (TP=2, cores 0|1) against `kvlane policy serve
--topology loopback:gpus=4`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from kvlane.integration.launch import free_port, start_policy_service, start_vllm_engine  # noqa: E402
from kvlane.integration.tiny_model import build_tiny_llama, default_cache_dir  # noqa: E402
from test_vllm_pd import BLOCK, MODEL, Deployment, _block_bytes, _prompt, _tokens  # noqa: E402

# `vllm_tp`: 4 worker processes on 2 cores. The stall seen before (D's workers spinning on vLLM's shm queue
# while waiting for KV starved P's TP workers) is gone with the connector's idle-step wait (docs/connector.md).
pytestmark = [pytest.mark.vllm, pytest.mark.vllm_tp]


@pytest.fixture(scope="module")
def tp2():
    logs = Path(tempfile.mkdtemp(prefix="kvlane-vllm-tp2-"))
    model = build_tiny_llama(default_cache_dir() / "tiny-llama-test")
    pol = start_policy_service("loopback:gpus=4", free_port(), log_file=logs / "policy.log")
    engines = {}
    try:
        for name, role, gpus in (("p0", "prefill", ["n0.g0", "n0.g1"]), ("d0", "decode", ["n0.g2", "n0.g3"])):
            engines[name] = start_vllm_engine(
                model, free_port(), role=role, engine_id=name, policy_addr=pol.addr, cpu_cores="0|1", tp=2,
                served_model_name=MODEL, block_size=BLOCK, max_model_len=4096,
                extra_connector_config={"gpus": gpus, "recv_timeout_s": 180.0, "announce_timeout_s": 30.0},
                log_file=logs / f"{name}.log", tmpdir=logs / f"tmp-{name}",
            )
        for e in engines.values():
            e.wait_healthy(600)
        yield Deployment(model, pol.addr, engines, logs)
    finally:
        for e in engines.values():
            e.stop()
        pol.stop()


def test_tp2_to_tp2_is_token_exact_rank_by_rank(tp2):
    bb = _block_bytes(tp2.model)  # all ranks together: each rank moves half the heads
    cfg = json.loads((tp2.model / "config.json").read_text())
    assert cfg["num_key_value_heads"] % 2 == 0
    for seed, words in ((11, 15), (12, 110)):
        prompt = _prompt(words, seed=seed)
        n = len(_tokens(tp2, prompt))
        # The reference runs first: P's first request compiles its graph (a minute under load on 2 cores),
        # which must not eat into D's receive deadline.
        ref = tp2.reference(prompt, 16)["choices"][0]["text"]
        _, d_out = tp2.pd(prompt, 16)
        got = d_out["kv_transfer_params"]
        assert got["status"] == "done" and got["received_bytes"] == -(-n // BLOCK) * bb, (n, got)
        assert d_out["choices"][0]["text"] == ref
    log = (tp2.logs / "p0.log").read_text(errors="replace")
    assert "rank 1" in log  # the second rank registered its cache and pushed its own slice
