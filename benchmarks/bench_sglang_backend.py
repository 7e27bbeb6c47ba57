"""What kvlane's SGLang facade costs on top of the bare transport: one prefill and one decode process (TP=1,
numpy KV pools), the same pages moved (a) through the SGLang Sender/Receiver (announce board, lease, push,
outcome, release) and (b) by a bare `KVTransport.push` of the same copies between the same transports.

Run: .venv/bin/python benchmarks/bench_sglang_backend.py [-n TRIALS] [--sizes-mib 1,16,64]
Needs SGLang importable (pip install --no-deps sglang==0.5.23 orjson ipython). Loopback TCP only.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import time
from types import SimpleNamespace
from typing import Any

import numpy as np

LAYERS, ITEM = 4, 64 * 1024  # 4 KV buffers, 64 KiB per page per buffer


def _policy(conn: Any) -> None:
    from kvlane.integration.policy_service import PolicyServer, PolicyService
    from kvlane.integration.policy_service.app import build_policy

    async def run() -> None:
        async with PolicyServer(PolicyService(build_policy("loopback:gpus=2")), "127.0.0.1", 0) as srv:
            conn.send(srv.address)
            while not await asyncio.to_thread(conn.poll, 0.2):
                pass

    asyncio.run(run())


def _engine(conn: Any, role: str, policy: str, pages: int) -> None:
    from kvlane.connector.sglang import KVLaneKVManager, KVLaneKVReceiver, KVLaneKVSender
    from kvlane.connector.sglang.config import SGLangBackendConfig
    from sglang.srt.disaggregation.base.conn import KVArgs, KVPoll

    kv = [np.full((pages, ITEM), 7 if role == "prefill" else 0, dtype=np.uint8) for _ in range(LAYERS)]
    aux = np.zeros((4, 64), dtype=np.uint8)
    a = KVArgs()
    a.engine_rank, a.page_size, a.kv_cache_dtype_str, a.state_data_ptrs = 0, 16, "bfloat16", []
    a.kv_data_ptrs, a.kv_data_lens, a.kv_item_lens = [b.ctypes.data for b in kv], [b.nbytes for b in kv], [ITEM] * LAYERS
    a.aux_data_ptrs, a.aux_data_lens, a.aux_item_lens = [aux.ctypes.data], [aux.nbytes], [64]
    sa = SimpleNamespace(tp_size=1, host="127.0.0.1", port=31000 + len(role), disaggregation_bootstrap_port=None,
                         device="cpu", pp_size=1)
    cfg = SGLangBackendConfig(policy=policy, engine_id=f"bench-{role}", gpus=["n0.g0" if role == "prefill" else "n0.g1"],
                              transport="tcp", push_timeout_s=120.0)
    mgr = KVLaneKVManager(a, SimpleNamespace(value=role), sa, False, config=cfg)
    conn.send("ready")
    while True:
        cmd = conn.recv()
        op = cmd["op"]
        if op == "stop":
            break
        n = cmd["pages"]
        idx = np.arange(n, dtype=np.int32)
        if op == "recv":  # decode: pre-allocated pages, announce, wait
            rx = KVLaneKVReceiver(mgr, "127.0.0.1:1", bootstrap_room=cmd["room"])
            rx.init(0)
            rx.send_metadata(idx, 0, None, decode_prefix_len=0)
            conn.send("armed")
            while rx.poll() not in (KVPoll.Success, KVPoll.Failed):
                time.sleep(0.001)
            ok = rx.poll() == KVPoll.Success and bool((kv[0][n - 1] == 7).all())
            kv[0][:n] = 0
            conn.send(ok)
        elif op == "send":  # prefill: bootstrap, then time init+send -> Success
            tx = KVLaneKVSender(mgr, "127.0.0.1:1", cmd["room"])
            while tx.poll() == KVPoll.Bootstrapping:
                time.sleep(0.001)
            t0 = time.perf_counter()
            tx.init(n, 0)
            tx.send(idx)
            while tx.poll() not in (KVPoll.Success, KVPoll.Failed):
                time.sleep(0.001)
            conn.send((time.perf_counter() - t0, tx.poll() == KVPoll.Success))
        elif op == "expect":  # decode, bare transport
            fut = mgr.transport.expect(cmd["tid"], mgr.copies(idx, idx, 0, 0), 120.0)
            conn.send("armed")
            r = fut.result(130)
            kv[0][:n] = 0
            conn.send(r.ok)
        elif op == "push":  # prefill, bare transport to the same peer
            peer = mgr.peer("bench-decode", time.monotonic() + 30)
            t0 = time.perf_counter()
            r = mgr.transport.push(peer, cmd["tid"], sorted(peer.links)[0], mgr.copies(idx, idx, 0, 0), 120.0).result(130)
            conn.send((time.perf_counter() - t0, r.ok))
    mgr.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=5, help="trials per size and method")
    ap.add_argument("--sizes-mib", default="1,16,64")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes_mib.split(",")]
    max_pages = max(sizes) * (1 << 20) // (LAYERS * ITEM)
    import sglang.srt.disaggregation.base.conn  # noqa: F401 - import once, children inherit it (fork)

    ctx = mp.get_context("fork")
    procs, conns = [], {}
    pc, cc = ctx.Pipe()
    procs.append(ctx.Process(target=_policy, args=(cc,), daemon=True))
    procs[-1].start()
    addr = pc.recv()
    for role in ("decode", "prefill"):
        a, b = ctx.Pipe()
        procs.append(ctx.Process(target=_engine, args=(b, role, addr, max_pages), daemon=True))
        procs[-1].start()
        conns[role] = a
    for c in conns.values():
        assert c.recv() == "ready"
    d, p = conns["decode"], conns["prefill"]
    rows, room = [], 1
    for mib in sizes:
        n = mib * (1 << 20) // (LAYERS * ITEM)
        sg, raw = [], []
        for i in range(args.n + 1):  # +1 warm-up (connect, first lease) not counted
            room += 1
            d.send({"op": "recv", "room": room, "pages": n})
            assert d.recv() == "armed"
            p.send({"op": "send", "room": room, "pages": n})
            secs, ok = p.recv()
            assert ok and d.recv(), f"sglang transfer of {mib} MiB failed"
            tid = f"bench-raw-{room}"
            d.send({"op": "expect", "tid": tid, "pages": n})
            assert d.recv() == "armed"
            p.send({"op": "push", "tid": tid, "pages": n})
            rsecs, rok = p.recv()
            assert rok and d.recv(), f"bare push of {mib} MiB failed"
            if i:
                sg.append(secs)
                raw.append(rsecs)
        rows.append((mib, statistics.median(raw), statistics.median(sg)))
    for c in conns.values():
        c.send({"op": "stop"})
    pc.send("stop")
    for pr in procs:
        pr.join(10)
    load = os.getloadavg()[0]
    print(f"\nkvlane SGLang facade vs bare transport, TP=1, tcp on loopback, median of {args.n} (load {load:.1f})\n")
    print("| size | bare push s | SGLang send->Success s | facade / bare | bare GB/s |")
    print("|---|---|---|---|---|")
    for mib, r, s in rows:
        print(f"| {mib} MiB | {r:.4f} | {s:.4f} | {s / r:.2f} | {mib * (1 << 20) / r / 1e9:.2f} |")


if __name__ == "__main__":
    main()
