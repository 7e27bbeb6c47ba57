"""Process helpers: vLLM command line and env, log waiting, death with log tail, group kill, health polling."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import textwrap
import time

import pytest
from kvlane.integration.launch import (
    POLICY_LISTENING,
    EngineProcess,
    ManagedProcess,
    PolicyProcess,
    ProcessDied,
    ProcessSet,
    StartTimeout,
    free_port,
    short_tmpdir,
    vllm_command,
    vllm_env,
)


def _kv_config(argv: list[str]) -> dict:
    return json.loads(argv[argv.index("--kv-transfer-config") + 1])


def test_vllm_command_with_connector_carries_the_contract_keys_and_passes_extras_through():
    argv = vllm_command("/m", 8100, role="decode", engine_id="d0", policy_addr="tcp://127.0.0.1:7000",
                        block_size=64, extra_connector_config={"gpus": ["h0/gpu1"], "transport": "tcp"})
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--block-size") + 1] == "64"
    assert argv[argv.index("--port") + 1] == "8100"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    cfg = _kv_config(argv)
    assert cfg == {
        "kv_connector": "KVLaneConnector",
        "kv_connector_module_path": "kvlane.connector.vllm",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {
            "policy": "tcp://127.0.0.1:7000", "role": "decode", "engine_id": "d0",
            "http": "http://127.0.0.1:8100", "gpus": ["h0/gpu1"], "transport": "tcp",
        },
    }


def test_plain_engine_has_no_connector_and_bad_arguments_are_named():
    assert "--kv-transfer-config" not in vllm_command("/m", 8000)
    with pytest.raises(ValueError, match="block_size=48"):
        vllm_command("/m", 8000, block_size=48)
    with pytest.raises(ValueError, match="needs engine_id and policy_addr"):
        vllm_command("/m", 8000, role="prefill")
    with pytest.raises(ValueError, match="may not set engine_id"):
        vllm_command("/m", 8000, role="prefill", engine_id="p", policy_addr="tcp://h:1",
                     extra_connector_config={"engine_id": "other"})
    with pytest.raises(ValueError, match="role='both'"):
        vllm_command("/m", 8000, role="both", engine_id="p", policy_addr="tcp://h:1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expected tcp://"):
        vllm_command("/m", 8000, role="prefill", engine_id="p", policy_addr="h:1")
    with pytest.raises(ValueError, match="without a role"):
        vllm_command("/m", 8000, extra_connector_config={"x": 1})


def test_vllm_env_pins_cores_and_isolates_tmpdir(tmp_path):
    env = vllm_env(cpu_cores=[1], kv_cache_gib=2, tmpdir=tmp_path / "t")
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert env["TMPDIR"] == str(tmp_path / "t") and (tmp_path / "t").is_dir()
    assert env["UCX_WARN_UNUSED_ENV_VARS"] == "n" and env["HF_HUB_OFFLINE"] == "1"
    assert vllm_env(cpu_cores=None, tmpdir=tmp_path)["VLLM_CPU_OMP_THREADS_BIND"] == "auto"
    with pytest.raises(ValueError, match="cpu_cores"):
        vllm_env(cpu_cores=[], tmpdir=tmp_path)


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); treat it as dead
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def test_wait_for_log_and_group_stop_kills_grandchildren(tmp_path):
    code = """
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print("grandchild", child.pid, flush=True)
        time.sleep(0.3)
        print("policy service listening on tcp://127.0.0.1:4321 (no auth)", flush=True)
        time.sleep(60)
    """
    p = PolicyProcess(name="fake-policy", argv=_py(code), log_file=tmp_path / "p.log", env=dict(os.environ))
    with ProcessSet() as procs:
        procs.add(p.start())
        assert p.wait_ready(10) == "tcp://127.0.0.1:4321"
        grandchild = int(p.log_file.read_text().split("grandchild ")[1].split()[0])
        assert _alive(grandchild)
    assert not p.alive()
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)
    assert p.stop() is not None  # idempotent


def test_child_death_raises_with_exit_code_and_log_tail(tmp_path):
    p = ManagedProcess(name="dies", argv=_py("import sys; print('boom: no such model', flush=True); sys.exit(3)"),
                       log_file=tmp_path / "d.log", env=dict(os.environ)).start()
    with pytest.raises(ProcessDied, match=r"(?s)exited with code 3.*boom: no such model"):
        p.wait_for_log(POLICY_LISTENING, 10)


def test_wait_for_log_times_out_with_tail(tmp_path):
    p = ManagedProcess(name="quiet", argv=_py("print('starting', flush=True); import time; time.sleep(30)"),
                       log_file=tmp_path / "q.log", env=dict(os.environ)).start()
    try:
        with pytest.raises(StartTimeout, match=r"(?s)within 1s.*starting"):
            p.wait_for_log(POLICY_LISTENING, 1)
    finally:
        p.stop()


def test_engine_wait_healthy_polls_health_until_200(tmp_path):
    port = free_port()
    code = f"""
        import time
        from http.server import BaseHTTPRequestHandler, HTTPServer
        t0 = time.monotonic()
        class H(BaseHTTPRequestHandler):
            def do_GET(self):
                ok = self.path == "/health" and time.monotonic() - t0 > 0.5
                self.send_response(200 if ok else 503); self.end_headers()
            def log_message(self, *a): pass
        HTTPServer(("127.0.0.1", {port}), H).serve_forever()
    """
    e = EngineProcess(name="fake-engine", argv=_py(code), log_file=tmp_path / "e.log", env=dict(os.environ),
                      engine_id="d0", port=port).start()
    try:
        e.wait_healthy(timeout=15, poll=0.1)
        assert e.url == f"http://127.0.0.1:{port}"
    finally:
        e.stop()
    dead = EngineProcess(name="dead-engine", argv=_py("raise SystemExit('model not found')"),
                         log_file=tmp_path / "x.log", env=dict(os.environ), engine_id="p0", port=free_port()).start()
    with pytest.raises(ProcessDied, match="model not found"):
        dead.wait_healthy(timeout=15, poll=0.1)


def test_tmpdir_must_be_short_enough_for_vllm_ipc_sockets(tmp_path):
    long_dir = tmp_path / ("x" * 80)
    with pytest.raises(ValueError, match="socket paths are limited to 107 bytes"):
        vllm_env(cpu_cores=[0], tmpdir=long_dir)
    short = short_tmpdir("decode-engine-with-a-long-name")
    try:
        assert short.is_dir() and len(str(short)) + 1 + 36 <= 107
    finally:
        short.rmdir()


def test_stop_removes_the_directories_the_launcher_created(tmp_path):
    made = short_tmpdir("t")
    p = ManagedProcess(name="sleeper", argv=_py("import time; time.sleep(30)"), log_file=tmp_path / "s.log",
                       env=dict(os.environ), cleanup_dirs=[made]).start()
    p.stop()
    assert not made.exists()


def test_stop_all_stops_children_in_parallel_and_kills_those_ignoring_sigterm(tmp_path):
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    procs = ProcessSet()
    ps = [procs.add(ManagedProcess(name=f"stubborn{i}", argv=_py(stubborn), log_file=tmp_path / f"{i}.log",
                                   env=dict(os.environ)).start()) for i in range(3)]
    for p in ps:
        p.wait_for_log(re.compile("up"), 10)
    t0 = time.monotonic()
    procs.stop_all(timeout=1.0)
    assert time.monotonic() - t0 < 2.5  # one shared grace period, not one per child
    assert not any(p.alive() for p in ps)
    assert all(p.proc.returncode == -signal.SIGKILL for p in ps)
