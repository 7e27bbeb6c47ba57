"""One TP=2 P + TP=2 D vLLM deployment on this host, one reference request to P, then one P/D request:
prints whether D's answer matches and how long the P/D request took. For chasing first-handshake problems
(docs/transport.md, "TCP path handshakes"); run it in a loop with KVLANE_UCX_TRACE=1 and, for per-thread
scheduling data, `scripts/thread_sampler.py` beside it.

usage: .venv/bin/python scripts/probe_tp2.py [CORES (default "0|1")] [TRANSPORT (ucx|tcp)] [--hold]
"""

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
from kvlane.integration.launch import free_port, start_policy_service, start_vllm_engine  # noqa: E402
from kvlane.integration.tiny_model import build_tiny_llama, default_cache_dir  # noqa: E402
from test_vllm_pd import BLOCK, MODEL, Deployment, _prompt  # noqa: E402

args = [a for a in sys.argv[1:] if a != "--hold"]
cores = args[0] if args else "0|1"
extra = {"transport": args[1]} if len(args) > 1 else {}
logs = Path(tempfile.mkdtemp(prefix="kvlane-tp2probe-"))
print("logs", logs, flush=True)
model = build_tiny_llama(default_cache_dir() / "tiny-llama-test")
pol = start_policy_service("loopback:gpus=4", free_port(), log_file=logs / "policy.log")
engines = {}
for name, role, gpus in (("p0", "prefill", ["n0.g0", "n0.g1"]), ("d0", "decode", ["n0.g2", "n0.g3"])):
    engines[name] = start_vllm_engine(
        model, free_port(), role=role, engine_id=name, policy_addr=pol.addr, cpu_cores=cores, tp=2,
        served_model_name=MODEL, block_size=BLOCK, max_model_len=4096,
        extra_connector_config={"gpus": gpus, "recv_timeout_s": 180.0, "announce_timeout_s": 30.0, **extra},
        log_file=logs / f"{name}.log", tmpdir=logs / f"tmp-{name}")
try:
    for e in engines.values():
        e.wait_healthy(600)
    dep = Deployment(model, pol.addr, engines, logs)
    print("healthy", time.strftime("%T"), flush=True)
    prompt = _prompt(15, seed=11)
    ref = dep.reference(prompt, 16)["choices"][0]["text"]
    t0 = time.time()
    try:
        _, d = dep.pd(prompt, 16)
        print("pd done", round(time.time() - t0, 3), "same tokens:", d["choices"][0]["text"] == ref,
              d["kv_transfer_params"], flush=True)
    except Exception as exc:
        print("pd failed", round(time.time() - t0, 3), exc, flush=True)
    if "--hold" in sys.argv:
        time.sleep(3600)
finally:
    for e in engines.values():
        e.stop()
    pol.stop()
