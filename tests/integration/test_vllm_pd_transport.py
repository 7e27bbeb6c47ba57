"""Real vLLM (CPU) P/D through KVLaneConnector with `kvlane.transport.KVTransport` as the workers' data path
(`"transport": "tcp"`, or `$KVLANE_TEST_TRANSPORT=ucx`) instead of the default blockwire: token-exact
against P itself, and a sticky second turn that moves only the blocks D lacks.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from kvlane.integration.launch import free_port, start_policy_service, start_vllm_engine  # noqa: E402
from kvlane.integration.tiny_model import build_tiny_llama, default_cache_dir  # noqa: E402
from test_vllm_pd import BLOCK, MODEL, Deployment, _block_bytes, _prompt, _tokens  # noqa: E402

pytestmark = pytest.mark.vllm

TRANSPORT = os.environ.get("KVLANE_TEST_TRANSPORT", "tcp")


@pytest.fixture(scope="module")
def dep():
    logs = Path(tempfile.mkdtemp(prefix=f"kvlane-vllm-{TRANSPORT}-"))
    model = build_tiny_llama(default_cache_dir() / "tiny-llama-test")
    pol = start_policy_service("loopback:gpus=2", free_port(), log_file=logs / "policy.log")
    engines = {}
    try:
        for name, role, core, gpu in (("p0", "prefill", 0, "n0.g0"), ("d0", "decode", 1, "n0.g1")):
            engines[name] = start_vllm_engine(
                model, free_port(), role=role, engine_id=name, policy_addr=pol.addr, cpu_cores=[core],
                served_model_name=MODEL, block_size=BLOCK, max_model_len=4096,
                extra_connector_config={"gpus": [gpu], "transport": TRANSPORT, "recv_timeout_s": 60.0},
                log_file=logs / f"{name}.log", tmpdir=logs / f"tmp-{name}",
            )
        for e in engines.values():
            e.wait_healthy(600)
        yield Deployment(model, pol.addr, engines, logs)
    finally:
        for e in engines.values():
            e.stop()
        pol.stop()


def test_token_exact_over_kvlane_transport(dep):
    bb = _block_bytes(dep.model)
    for seed, words in ((21, 10), (22, 70), (23, 130)):
        prompt = _prompt(words, seed=seed)
        n = len(_tokens(dep, prompt))
        _, d_out = dep.pd(prompt, 16)
        got = d_out["kv_transfer_params"]
        assert got["status"] == "done" and got["received_bytes"] == -(-n // BLOCK) * bb, (n, got)
        assert d_out["choices"][0]["text"] == dep.reference(prompt, 16)["choices"][0]["text"]
    assert f"({TRANSPORT})" in (dep.logs / "d0.log").read_text(errors="replace")  # D registered that path


def test_sticky_delta_over_kvlane_transport(dep):
    bb = _block_bytes(dep.model)
    turn1 = _tokens(dep, _prompt(50, seed=24))
    turn2 = turn1 + _tokens(dep, " " + _prompt(40, seed=25), special=False)
    session = "s-" + uuid.uuid4().hex[:8]
    dep.pd(turn1, 4, session=session)
    _, d2 = dep.pd(turn2, 12, session=session)
    got = d2["kv_transfer_params"]
    held = len(turn1) // BLOCK
    assert got["status"] == "done" and got["first_block"] == held
    assert got["received_bytes"] == (-(-len(turn2) // BLOCK) - held) * bb
    assert d2["choices"][0]["text"] == dep.reference(turn2, 12)["choices"][0]["text"]
