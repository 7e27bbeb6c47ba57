"""Real vLLM (CPU) P/D through KVLaneConnector with the TCP backend of `kvlane.transport` (`"transport": "tcp"`,
or `$KVLANE_TEST_TRANSPORT=ucx`; test_vllm_pd.py runs the default, "auto" = ucx when ucxx imports): token-exact
against P itself, a sticky second turn that moves only the blocks D lacks, and (D runs vLLM's
`kv_load_failure_policy: recompute`) a push that never comes turning into a local prefill.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from kvlane.integration.launch import connector_config, free_port, start_policy_service, start_vllm_engine  # noqa: E402
from kvlane.integration.tiny_model import build_tiny_llama, default_cache_dir  # noqa: E402
from test_vllm_pd import BLOCK, MODEL, Deployment, _block_bytes, _post, _prompt, _tokens  # noqa: E402

pytestmark = pytest.mark.vllm

TRANSPORT = os.environ.get("KVLANE_TEST_TRANSPORT", "tcp")
RECV_TIMEOUT = 20.0


@pytest.fixture(scope="module")
def dep():
    logs = Path(tempfile.mkdtemp(prefix=f"kvlane-vllm-{TRANSPORT}-"))
    model = build_tiny_llama(default_cache_dir() / "tiny-llama-test")
    pol = start_policy_service("loopback:gpus=2", free_port(), log_file=logs / "policy.log")
    engines = {}
    try:
        for name, role, core, gpu in (("p0", "prefill", 0, "n0.g0"), ("d0", "decode", 1, "n0.g1")):
            port = free_port()
            # Built here rather than by the launcher so that D can carry vLLM's kv_load_failure_policy.
            cfg = connector_config(role=role, engine_id=name, policy_addr=pol.addr, http=f"http://127.0.0.1:{port}",
                                   extra={"gpus": [gpu], "transport": TRANSPORT, "recv_timeout_s": RECV_TIMEOUT})
            cfg["kv_load_failure_policy"] = "recompute"
            engines[name] = start_vllm_engine(
                model, port, engine_id=name, cpu_cores=[core], served_model_name=MODEL, block_size=BLOCK,
                max_model_len=4096, extra_args=["--kv-transfer-config", json.dumps(cfg)],
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


def test_missed_push_falls_back_to_local_prefill(dep):
    """No P for this request: D's blocks expire after recv_timeout_s, the connector reports them as load
    errors, and vLLM (policy "recompute") prefills them on D; the answer is still the exact one."""
    prompt = _prompt(40, seed=26)
    params = dep.params("p0", "d0")
    t0 = time.monotonic()
    out = _post(dep.url("d0"), {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0,
                                "kv_transfer_params": {**params, "role": "decode"}})
    assert time.monotonic() - t0 >= RECV_TIMEOUT - 1
    got = out["kv_transfer_params"]
    assert got["status"] == "failed" and got["received_bytes"] == 0, got
    assert out["choices"][0]["text"] == dep.reference(prompt, 12)["choices"][0]["text"]
