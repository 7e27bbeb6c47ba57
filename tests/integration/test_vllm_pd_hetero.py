"""Real vLLM (CPU) with heterogeneous TP, both ways, over `kvlane.transport` (the default backend, UCX):
P TP=1 -> D TP=2 (each D rank receives its own KV-head slice of every block) and P TP=2 -> D TP=1 (each P rank
pushes its heads into the matching slice of D's blocks), routes by `transport.ranks.head_routes`. D's answer
is token-exact against P itself and the received bytes add up to the whole blocks.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from kvlane.integration.launch import free_port, start_policy_service, start_vllm_engine  # noqa: E402
from kvlane.integration.tiny_model import build_tiny_llama, default_cache_dir  # noqa: E402
from test_vllm_pd import BLOCK, MODEL, Deployment, _block_bytes, _prompt, _tokens  # noqa: E402

# `vllm_tp`: three worker processes on 2 cores (docs/connector.md, "Idle steps" and "Transport threads").
pytestmark = [pytest.mark.vllm, pytest.mark.vllm_tp]


def _cores(tp: int, core: int) -> str | list[int]:
    return "0|1" if tp == 2 else [core]


@pytest.fixture(scope="module", params=[(1, 2), (2, 1)], ids=["p_tp1-d_tp2", "p_tp2-d_tp1"])
def hetero(request):
    p_tp, d_tp = request.param
    logs = Path(tempfile.mkdtemp(prefix="kvlane-vllm-hetero-"))
    model = build_tiny_llama(default_cache_dir() / "tiny-llama-test")
    knobs = logs / "policy.yaml"
    knobs.write_text("selection:\n  heterogeneous_tp: true\n")  # the policy refuses TP mismatches otherwise
    pol = start_policy_service("loopback:gpus=3", free_port(), log_file=logs / "policy.log",
                               extra_args=["--config", str(knobs)])
    engines = {}
    try:
        gpus_p = [f"n0.g{i}" for i in range(p_tp)]
        gpus_d = [f"n0.g{p_tp + i}" for i in range(d_tp)]
        for name, role, cores, tp, gpus, peer_tp in (("p0", "prefill", _cores(p_tp, 0), p_tp, gpus_p, d_tp),
                                                     ("d0", "decode", _cores(d_tp, 1), d_tp, gpus_d, p_tp)):
            engines[name] = start_vllm_engine(
                model, free_port(), role=role, engine_id=name, policy_addr=pol.addr, cpu_cores=cores, tp=tp,
                served_model_name=MODEL, block_size=BLOCK, max_model_len=4096,
                extra_connector_config={"gpus": gpus, "peer_tp": peer_tp,
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


def test_heterogeneous_tp_is_token_exact(hetero):
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
