"""`kvlane router serve` and `kvlane policy serve` as real processes (through the launch helpers): the
router comes up healthy against the policy, answers 503 naming the reason when no engine is registered,
and a bad --policy address is refused before anything starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from kvlane.integration.launch import ProcessSet, free_port, start_policy_service, start_router


def test_router_process_against_policy_process(tmp_path):
    with ProcessSet() as procs:
        policy = procs.add(start_policy_service("loopback:gpus=2", free_port(), log_file=tmp_path / "policy.log",
                                                wait=60))
        router = procs.add(start_router(policy.addr, free_port(), log_file=tmp_path / "router.log", wait=60))
        with urllib.request.urlopen(router.url + "/health", timeout=10) as r:
            assert json.loads(r.read())["policy"] == policy.addr
        req = urllib.request.Request(router.url + "/v1/completions", data=b'{"prompt": "hi"}',
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        assert err.value.code == 503
        assert "no prefill/decode pair available" in json.loads(err.value.read())["error"]["message"]
    assert not router.alive() and not policy.alive()
    assert f"router listening on {router.url}" in (tmp_path / "router.log").read_text()


def test_bad_policy_address_is_refused():
    out = subprocess.run([sys.executable, "-c", "from kvlane.integration.cli import main; main()", "router", "serve",
                          "--policy", "127.0.0.1:7000"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "COLUMNS": "300", "NO_COLOR": "1", "TERM": "dumb"})
    assert out.returncode == 2
    assert "must look like tcp://HOST:PORT" in out.stderr
