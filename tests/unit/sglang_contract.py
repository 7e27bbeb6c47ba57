"""Helpers of tests/unit/test_sglang_backend.py: the stand-in for SGLang's model-config module, the plugin
entry point as installed metadata, and the two engine processes (prefill, decode) that drive kvlane's
SGLang classes the way SGLang's schedulers do. Test-only; runs in pytest and in its forked children.
"""

from __future__ import annotations

import sys
import time
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

PAGE_SIZE = 4
LAYERS = 3  # KV buffers per rank (SGLang passes one pointer per K and per V buffer; any count works)
NUM_PAGES = 64
ITEM = 256  # bytes of one page of one buffer on one rank
AUX_ITEM = 32
AUX_SLOTS = 8


def stub_model_config() -> None:
    """`sglang.srt.disaggregation.utils` imports `sglang.srt.configs.model_config`, whose package imports
    torchvision (CUDA build only here). Put two pure functions in its place; the rest is SGLang's own code."""
    if "sglang.srt.configs.model_config" in sys.modules:
        return
    m = types.ModuleType("sglang.srt.configs.model_config")
    m.get_dsa_mtp_topk_width = lambda *a, **k: 0  # type: ignore[attr-defined]
    m.is_deepseek_dsa = lambda *a, **k: False  # type: ignore[attr-defined]
    sys.modules["sglang.srt.configs.model_config"] = m


def write_entry_point(root: Path) -> Path:
    """A dist-info declaring kvlane's plugin in the `sglang.srt.plugins` group, as `pip install kvlane[sglang]`
    will (pyproject [project.entry-points."sglang.srt.plugins"] kvlane = "kvlane.connector.sglang:register")."""
    d = root / "kvlane_sglang_plugin-0.0.dist-info"
    d.mkdir(parents=True, exist_ok=True)
    (d / "METADATA").write_text("Metadata-Version: 2.1\nName: kvlane-sglang-plugin\nVersion: 0.0\n")
    (d / "entry_points.txt").write_text("[sglang.srt.plugins]\nkvlane = kvlane.connector.sglang:register\n")
    return root


def pattern(rank: int, page: int, layer: int) -> np.ndarray:
    """The bytes prefill rank `rank` holds in `page` of buffer `layer` (distinct everywhere)."""
    seed = (rank * 1_000_003 + layer * 7919 + page * 104_729) & 0xFFFFFFFF
    return np.random.default_rng(seed).integers(1, 256, ITEM, dtype=np.uint8)


class Pools:
    """numpy buffers standing in for one TP rank's KV pool and metadata (aux) buffers."""

    def __init__(self) -> None:
        self.kv = [np.zeros((NUM_PAGES, ITEM), dtype=np.uint8) for _ in range(LAYERS)]
        self.aux = [np.zeros((AUX_SLOTS, AUX_ITEM), dtype=np.uint8)]

    def kv_args(self, rank: int) -> Any:
        from sglang.srt.disaggregation.base.conn import KVArgs

        a = KVArgs()
        a.engine_rank = rank
        a.kv_data_ptrs = [b.ctypes.data for b in self.kv]
        a.kv_data_lens = [b.nbytes for b in self.kv]
        a.kv_item_lens = [ITEM] * LAYERS
        a.aux_data_ptrs = [b.ctypes.data for b in self.aux]
        a.aux_data_lens = [b.nbytes for b in self.aux]
        a.aux_item_lens = [AUX_ITEM]
        a.state_data_ptrs = []
        a.page_size = PAGE_SIZE
        a.kv_cache_dtype_str = "bfloat16"
        a.gpu_id = rank
        return a


def server_args(tp: int, port: int, bootstrap_port: int | None = None) -> Any:
    return SimpleNamespace(tp_size=tp, host="127.0.0.1", port=port, disaggregation_bootstrap_port=bootstrap_port,
                           device="cpu", pp_size=1)


def config(policy: str, engine_id: str, gpus: list[str], **over: Any) -> Any:
    from kvlane.connector.sglang.config import SGLangBackendConfig

    knobs = {"bootstrap_timeout_s": 20.0, "lease_timeout_s": 10.0, "push_timeout_s": 6.0, **over}
    return SGLangBackendConfig(policy=policy, engine_id=engine_id, gpus=gpus, transport="tcp", **knobs)


