"""`kvlane policy serve` as a real process on 127.0.0.1, queried by `kvlane policy ping/snapshot/hot` and
by a client; SIGTERM stops it cleanly."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time

import pytest
from kvlane.integration.cli import app
from kvlane.integration.policy_service import SyncPolicyClient
from kvlane.policy.types import (
    EngineInfo,
    LeaseGrant,
    LeaseRequest,
    PairRequest,
    RankOutcome,
    Role,
    TransferOutcome,
)
from typer.testing import CliRunner

READY = re.compile(r"policy service listening on (tcp://127\.0\.0\.1:\d+)")


def _start(*extra: str) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-c", "from kvlane.integration.cli import main; main()", "policy", "serve",
           "--topology", "loopback:gpus=4", "--port", "0", *extra]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "KVLANE_SECRET": ""})
    assert proc.stderr is not None
    deadline = time.monotonic() + 30
    lines = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 0.5)
        if ready:
            line = proc.stderr.readline()
            lines.append(line)
            m = READY.search(line)
            if m:
                return proc, m.group(1)
        if proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError("server did not become ready:\n" + "".join(lines) + (proc.stderr.read() or ""))


@pytest.fixture
def served():
    proc, address = _start("--lease-ttl", "30")
    try:
        yield address
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_serve_then_query_from_the_cli(served):
    with SyncPolicyClient(served) as c:
        c.register_engine(EngineInfo(engine_id="p0", role=Role.PREFILL, gpus=["n0.g0"], kv_bytes_per_token=2048))
        c.register_engine(EngineInfo(engine_id="d0", role=Role.DECODE, gpus=["n0.g1"], kv_bytes_per_token=2048))
        decision = c.select_pair(PairRequest(request_id="r1", prompt_tokens=512))
        assert (decision.prefill, decision.decode) == ("p0", "d0")
        size = 256 << 20
        grant = c.acquire_lease(LeaseRequest(transfer_id="t1", prefill="p0", decode="d0", bytes=size,
                                             best_effort_ok=False))
        assert isinstance(grant, LeaseGrant)
        # --lease-ttl 30 reached the policy: expiry = ttl + bytes at the 1 Gbps floor rate
        assert grant.expires_at - grant.granted_at == pytest.approx(30.0 + size * 8 / 1e9)
        path = grant.paths[0]
        assert path.path == "shm"  # loopback: shared memory (100 Gbps) before tcp (25 Gbps)
        # 256 MiB in 2 s = 1.07 Gbps measured on a 100 Gbps path: 93.13x slower than the fabric says
        outcome = TransferOutcome(lease_id=grant.lease_id, ok=True, bytes=size, seconds=2.0,
                                  ranks=[RankOutcome(rank=0, path=path.path, bytes=size, seconds=2.0, ok=True)])
        assert c.release_lease(grant.lease_id, outcome) is True
        held = c.acquire_lease(LeaseRequest(transfer_id="t2", prefill="p0", decode="d0", bytes=size,
                                            best_effort_ok=False))
        assert isinstance(held, LeaseGrant) and held.paths[0].path == "tcp"  # the slow shm path is avoided
    runner = CliRunner()
    env = {"COLUMNS": "200"}
    res = runner.invoke(app, ["policy", "ping", served])
    assert res.exit_code == 0 and res.output.startswith(f"ok {served}")
    res = runner.invoke(app, ["policy", "snapshot", served, "--json"])
    assert res.exit_code == 0, res.output
    snap = json.loads(res.output)
    assert sorted(e["engine_id"] for e in snap["engines"]) == ["d0", "p0"]
    assert [x["lease_id"] for x in snap["leases"]] == [held.lease_id]
    res = runner.invoke(app, ["policy", "snapshot", served], env=env)
    assert res.exit_code == 0, res.output
    assert "p0" in res.output and held.lease_id in res.output
    res = runner.invoke(app, ["policy", "hot", served], env=env)
    assert res.exit_code == 0, res.output
    # the held lease reserves 5 Gbps (the minimum stream rate) of each 25 Gbps tcp link's 20 reservable
    assert re.search(r"n0\.g0\.tcp--tcp\s*│\s*25%\s*│\s*5", res.output), res.output
    assert "93.13x" in res.output


def test_cli_reports_an_unreachable_service():
    res = CliRunner().invoke(app, ["policy", "snapshot", "tcp://127.0.0.1:1", "--timeout", "2"])
    assert res.exit_code == 1
    assert "connection_lost" in res.output
    res = CliRunner().invoke(app, ["policy", "snapshot", "127.0.0.1:7070"])
    assert res.exit_code == 2 and "tcp://HOST:PORT" in res.output


def test_serve_with_a_secret_file(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("hunter2\n")
    proc, address = _start("--secret-file", str(secret))
    try:
        runner = CliRunner()
        res = runner.invoke(app, ["policy", "ping", address])
        assert res.exit_code == 1 and "auth_failed" in res.output
        res = runner.invoke(app, ["policy", "ping", address, "--secret-file", str(secret)])
        assert res.exit_code == 0, res.output
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


def test_build_policy_applies_config_file_and_lease_ttl(tmp_path):
    from kvlane.integration.policy_service.app import build_policy

    knobs = tmp_path / "knobs.yaml"
    knobs.write_text("credits:\n  max_streams: 2\n  lease_ttl_s: 7\n")
    a = build_policy("loopback:gpus=4", config_file=str(knobs))
    assert (a.config.credits.max_streams, a.config.credits.lease_ttl_s) == (2, 7.0)
    b = build_policy("loopback:gpus=4", config_file=str(knobs), lease_ttl_s=3.0)
    assert (b.config.credits.max_streams, b.config.credits.lease_ttl_s) == (2, 3.0)
    assert a.config.lease_id_prefix != b.config.lease_id_prefix  # lease ids never repeat across starts
    knobs.write_text("credits:\n  max_stream: 2\n")
    with pytest.raises(ValueError, match="max_stream"):
        build_policy("loopback:gpus=4", config_file=str(knobs))


def test_serve_refuses_a_bad_topology():
    res = CliRunner().invoke(app, ["policy", "serve", "--topology", "nope", "--port", "0"])
    assert res.exit_code == 1
    assert "nope" in res.output and "zcube" in res.output  # names the spec and lists the generators


def test_serve_refuses_a_bad_fault_plan(monkeypatch):
    monkeypatch.setenv("KVLANE_FAULTS", "{not json")
    res = CliRunner().invoke(app, ["policy", "serve", "--topology", "loopback:gpus=2", "--port", "0"])
    assert res.exit_code == 1
    assert "bad $KVLANE_FAULTS" in res.output  # a clear message, not a traceback
