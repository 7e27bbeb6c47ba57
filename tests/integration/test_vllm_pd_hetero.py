"""Real vLLM (CPU) with heterogeneous TP: P at TP=1 pushes to D at TP=2 over `kvlane.transport` (tcp backend), each
D rank receiving its own KV head slice of every block (`transport.ranks.head_routes`); D's answer is
token-exact against P itself and the received bytes add up to the whole blocks.
Over UCX this passed once and failed once (2026-11-22: P's UCX handshake with D rank 1 on UCX's tcp path timed
out at 10 s under load), so CI runs it on kvlane's tcp backend; docs/connector.md "Limits".
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from kvlane.integration.launch import free_port, start_policy_service, start_vllm_engine  # noqa: E402
from kvlane.integration.tiny_model import build_tiny_llama, default_cache_dir  # noqa: E402
from test_vllm_pd import BLOCK, MODEL, Deployment, _block_bytes, _prompt, _tokens  # noqa: E402

# `vllm_tp`: D with TP=2 currently stalls on this 2-core machine (P's first step does not finish: vLLM's
# shm broadcast waits 60 s+); kept out of scripts/test.sh until fixed — run with `pytest -m vllm_tp`.
pytestmark = [pytest.mark.vllm, pytest.mark.vllm_tp]


@pytest.fixture(scope="module")
def hetero():
    logs = Path(tempfile.mkdtemp(prefix="kvlane-vllm-hetero-"))
    model = build_tiny_llama(default_cache_dir() / "tiny-llama-test")
    knobs = logs / "policy.yaml"
    knobs.write_text("selection:\n  heterogeneous_tp: true\n")  # the policy refuses TP mismatches otherwise
    pol = start_policy_service("loopback:gpus=3", free_port(), log_file=logs / "policy.log",
                               extra_args=["--config", str(knobs)])
    engines = {}
    try:
        for name, role, cores, tp, gpus, peer_tp in (("p0", "prefill", [0], 1, ["n0.g0"], 2),
                                                     ("d0", "decode", "0|1", 2, ["n0.g1", "n0.g2"], 1)):
            engines[name] = start_vllm_engine(
                model, free_port(), role=role, engine_id=name, policy_addr=pol.addr, cpu_cores=cores, tp=tp,
                served_model_name=MODEL, block_size=BLOCK, max_model_len=4096,
                extra_connector_config={"gpus": gpus, "transport": "tcp", "peer_tp": peer_tp,
                                        "recv_timeout_s": 180.0, "announce_timeout_s": 30.0},
                log_file=logs / f"{name}.log", tmpdir=logs / f"tmp-{name}",
            )
        for e in engines.values():
            e.wait_healthy(600)
        yield Deployment(model, pol.addr, engines, logs)
    finally:
        for e in engines.values():
            e.stop()
        pol.stop()


def test_tp1_to_tp2_is_token_exact(hetero):
    bb = _block_bytes(hetero.model)
    for seed, words in ((41, 12), (42, 100)):
        prompt = _prompt(words, seed=seed)
        n = len(_tokens(hetero, prompt))
        # The reference runs first: P's first request compiles its graph (a minute under load on 2 cores),
        # which must not eat into D's receive deadline.
        ref = hetero.reference(prompt, 16)["choices"][0]["text"]
        _, d_out = hetero.pd(prompt, 16)
        got = d_out["kv_transfer_params"]
        assert got["status"] == "done" and got["received_bytes"] == -(-n // BLOCK) * bb, (n, got)
        assert d_out["choices"][0]["text"] == ref
