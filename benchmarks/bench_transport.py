"""Throughput of kvlane.transport between two processes on loopback, side by side with raw ucxx tagged
send (same process layout and UCX settings) and memcpy (numpy copyto) in one process.

    .venv/bin/python benchmarks/bench_transport.py            # 1, 16, 256 MiB, median of 5
    .venv/bin/python benchmarks/bench_transport.py --gib -n 3  # adds 1 GiB

Each kvlane number is one `push()` of contiguous 64 KiB KV blocks (coalesced into one run) timed from
the call to the receiver's confirmation (offer → ready → data → done); "scattered" sends every other
block into reversed destination slots (no coalescing: one tagged message / data frame per block).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "unit"))
os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
os.environ.setdefault("UCX_MM_ERROR_HANDLING", "y")

MiB = 1 << 20
BLOCK = [8, 16, 256]  # fp16 → 64 KiB blocks
BLOCK_BYTES = 8 * 16 * 256 * 2
RAW_TAG, ACK_TAG = 0x5151, 0x5152


# ---------------- raw ucxx: the same layout kvlane uses (worker address, error handling, blocking) ----

def _loop_thread() -> asyncio.AbstractEventLoop:
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    return loop


def _raw_ctx(loop: asyncio.AbstractEventLoop) -> Any:
    from ucxx._lib_async import ApplicationContext

    async def make() -> Any:
        mode = os.environ.get("RAW_MODE", "thread")
        ctx = ApplicationContext(config_dict={"TLS": "sm,self"}, progress_mode=mode,
                                 enable_python_future=mode == "thread")
        if mode == "thread":
            ctx.worker.populate_python_futures_pool()
        return ctx

    return asyncio.run_coroutine_threadsafe(make(), loop).result(60)


def _raw_child(conn: Any, max_bytes: int) -> None:
    import ucxx._lib.libucxx as ucx_api
    from ucxx.types import Tag

    loop = _loop_thread()
    ctx = _raw_ctx(loop)
    conn.send_bytes(bytes(ctx.worker_address.tobytes()))
    parent = ucx_api.UCXAddress.create_from_buffer(conn.recv_bytes())
    ep = asyncio.run_coroutine_threadsafe(
        ctx.create_endpoint_from_worker_address(parent, endpoint_error_handling=True), loop).result(30)
    buf = np.zeros(max_bytes, np.uint8)
    ack = np.zeros(8, np.uint8)
    while True:
        n = int(conn.recv_bytes())
        if n == 0:
            return
        conn.send_bytes(b"armed")

        async def one(n: int = n) -> None:
            await ctx.recv(buf[:n], Tag(RAW_TAG))
            await ep.send(ack, tag=Tag(ACK_TAG), force_tag=True)

        asyncio.run_coroutine_threadsafe(one(), loop).result(120)


def bench_raw_ucxx(sizes: list[int], reps: int) -> dict[int, list[float]]:
    import ucxx._lib.libucxx as ucx_api
    from ucxx.types import Tag

    ctxmp = mp.get_context("spawn")
    conn, child_conn = ctxmp.Pipe()
    proc = ctxmp.Process(target=_raw_child, args=(child_conn, max(sizes)), daemon=True)
    proc.start()
    loop = _loop_thread()
    ctx = _raw_ctx(loop)
    child = ucx_api.UCXAddress.create_from_buffer(conn.recv_bytes())
    conn.send_bytes(bytes(ctx.worker_address.tobytes()))
    ep = asyncio.run_coroutine_threadsafe(
        ctx.create_endpoint_from_worker_address(child, endpoint_error_handling=True), loop).result(30)
    src = np.arange(max(sizes), dtype=np.uint64).view(np.uint8)[: max(sizes)].copy()
    ack = np.zeros(8, np.uint8)
    out: dict[int, list[float]] = {}
    for n in sizes:
        out[n] = []
        for _ in range(reps + 1):  # first run warms up (registration, wireup)
            conn.send_bytes(str(n).encode())
            conn.recv_bytes()

            async def one(n: int = n) -> float:
                t0 = time.perf_counter()
                got = asyncio.ensure_future(ctx.recv(ack, Tag(ACK_TAG)))
                await ep.send(src[:n], tag=Tag(RAW_TAG), force_tag=True)
                await got
                return time.perf_counter() - t0

            out[n].append(asyncio.run_coroutine_threadsafe(one(), loop).result(120))
        out[n] = out[n][1:]
    conn.send_bytes(b"0")
    proc.join(10)
    if proc.is_alive():
        proc.kill()
    return out


# ---------------- kvlane ----------------

def bench_kvlane(backend: str, path: str, sizes: list[int], reps: int, scattered: bool) -> dict[int, list[float]]:
    from kvlane.transport import BlockShape, KVTransport, TransportConfig, block_copies
    from kvlane.transport.config import _default_paths
    from transport_peer import Peer

    paths = {"tcp": {}} if backend == "tcp" else {path: _default_paths()[path].model_dump()}
    cfg = {"backend": backend, "paths": paths, "ucx_progress_mode": os.environ.get("RAW_MODE", "thread")}
    nblocks = max(sizes) // BLOCK_BYTES
    shape = BlockShape(8, 16, 128, 2)
    peer = Peer()
    out: dict[int, list[float]] = {}
    try:
        r = peer.call(op="init", engine="D", rank=0, config=cfg, n_regions=1, num_blocks=nblocks, block_shape=BLOCK,
                      dtype="float16", seed=None, timeout=120)
        assert "error" not in r, r
        src = np.arange(nblocks * BLOCK_BYTES // 8, dtype=np.uint64).view(np.float16).reshape(nblocks, *BLOCK)
        with KVTransport("P", 0, TransportConfig.model_validate(cfg)) as p:
            p.register_regions([src])
            handle = p.connect(r["descriptor"])
            for n in sizes:
                k = n // BLOCK_BYTES
                if scattered:
                    sb = list(range(0, min(2 * k, nblocks), 2))[:k]
                    copies = block_copies(0, sb, list(reversed(range(len(sb)))), shape)
                else:
                    copies = block_copies(0, list(range(k)), list(range(k)), shape)
                nbytes = sum(c.nbytes for c in copies)
                out[n] = []
                for i in range(reps + 1):
                    tid = f"b{n}-{i}"
                    peer.call(op="expect", tid=tid, copies=[[c.region, c.src_offset, c.dst_offset, c.nbytes]
                                                            for c in copies], deadline=120.0)
                    res = p.push(handle, tid, path, copies, deadline_s=120.0).result(130)
                    rec = peer.call(op="result", tid=tid, timeout=130)
                    if not (res.ok and rec["ok"]):
                        raise RuntimeError(f"{backend}/{path} {n}: {res.error or rec['error']}")
                    out[n].append(res.seconds * n / nbytes)
                out[n] = out[n][1:]
    finally:
        peer.stop()
    return out


def bench_memcpy(sizes: list[int], reps: int) -> dict[int, list[float]]:
    src = np.arange(max(sizes), dtype=np.uint64).view(np.uint8)[: max(sizes)].copy()
    dst = np.zeros_like(src)
    out = {}
    for n in sizes:
        ts = []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            np.copyto(dst[:n], src[:n])
            ts.append(time.perf_counter() - t0)
        out[n] = ts[1:]
    return out


def label(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // 1024} KiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--reps", type=int, default=5)
    ap.add_argument("--gib", action="store_true", help="add a 1 GiB size")
    ap.add_argument("--sizes", type=str, default="0.0625,1,16,256", help="MiB, comma separated (0.0625 = one block)")
    ap.add_argument("--ucx-progress", choices=["blocking", "thread"], default="thread",
                    help="ucxx progress mode for raw ucxx and kvlane ucx (default thread, as kvlane)")
    ap.add_argument("--skip", type=str, default="", help="comma separated columns to skip")
    args = ap.parse_args()
    os.environ["RAW_MODE"] = args.ucx_progress  # read by both processes of each run
    sizes = [int(float(s) * MiB) for s in args.sizes.split(",")] + ([1024 * MiB] if args.gib else [])
    if any(n % BLOCK_BYTES for n in sizes):
        ap.error(f"sizes must be multiples of one {BLOCK_BYTES // 1024} KiB block")
    skip = set(filter(None, args.skip.split(",")))
    try:
        import ucxx  # noqa: F401

        has_ucx = True
    except ImportError:
        has_ucx = False
    cols: dict[str, dict[int, list[float]]] = {}
    runs = [("memcpy", lambda: bench_memcpy(sizes, args.reps))]
    if has_ucx:
        runs += [
            ("raw ucxx shm", lambda: bench_raw_ucxx(sizes, args.reps)),
            ("kvlane ucx shm", lambda: bench_kvlane("ucx", "shm", sizes, args.reps, False)),
            ("kvlane ucx shm scattered", lambda: bench_kvlane("ucx", "shm", sizes, args.reps, True)),
            ("kvlane ucx tcp-path", lambda: bench_kvlane("ucx", "tcp", sizes, args.reps, False)),
        ]
    runs += [
        ("kvlane tcp", lambda: bench_kvlane("tcp", "tcp", sizes, args.reps, False)),
        ("kvlane tcp scattered", lambda: bench_kvlane("tcp", "tcp", sizes, args.reps, True)),
    ]
    for name, fn in runs:
        if name in skip:
            continue
        print(f"running {name} …", file=sys.stderr, flush=True)
        cols[name] = fn()

    def gbps(name: str, n: int) -> float:
        return n / statistics.median(cols[name][n]) / 1e9

    names = list(cols)
    print(f"\nGB/s, median of {args.reps} runs (host memory, loopback, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}, ucxx progress {args.ucx_progress})\n")
    print("| size | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for n in sizes:
        print(f"| {label(n)} | " + " | ".join(f"{gbps(c, n):.2f}" for c in names) + " |")
    print("\nmilliseconds per transfer (median)\n")
    print("| size | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for n in sizes:
        print(f"| {label(n)} | " + " | ".join(f"{statistics.median(cols[c][n]) * 1e3:.2f}" for c in names) + " |")
    ratios = [("kvlane ucx shm", "raw ucxx shm"), ("kvlane ucx shm", "memcpy"), ("kvlane tcp", "raw ucxx shm"),
              ("kvlane ucx shm", "kvlane tcp"), ("kvlane ucx shm scattered", "kvlane ucx shm")]
    ratios = [(a, b) for a, b in ratios if a in cols and b in cols]
    if ratios:
        print("\n| size | " + " | ".join(f"{a} / {b}" for a, b in ratios) + " |")
        print("|---|" + "---|" * len(ratios))
        for n in sizes:
            print(f"| {label(n)} | " + " | ".join(f"{gbps(a, n) / gbps(b, n):.2f}" for a, b in ratios) + " |")


if __name__ == "__main__":
    main()