def until(fn: Any, timeout: float, step: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(step)
    raise AssertionError(f"condition not reached within {timeout}s")


def group_poll(items: list[Any]) -> int:
    """What SGLang's poll_and_all_reduce does across the TP group: MIN of every rank's poll()."""
    return min(int(x.poll()) for x in items)


# ------------------------------------------------------------------------------------------ processes
def policy_main(conn: Any) -> None:
    """Child: the policy service over TCP on loopback (topology loopback:gpus=4) until told to stop."""
    import asyncio

    from kvlane.integration.policy_service import PolicyServer, PolicyService
    from kvlane.integration.policy_service.app import build_policy

    async def run() -> None:
        svc = PolicyService(build_policy("loopback:gpus=4"), announce_ttl=60.0, sweep_interval=0.2)
        async with PolicyServer(svc, "127.0.0.1", 0) as srv:
            conn.send(srv.address)
            while not await asyncio.to_thread(conn.poll, 0.2):
                pass

    asyncio.run(run())


class Engine:
    """Child side of one SGLang engine (all its TP ranks in one process, one manager per rank)."""

    def __init__(self, role: str, policy: str, engine_id: str, gpus: list[str], knobs: dict[str, Any]):
        from kvlane.connector.sglang import KVLaneKVBootstrapServer, KVLaneKVManager

        self.role, self.tp = role, len(gpus)
        self.pools = [Pools() for _ in range(self.tp)]
        # prefill: SGLang's main process starts the bootstrap server, the scheduler ranks register with it
        self.bootstrap = KVLaneKVBootstrapServer("127.0.0.1", 0) if role == "prefill" else None
        sa = server_args(self.tp, 30000 + len(role), self.bootstrap.port if self.bootstrap else None)
        mode = SimpleNamespace(value=role)  # what DisaggregationMode.PREFILL/.DECODE carry
        self.mgrs = [KVLaneKVManager(self.pools[r].kv_args(r), mode, sa, False,
                                     config=config(policy, engine_id, gpus, **knobs))
                     for r in range(self.tp)]

    def wait_registered(self, other: str) -> None:
        c = self.mgrs[0].client
        until(lambda: {e.engine_id for e in c.engines()} >= {self.mgrs[0].engine_id, other}, 20.0, 0.1)

    # -- decode: SGLang's DecodePreallocQueue / DecodeTransferQueue sequence -----------------------------
    def recv(self, room: int, pages: list[int], aux: int, prefix_len: int, held: list[int],
             abort_ranks: list[int], bootstrap_addr: str, reply: Any) -> dict[str, Any]:
        from kvlane.connector.sglang import KVLaneKVReceiver

        # _ensure_prefill_info / _resolve_prefill_dp_rank: ask the prefill's bootstrap server, once per address
        until(lambda: all(m.try_ensure_parallel_info(bootstrap_addr) for m in self.mgrs), 20.0, 0.1)
        info = self.mgrs[0].prefill_info_table[bootstrap_addr]
        assert (info.dp_size, info.error) == (1, None), info
        for p in self.pools:  # pages decode already holds (sticky prefix) carry a sentinel that must survive
            for b in p.kv:
                b[held] = 0xAB
        rx = [KVLaneKVReceiver(self.mgrs[r], bootstrap_addr, bootstrap_room=room) for r in range(self.tp)]
        hist = [group_poll(rx)]
        for r in rx:
            r.init(0)
        hist.append(group_poll(rx))
        for r in rx:
            r.send_metadata(np.asarray(pages, dtype=np.int32), aux, None, decode_prefix_len=prefix_len)
        hist.append(group_poll(rx))
        reply({"event": "announced", "room": room})
        for r in abort_ranks:
            rx[r].abort()
        until(lambda: group_poll(rx) in (0, 4), 40.0)  # the group's state decides, as in pop_transferred
        hist.append(group_poll(rx))
        ranks = [x.poll() for x in rx]
        errors = []
        for x in rx:
            try:
                x.failure_exception()
            except Exception as exc:  # noqa: BLE001 - reported back to the test
                errors.append(str(exc) if x.poll() == 0 else None)
        got = [[b[pages].tobytes() for b in p.kv] for p in self.pools]
        sentinel_ok = all(bool((b[held] == 0xAB).all()) for p in self.pools for b in p.kv)
        for x in rx:
            x.clear()
        return {"event": "done", "room": room, "hist": hist, "ranks": ranks, "errors": errors,
                "prefill": info.engine_id, "kv": got, "aux": [p.aux[0][aux].tobytes() for p in self.pools], "sentinel_ok": sentinel_ok}

    # -- prefill: SGLang's PrefillBootstrapQueue + process_disagg_prefill_inflight_queue sequence --------
    def send(self, room: int, src_pages: list[int], aux: int, chunk: int, reply: Any) -> dict[str, Any]:
        from kvlane.connector.sglang import KVLaneKVSender

        for r, p in enumerate(self.pools):
            for layer, b in enumerate(p.kv):
                for pg in src_pages:
                    b[pg] = pattern(r, pg, layer)
            p.aux[0][aux] = np.arange(AUX_ITEM, dtype=np.uint8) + r + 1
        tx = [KVLaneKVSender(self.mgrs[r], "127.0.0.1:1", room) for r in range(self.tp)]
        hist = [group_poll(tx)]
        until(lambda: group_poll(tx) != 1, 30.0)  # pop_bootstrapped: Bootstrapping until decode is known
        hist.append(group_poll(tx))
        t0 = time.monotonic()
        if hist[-1] == 2:
            prefix_pages = [t.pop_decode_prefix_len() // PAGE_SIZE for t in tx]
            todo = src_pages[prefix_pages[0]:]
            for t in tx:
                t.init(len(todo), aux)
            for i in range(0, max(1, len(todo)), chunk):  # send_kv_chunk per prefill chunk
                part = todo[i:i + chunk]
                for t in tx:
                    if t.should_send_kv_chunk(len(part), i + chunk >= len(todo)):
                        t.send(np.asarray(part, dtype=np.int32))
                hist.append(group_poll(tx))
            until(lambda: group_poll(tx) in (0, 4), 40.0)
            hist.append(group_poll(tx))
        errors = []
        for x in tx:
            try:
                x.failure_exception()
            except Exception as exc:  # noqa: BLE001
                errors.append(str(exc) if x.poll() == 0 else None)
        metrics = [x.get_transfer_metric().transfer_total_bytes for x in tx]
        return {"event": "done", "room": room, "hist": hist, "ranks": [x.poll() for x in tx], "errors": errors,
                "seconds": time.monotonic() - t0, "metric_bytes": metrics}

    def snapshot(self) -> dict[str, Any]:
        snap = self.mgrs[0].client.snapshot()
        return {"leases": snap["leases"], "paths": [{k: p[k] for k in ("path", "samples", "failures", "latency_s")}
                                                     for p in snap["paths"]]}


def engine_main(conn: Any, role: str, policy: str, engine_id: str, gpus: list[str], other: str,
                knobs: dict[str, Any]) -> None:
    """Child: one engine; runs each command on its own thread and answers on `conn` (tagged by room)."""
    import threading

    lock = threading.Lock()

    def reply(msg: dict[str, Any]) -> None:
        with lock:
            conn.send(msg)

    try:
        eng = Engine(role, policy, engine_id, gpus, knobs)
        eng.wait_registered(other)
    except Exception as exc:  # noqa: BLE001
        reply({"event": "error", "error": repr(exc)})
        return
    reply({"event": "ready", "bootstrap": f"127.0.0.1:{eng.bootstrap.port}" if eng.bootstrap else None})

    def run(cmd: dict[str, Any]) -> None:
        try:
            op = cmd.pop("op")
            if op == "recv":
                reply(eng.recv(reply=reply, **cmd))
            elif op == "send":
                reply(eng.send(reply=reply, **cmd))
            elif op == "snapshot":
                reply({"event": "snapshot", **eng.snapshot()})
        except Exception as exc:  # noqa: BLE001
            reply({"event": "error", "error": repr(exc), "room": cmd.get("room")})

    while True:
        cmd = conn.recv()
        if cmd.get("op") == "stop":
            break
        threading.Thread(target=run, args=(cmd,), daemon=True).start()
    for m in eng.mgrs:
        m.close()
    if eng.bootstrap is not None:
        eng.bootstrap.close()


def mismatch_main(conn: Any, policy: str, bootstrap_addr: str) -> None:
    """Child: a TP=1 decode engine meeting the TP=2 prefill: its receivers must fail before any byte moves."""
    from kvlane.connector.sglang import KVLaneKVManager, KVLaneKVReceiver

    pools = Pools()
    mgr = KVLaneKVManager(pools.kv_args(0), SimpleNamespace(value="decode"), server_args(1, 30999), False,
                          config=config(policy, "sgl-d-tp1", ["n0.g3"]))
    try:
        until(lambda: mgr.try_ensure_parallel_info(bootstrap_addr), 20.0, 0.1)
        rx = KVLaneKVReceiver(mgr, bootstrap_addr, bootstrap_room=505)
        rx.init(0)
        try:
            rx.failure_exception()
            error = None
        except Exception as exc:  # noqa: BLE001
            error = f"{type(exc).__name__}: {exc}"
        conn.send({"event": "done", "poll": int(rx.poll()), "error": error})
    except Exception as exc:  # noqa: BLE001
        conn.send({"event": "error", "error": repr(exc)})
    finally:
        mgr.close()
