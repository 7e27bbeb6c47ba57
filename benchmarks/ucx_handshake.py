"""Handshake latency of kvlane.transport's UCX paths between processes pinned like vLLM TP workers.

Runs in its own spawned processes (P ranks and D ranks, rank i pinned to core i % ncores, optional
in-process sched_yield spinner and external busy loops): every round each process builds a fresh
`KVTransport`, every P connects to its D (or, with --all, to every D at once) on one path, and the
connect() times are collected. Never asserts times; prints one table row per configuration, side by side.

    .venv/bin/python benchmarks/ucx_handshake.py --rounds 50 --configs shm,tcp,tcp-lo [--all] [--load 2]

Configurations: shm, tcp (the default paths), tcp-lo (tcp with NET_DEVICES=lo), tcp-blocking (blocking
progress mode). KVLANE_UCX_TRACE=1 makes the transport print per-message timings to stderr (transport/ucx.py).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import threading
import time
from typing import Any

import numpy as np

#: config name -> (path to connect, extra UCX options of that path, progress mode)
CONFIGS: dict[str, tuple[str, dict[str, str], str]] = {
    "shm": ("shm", {}, "thread"),
    "tcp": ("tcp", {}, "thread"),
    "tcp-lo": ("tcp", {"NET_DEVICES": "lo"}, "thread"),
    "tcp-blocking": ("tcp", {}, "blocking"),
}
STALL_S = 5.0


def _child(conn: Any, core: int | None, name: str, spin: bool, path: str, opts: dict[str, str], mode: str,
           rounds: int, timeout: float, nice: int) -> None:
    if nice:
        os.nice(nice)
    if core is not None:
        os.sched_setaffinity(0, {core})
    stop = threading.Event()
    if spin:  # vLLM's worker loop yields between steps; our connect() runs beside it like the connector's
        threading.Thread(target=lambda: [os.sched_yield() for _ in iter(stop.is_set, True)], daemon=True).start()
    from kvlane.transport import KVTransport, PathConfig, TransportConfig

    base = TransportConfig(backend="ucx").paths
    paths = {**base, path: PathConfig(ucx={**base[path].ucx, **opts})}
    cfg = TransportConfig(backend="ucx", paths=paths, ucx_progress_mode=mode, connect_timeout_s=timeout,
                          thread_cpus=frozenset(range(os.cpu_count() or 1)))
    for _ in range(rounds):
        t = KVTransport(name, 0, cfg)
        t.register_regions([np.zeros((4, 1024), np.uint8)], layout_tag="bench")
        conn.send(t.descriptor())
        peers = conn.recv()
        out: list[tuple[float, str]] = []
        if peers:
            out = [(0.0, "")] * len(peers)

            def one(t: Any, out: list[tuple[float, str]], i: int, desc: bytes) -> None:
                t0 = time.perf_counter()
                try:
                    t.connect(desc, paths=[path])
                    out[i] = (time.perf_counter() - t0, "")
                except Exception as exc:
                    out[i] = (time.perf_counter() - t0, f"{type(exc).__name__}: {exc}")

            threads = [threading.Thread(target=one, args=(t, out, i, d)) for i, d in enumerate(peers)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
        conn.send(out)
        conn.recv()
        t.close()
        conn.send("closed")
    stop.set()


def _busy(core: int) -> None:
    os.sched_setaffinity(0, {core})
    while True:
        sum(range(2000))


def run(name: str, args: argparse.Namespace) -> dict[str, Any]:
    path, opts, mode = CONFIGS[name]
    ctx = mp.get_context("spawn")
    ncores = len(os.sched_getaffinity(0))
    procs = []
    for role, n in (("P", args.p), ("D", args.d)):
        for i in range(n):
            a, b = ctx.Pipe()
            core = None if args.no_pin else sorted(os.sched_getaffinity(0))[i % ncores]
            proc = ctx.Process(target=_child, daemon=True, args=(b, core, f"{role}{i}", args.spin, path, opts, mode,
                                                                  args.rounds, args.timeout, args.child_nice))
            proc.start()
            procs.append((role, i, proc, a))
    lat: list[float] = []
    errors: list[str] = []
    t_start = time.perf_counter()
    for _ in range(args.rounds):
        descs = {(r, i): a.recv() for r, i, _, a in procs}
        for r, i, _, a in procs:
            if r == "D":
                a.send(None)
            else:
                a.send([descs[("D", j)] for j in range(args.d)] if args.all else [descs[("D", i % args.d)]])
        for *_, a in procs:
            for dt, err in a.recv():
                lat.append(dt)
                if err:
                    errors.append(err)
        for *_, a in procs:
            a.send(None)
        for *_, a in procs:
            a.recv()
    for _, _, proc, _ in procs:
        proc.join(15)
    lat.sort()
    n = len(lat)
    q = lambda f: lat[min(n - 1, int(f * n))]  # noqa: E731
    return {"config": name, "n": n, "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": lat[-1],
            "over_1s": sum(x > 1 for x in lat), "stalls": sum(x > STALL_S for x in lat), "errors": len(errors),
            "first_error": errors[0][:100] if errors else "", "wall": time.perf_counter() - t_start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--configs", default="shm,tcp,tcp-lo")
    ap.add_argument("-p", type=int, default=2, help="P processes (ranks)")
    ap.add_argument("-d", type=int, default=2, help="D processes (ranks)")
    ap.add_argument("--all", action="store_true", help="every P connects to every D at once (default: rank i -> i)")
    ap.add_argument("--spin", action="store_true", help="a sched_yield spinner thread in every process")
    ap.add_argument("--load", type=int, default=0, help="busy loops per core beside the processes")
    ap.add_argument("--child-nice", type=int, default=0, help="extra nice of the P/D processes over the busy loops")
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--timeout", type=float, default=10.0, help="connect_timeout_s")
    args = ap.parse_args()
    for name in args.configs.split(","):
        if name not in CONFIGS:
            ap.error(f"unknown config {name!r}; known: {', '.join(CONFIGS)}")
    ctx = mp.get_context("spawn")
    busy = [ctx.Process(target=_busy, args=(c,), daemon=True) for c in sorted(os.sched_getaffinity(0))
            for _ in range(args.load)]
    for b in busy:
        b.start()
    try:
        rows = [run(name, args) for name in args.configs.split(",")]
    finally:
        for b in busy:
            b.terminate()
    print(f"\nhandshakes per config: {args.rounds} rounds x {args.p * args.d if args.all else args.p} "
          f"(P={args.p}, D={args.d}, {'all-to-all' if args.all else 'rank i -> rank i'}, spin={args.spin}, "
          f"load={args.load}/core, child nice +{args.child_nice}); stall = connect > {STALL_S:.0f} s")
    print(f"{'config':<13}{'n':>5}{'p50 s':>8}{'p90 s':>8}{'p99 s':>8}{'max s':>8}{'>1s':>5}{'stalls':>7}"
          f"{'errors':>7}{'wall s':>8}  first error")
    for r in rows:
        print(f"{r['config']:<13}{r['n']:>5}{r['p50']:>8.3f}{r['p90']:>8.3f}{r['p99']:>8.3f}{r['max']:>8.2f}"
              f"{r['over_1s']:>5}{r['stalls']:>7}{r['errors']:>7}{r['wall']:>8.0f}  {r['first_error']}")


if __name__ == "__main__":
    main()
