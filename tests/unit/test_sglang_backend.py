"""kvlane as SGLang's PD transfer backend, against SGLang's real base classes and plugin machinery.

Two engine processes (prefill and decode, TP=2 each, numpy buffers standing in for the KV pools) and a
policy service process on loopback; the engines drive kvlane's Sender/Receiver in the order SGLang's
prefill and decode schedulers do (see tests/unit/sglang_contract.py) and the bytes are checked page by page.
Skipped when SGLang is not installed (`pip install --no-deps sglang==0.5.23` + orjson, ipython).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("sglang.srt.disaggregation.base.conn", reason="SGLang is not installed")

sys.path.insert(0, str(Path(__file__).parent))
import sglang_contract as sc  # noqa: E402
from kvlane.connector.sglang import (  # noqa: E402
    KVLaneKVBootstrapServer,
    KVLaneKVManager,
    KVLaneKVReceiver,
    KVLaneKVSender,
)
from sglang.srt.disaggregation.base.conn import (  # noqa: E402
    BaseKVBootstrapServer,
    BaseKVManager,
    BaseKVReceiver,
    BaseKVSender,
    KVPoll,
)

CTX = mp.get_context("fork")  # the children share this process's imported SGLang (no second 7 s import)
P_GPUS, D_GPUS = ["n0.g0", "n0.g1"], ["n0.g2", "n0.g3"]
ITEM, LAYERS, AUX = sc.ITEM, sc.LAYERS, sc.AUX_ITEM


class Proc:
    def __init__(self, target: Any, *args: Any) -> None:
        self.conn, child = CTX.Pipe()
        self.proc = CTX.Process(target=target, args=(child, *args), daemon=True)
        self.proc.start()
        self.inbox: list[dict[str, Any]] = []

    def wait(self, event: str, room: int | None = None, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for m in self.inbox:
                if m.get("event") == "error":
                    raise AssertionError(f"child failed: {m['error']}")
                if m.get("event") == event and (room is None or m.get("room") == room):
                    self.inbox.remove(m)
                    return m
            left = deadline - time.monotonic()
            if left <= 0 or not self.conn.poll(left):
                raise AssertionError(f"no {event!r} (room {room}) within {timeout}s; inbox {self.inbox}")
            self.inbox.append(self.conn.recv())

    def send(self, **cmd: Any) -> None:
        self.conn.send(cmd)

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send({"op": "stop"})
            except OSError:
                pass
            self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


class Cluster:
    def __init__(self, **knobs: Any) -> None:
        self.policy = Proc(sc.policy_main)
        assert self.policy.conn.poll(60), "policy service did not start"
        addr = self.policy_address = self.policy.conn.recv()
        self.p = Proc(sc.engine_main, "prefill", addr, "sgl-p0", P_GPUS, "sgl-d0", knobs)
        self.d = Proc(sc.engine_main, "decode", addr, "sgl-d0", D_GPUS, "sgl-p0", knobs)
        self.bootstrap = self.p.wait("ready")["bootstrap"]
        self.d.wait("ready")

    def leases(self, timeout: float = 15.0) -> dict[str, Any]:
        """Snapshot once no lease is outstanding (the group's release runs after the polls end)."""
        deadline = time.monotonic() + timeout
        while True:
            self.p.send(op="snapshot")
            snap = self.p.wait("snapshot")
            if not snap["leases"] or time.monotonic() > deadline:
                return snap
            time.sleep(0.1)

    def stop(self) -> None:
        for x in (self.p, self.d, self.policy):
            x.stop()


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    yield c
    c.stop()


def _monotonic(hist: list[int]) -> bool:
    return all(a <= b for a, b in zip(hist, hist[1:], strict=False))


# ------------------------------------------------------------------------------------------- contract
def test_classes_implement_sglangs_real_base_classes():
    assert issubclass(KVLaneKVManager, BaseKVManager) and issubclass(KVLaneKVSender, BaseKVSender)
    assert issubclass(KVLaneKVReceiver, BaseKVReceiver) and issubclass(KVLaneKVBootstrapServer, BaseKVBootstrapServer)
    for cls in (KVLaneKVManager, KVLaneKVSender, KVLaneKVReceiver, KVLaneKVBootstrapServer):
        assert not cls.__abstractmethods__, f"{cls.__name__} leaves {cls.__abstractmethods__} abstract"
    # SGLang reduces a TP group's state with MIN: the order kvlane relies on
    assert KVPoll.Failed < KVPoll.Bootstrapping < KVPoll.WaitingForInput < KVPoll.Transferring < KVPoll.Success


def test_tp2_transfer_moves_only_the_pages_decode_lacks(cluster):
    """Sticky delta: decode holds the first 2 pages (8 tokens) of a 26-token prompt and pre-allocates 5
    scattered pages; prefill sends only pages 2..6, in chunks of 3, rank i -> rank i, plus the aux row."""
    room, src, dst, held = 101, [3, 4, 5, 6, 7, 8, 9], [40, 41, 42, 10, 55], [0, 1]
    cluster.p.send(op="send", room=room, src_pages=src, aux=3, chunk=3)
    cluster.d.send(op="recv", room=room, pages=dst, aux=5, prefix_len=8, held=held, abort_ranks=[],
                   bootstrap_addr=cluster.bootstrap)
    d = cluster.d.wait("done", room)
    p = cluster.p.wait("done", room)

    assert p["ranks"] == [KVPoll.Success] * 2 and d["ranks"] == [KVPoll.Success] * 2, (p, d)
    # prefill's first poll may already see WaitingForInput when decode announced before the sender existed
    assert p["hist"][0] in (KVPoll.Bootstrapping, KVPoll.WaitingForInput) and p["hist"][-1] == KVPoll.Success
    assert d["hist"][:2] == [KVPoll.Bootstrapping, KVPoll.WaitingForInput] and d["hist"][-1] == KVPoll.Success
    assert _monotonic(p["hist"]) and _monotonic(d["hist"])
    for rank in range(2):
        for layer in range(LAYERS):
            got = d["kv"][rank][layer]
            want = b"".join(sc.pattern(rank, s, layer).tobytes() for s in src[2:])
            assert got == want, f"rank {rank} layer {layer}: decode pages differ from prefill's pages 2..6"
        assert d["aux"][rank] == bytes((i + rank + 1) % 256 for i in range(AUX))
    assert d["sentinel_ok"], "a page decode already held was overwritten"
    assert d["prefill"] == "sgl-p0"  # decode learnt who it talks to from the prefill's bootstrap server
    assert d["prefill"] == "sgl-p0"  # decode learnt who it talks to from the prefill's bootstrap server
    assert p["metric_bytes"] == [5 * LAYERS * ITEM + AUX] * 2  # per rank: 5 pages x 3 buffers + aux row

    snap = cluster.leases()
    assert snap["leases"] == [], "the lease was not released"
    # feedback: the measured latency reached the estimate of the granted path (too few bytes for a bandwidth sample)
    assert any(x["latency_s"] is not None and x["failures"] == 0 for x in snap["paths"]), snap["paths"]


def test_decode_abort_fails_the_prefill_group_with_a_reason(cluster):
    room = 202
    cluster.p.send(op="send", room=room, src_pages=[1, 2, 3], aux=1, chunk=8)
    cluster.d.send(op="recv", room=room, pages=[20, 21, 22], aux=2, prefix_len=0, held=[], abort_ranks=[0, 1],
                   bootstrap_addr=cluster.bootstrap)
    d = cluster.d.wait("done", room)
    p = cluster.p.wait("done", room, timeout=40)
    assert d["hist"][-1] == KVPoll.Failed and d["ranks"] == [KVPoll.Failed] * 2
    assert all("aborted" in e for e in d["errors"])
    assert p["hist"][-1] == KVPoll.Failed
    assert any(e and "aborted" in e for e in p["errors"]), p["errors"]
    assert d["kv"][0][0] == bytes(3 * ITEM), "bytes landed in pages of an aborted request"
    assert cluster.leases()["leases"] == []


def test_group_state_is_the_min_over_tp_ranks(cluster):
    """Only decode rank 1 aborts: whatever rank 0 reached, both groups end Failed, and no lease is left."""
    room = 303
    cluster.p.send(op="send", room=room, src_pages=[5, 6], aux=0, chunk=8)
    cluster.d.send(op="recv", room=room, pages=[30, 31], aux=4, prefix_len=0, held=[], abort_ranks=[1],
                   bootstrap_addr=cluster.bootstrap)
    d = cluster.d.wait("done", room)
    p = cluster.p.wait("done", room, timeout=40)
    assert d["ranks"][1] == KVPoll.Failed and d["hist"][-1] == KVPoll.Failed == min(d["ranks"])
    assert p["hist"][-1] == KVPoll.Failed
    assert cluster.leases()["leases"] == []


def test_decode_with_another_tp_size_fails_before_any_byte_moves(cluster):
    """rank i -> rank i needs equal TP: decode learns the prefill's TP from its bootstrap server."""
    child = Proc(sc.mismatch_main, cluster.policy_address, cluster.bootstrap)
    try:
        r = child.wait("done", timeout=60)
    finally:
        child.stop()
    assert r["poll"] == KVPoll.Failed
    assert r["error"].startswith("KVLaneTransferError") and "TP=2, this decode TP=1" in r["error"], r["error"]


def test_decode_process_death_fails_prefill_within_its_deadline():
    c = Cluster(push_timeout_s=4.0)
    try:
        room = 404
        c.p.send(op="send", room=room, src_pages=[1, 2, 3, 4], aux=1, chunk=2)
        c.d.send(op="recv", room=room, pages=[7, 8, 9, 10], aux=1, prefix_len=0, held=[], abort_ranks=[],
                 bootstrap_addr=c.bootstrap)
        c.d.wait("announced", room)
        os.kill(c.d.proc.pid, signal.SIGKILL)
        c.d.proc.join(5)
        p = c.p.wait("done", room, timeout=40)
        assert p["ranks"] != [KVPoll.Success] * 2 and p["hist"][-1] == KVPoll.Failed
        assert p["seconds"] < 4.0 + 10.0 + 5.0  # push deadline (+ lease wait bound + margin), never a hang
        assert any(e for e in p["errors"])
        assert c.leases()["leases"] == [], "lease of a failed transfer not released"
    finally:
        c.stop()


# -------------------------------------------------------------------------------------- plugin wiring
@pytest.fixture
def plugin_loaded(tmp_path):
    """SGLang's own load_plugins() with kvlane's entry point installed; undone afterwards."""
    sc.stub_model_config()
    import kvlane.connector.sglang.plugin as kp
    import sglang.srt.plugins as plugins
    from sglang.srt.arg_groups.choices import DISAGG_TRANSFER_BACKEND_CHOICES
    from sglang.srt.disaggregation import utils
    from sglang.srt.plugins.hook_registry import HookRegistry

    saved = (utils.TransferBackend, utils.get_kv_class, list(DISAGG_TRANSFER_BACKEND_CHOICES))
    sys.path.insert(0, str(sc.write_entry_point(tmp_path)))
    plugins._plugins_loaded = False
    try:
        plugins.load_plugins()
        yield utils
    finally:
        sys.path.remove(str(tmp_path))
        utils.TransferBackend, utils.get_kv_class = saved[0], saved[1]
        DISAGG_TRANSFER_BACKEND_CHOICES[:] = saved[2]
        HookRegistry.reset()
        kp._registered = False
        plugins._plugins_loaded = False


def test_entry_point_registers_the_backend_choice(plugin_loaded):
    from sglang.srt.arg_groups.choices import DISAGG_TRANSFER_BACKEND_CHOICES

    utils = plugin_loaded
    assert "kvlane" in DISAGG_TRANSFER_BACKEND_CHOICES  # argparse's choices for --disaggregation-transfer-backend
    tb = utils.TransferBackend("kvlane")  # what the scheduler does with the CLI string
    kt = utils.KVClassType
    assert utils.get_kv_class(tb, kt.MANAGER) is KVLaneKVManager
    assert utils.get_kv_class(tb, kt.SENDER) is KVLaneKVSender
    assert utils.get_kv_class(tb, kt.RECEIVER) is KVLaneKVReceiver
    assert utils.get_kv_class(tb, kt.BOOTSTRAP_SERVER) is KVLaneKVBootstrapServer
    from sglang.srt.disaggregation.base.conn import KVArgs

    assert utils.get_kv_class(tb, kt.KVARGS) is KVArgs
    # the built-in backends are untouched
    assert [m.value for m in utils.TransferBackend][:5] == ["mooncake", "mori", "nixl", "ascend", "fake"]
    with pytest.raises(ValueError, match="not a valid TransferBackend"):
        utils.TransferBackend("nope")


def test_sglang_cli_parser_accepts_the_backend_once_the_plugin_loaded(plugin_loaded):
    """`python -m sglang.launch_server` calls load_plugins() before it parses argv: SGLang's own parser."""
    import argparse

    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args(["--model-path", "m", "--disaggregation-mode", "decode",
                              "--disaggregation-transfer-backend", "kvlane"])
    assert (args.disaggregation_mode, args.disaggregation_transfer_backend) == ("decode", "kvlane")
