"""The parts of kvlane's SGLang backend that need no SGLang: announce wire format, settings, the bootstrap
registry over HTTP, the router's bootstrap fields and the `kvlane sglang` launcher's command line."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest
from kvlane.connector.sglang.bootstrap import BootstrapServerThread
from kvlane.connector.sglang.config import SGLangBackendConfig
from kvlane.connector.sglang.router_fields import bootstrap_fields, is_sglang_engine, sglang_pd_bodies
from kvlane.connector.sglang.wire import (
    decode_announce,
    encode_announce,
    pages_to_runs,
    runs_to_pages,
    transfer_id_for_room,
)
from kvlane.integration.cli import app
from kvlane.integration.cli.sglang import build_command
from kvlane.policy.types import EngineInfo, Role
from typer.testing import CliRunner

POLICY = "tcp://127.0.0.1:7070"


# ------------------------------------------------------------------------------------------------ wire
def test_pages_travel_as_runs_and_come_back_identical():
    pages = np.array([40, 41, 42, 10, 55, 56, 0], dtype=np.int32)
    raw = pages_to_runs(pages)
    assert len(raw) == 4 * 16  # runs: 40..42, 10, 55..56, 0
    assert runs_to_pages(raw).tolist() == pages.tolist()
    assert runs_to_pages(pages_to_runs(np.arange(100_000))).tolist() == list(range(100_000))  # one run, 16 bytes


def test_too_scattered_page_list_is_refused_with_a_hint():
    with pytest.raises(ValueError, match="larger --page-size"):
        pages_to_runs(np.arange(0, 2 * 4000, 2))  # 4000 separate runs > 3840


def test_announce_is_checked_against_the_reading_rank():
    ann = encode_announce(decode="d0", rank=1, tp_size=2, page_size=16, pages=np.array([3, 4]), aux_index=7,
                          decode_prefix_len=32)
    got = decode_announce(ann, rank=1, tp_size=2, page_size=16)
    assert (got["pages"], got["aux_index"], got["decode_prefix_len"]) == ([3, 4], 7, 32)
    with pytest.raises(ValueError, match="announce for rank 1 read by rank 0"):
        decode_announce(ann, rank=0, tp_size=2, page_size=16)
    with pytest.raises(ValueError, match="decode TP=2, prefill TP=4"):
        decode_announce(ann, rank=1, tp_size=4, page_size=16)
    with pytest.raises(ValueError, match="page size 16 != prefill page size 1"):
        decode_announce(ann, rank=1, tp_size=2, page_size=1)
    with pytest.raises(ValueError, match="'decode' missing"):
        decode_announce({**ann, "decode": 3}, rank=1, tp_size=2, page_size=16)
    assert decode_announce({"v": 1, "aborted": "x"}, rank=0, tp_size=1, page_size=1) == {"aborted": "x"}


def test_room_becomes_a_transfer_id():
    assert transfer_id_for_room(2**63 - 1) == "sglang-9223372036854775807"
    for bad in (-1, 2**64, "7", True):
        with pytest.raises(ValueError, match="bootstrap_room"):
            transfer_id_for_room(bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- config
def test_config_from_env_names_the_variable():
    cfg = SGLangBackendConfig.from_env({"KVLANE_POLICY": POLICY, "KVLANE_GPUS": "n0.g0, n0.g1",
                                        "KVLANE_PUSH_TIMEOUT_S": "12"})
    assert cfg.gpu_ids(2) == ["n0.g0", "n0.g1"] and cfg.push_timeout_s == 12.0
    with pytest.raises(ValueError, match="names 2 GPUs but --tp-size is 4"):
        cfg.gpu_ids(4)
    with pytest.raises(ValueError, match="needs KVLANE_POLICY"):
        SGLangBackendConfig.from_env({})
    with pytest.raises(ValueError, match="KVLANE_POLICY: .*tcp://HOST:PORT"):
        SGLangBackendConfig.from_env({"KVLANE_POLICY": "http://x:1"})
    with pytest.raises(ValueError, match="KVLANE_TRANSPORT"):
        SGLangBackendConfig.from_env({"KVLANE_POLICY": POLICY, "KVLANE_TRANSPORT": "rdma"})
    assert SGLangBackendConfig.from_env(cfg.to_env()) == cfg


# ------------------------------------------------------------------------------------ bootstrap server
def _put(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="PUT")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_bootstrap_server_reports_complete_once_every_rank_registered():
    srv = BootstrapServerThread("127.0.0.1", 0)
    try:
        base = f"http://127.0.0.1:{srv.port}"

        def info() -> dict:
            with urllib.request.urlopen(f"{base}/kvlane/info", timeout=5) as r:
                return json.loads(r.read())

        assert info() == {"complete": False, "ranks": []}
        assert _put(f"{base}/kvlane/ranks/0", {"engine_id": "p0", "rank": 0, "tp_size": 2, "page_size": 16})[0] == 200
        assert info()["complete"] is False
        code, err = _put(f"{base}/kvlane/ranks/1", {"engine_id": "p0", "rank": 1, "tp_size": 2, "page_size": 32})
        assert code == 400 and "page=32" in err["error"]
        code, err = _put(f"{base}/kvlane/ranks/0", {"engine_id": "p0", "rank": 1, "tp_size": 2, "page_size": 16})
        assert code == 400 and "path says rank 0" in err["error"]
        assert _put(f"{base}/kvlane/ranks/1", {"engine_id": "p0", "rank": 1, "tp_size": 2, "page_size": 16})[0] == 200
        assert info() == {"complete": True, "engine_id": "p0", "tp_size": 2, "page_size": 16, "dp_size": 1,
                          "ranks": [0, 1]}
    finally:
        srv.close()


# ------------------------------------------------------------------------------------------ router side
P_INFO = EngineInfo(engine_id="sglang-prefill-a", role=Role.PREFILL, gpus=["n0.g0"],
                    endpoints={"engine": "sglang", "http": "http://10.0.0.5:30000", "sglang_bootstrap": "10.0.0.5:8998"})
D_INFO = EngineInfo(engine_id="sglang-decode-b", role=Role.DECODE, gpus=["n0.g1"],
                    endpoints={"engine": "sglang", "http": "http://10.0.0.6:30001"})


def test_router_fields_for_an_sglang_pair():
    assert is_sglang_engine(P_INFO) and is_sglang_engine(D_INFO)
    body = {"model": "m", "messages": [], "bootstrap_room": 1, "stream": True, "stream_options": {"x": 1}}
    pb, db, tid = sglang_pd_bodies(body, P_INFO, D_INFO, room=77)
    fields = {"bootstrap_host": "10.0.0.5", "bootstrap_port": 8998, "bootstrap_room": 77}
    assert db == {**body, **fields} and tid == "sglang-77"
    assert pb == {"model": "m", "messages": [], **fields, "stream": False}
    _, _, tid2 = sglang_pd_bodies(body, P_INFO, D_INFO)
    assert tid2.startswith("sglang-") and tid2 != tid
    with pytest.raises(ValueError, match="not an SGLang prefill"):
        bootstrap_fields(D_INFO, 1)
    with pytest.raises(ValueError, match="not an SGLang decode"):
        sglang_pd_bodies(body, P_INFO, P_INFO)


# --------------------------------------------------------------------------------------------- launcher
def test_launcher_builds_the_sglang_command_and_environment():
    argv, env = build_command("decode", ["--model-path", "m", "--tp-size", "2"], policy=POLICY, engine_id="d0",
                              gpus="n0.g2,n0.g3", transport="tcp", kv_host="127.0.0.1", python="/py",
                              environ={"PATH": "/bin", "SGLANG_PLUGINS": "other"})
    assert argv == ["/py", "-m", "sglang.launch_server", "--disaggregation-mode", "decode",
                    "--disaggregation-transfer-backend", "kvlane", "--model-path", "m", "--tp-size", "2"]
    assert env["KVLANE_POLICY"] == POLICY and env["KVLANE_ENGINE_ID"] == "d0" and env["KVLANE_GPUS"] == "n0.g2,n0.g3"
    assert env["KVLANE_TRANSPORT"] == "tcp" and env["PATH"] == "/bin"
    assert env["SGLANG_PLUGINS"] == "other,kvlane"  # a plugin allow-list must not shut kvlane out
    # the policy may come from the environment, and flags already given with the right value are kept once
    argv, env = build_command("prefill", ["--disaggregation-transfer-backend=kvlane"], policy=None, engine_id=None,
                              gpus=None, transport="auto", kv_host="127.0.0.1", python="/py",
                              environ={"KVLANE_POLICY": POLICY})
    assert argv.count("--disaggregation-transfer-backend=kvlane") == 1
    assert "--disaggregation-transfer-backend" not in argv and "SGLANG_PLUGINS" not in env


@pytest.mark.parametrize("args,gpus,match", [
    (["--disaggregation-mode", "prefill"], None, "conflicts with `kvlane sglang decode`"),
    (["--disaggregation-transfer-backend", "mooncake"], None, "'mooncake' conflicts"),
    (["--tp-size", "4"], "a,b", "--gpus names 2 GPUs but the SGLang args say --tp-size 4"),
])
def test_launcher_refuses_conflicting_flags(args, gpus, match):
    with pytest.raises(ValueError, match=match):
        build_command("decode", args, policy=POLICY, engine_id=None, gpus=gpus, transport="auto",
                      kv_host="127.0.0.1", python="/py", environ={})


def test_kvlane_sglang_dry_run_prints_the_command():
    r = CliRunner().invoke(app, ["sglang", "prefill", "--policy", POLICY, "--python", "/py", "--dry-run", "--",
                                 "--model-path", "m", "--port", "30001"], env={"KVLANE_POLICY": ""})
    assert r.exit_code == 0, r.output
    assert r.output.strip() == (f"KVLANE_POLICY={POLICY} /py -m sglang.launch_server --disaggregation-mode prefill "
                                "--disaggregation-transfer-backend kvlane --model-path m --port 30001")
    r = CliRunner().invoke(app, ["sglang", "decode", "--dry-run", "--", "--model-path", "m"],
                           env={"KVLANE_POLICY": ""})
    assert r.exit_code != 0 and "KVLANE_POLICY" in r.output
