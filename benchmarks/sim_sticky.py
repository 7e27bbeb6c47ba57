"""Sticky sessions (delta KV) vs not, in the flow-level simulator: the same multi-turn workload with kvlane
given session ids (sticky: later turns go back to the session's home decode engine, which still holds the
earlier context, so only the new tokens' KV moves) and without (every turn paired as new), next to the
Dynamo-like kv-aware baseline and least-loaded. Side by side in one run, per workload profile.

    python benchmarks/sim_sticky.py             # small fat-tree, well under a minute on 2 cores
    python benchmarks/sim_sticky.py --full      # 1,024-GPU fat-tree

See docs/simulator.md for the model (decode KV memory with LRU eviction of idle sessions).
"""

from __future__ import annotations

import argparse
import sys
import time

from kvlane.policy.sim import SimConfig, markdown_table, render_table, simulate
from kvlane.policy.topology import load_topology
from rich.console import Console


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--workloads", default="coding-agent,cached-32k,deep-thinking")
    ap.add_argument("--load", type=float, default=0.7)
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    spec = ("fattree:k=16,oversub=4,gpus_per_node=4,tiles=3:2" if args.full
            else "fattree:k=8,oversub=4,gpus_per_node=2,tiles=3:2")
    requests = args.requests or (800 if args.full else 400)
    topo = load_topology(spec)
    console = Console(width=200)
    t0 = time.monotonic()
    for wl in args.workloads.split(","):
        runs = [("kvlane", True, "kvlane sticky"), ("kvlane", False, "kvlane not sticky"),
                ("kv-aware", True, "kv-aware"), ("least-loaded", True, "least-loaded")]
        results = []
        for policy, sticky, label in runs:
            r = simulate(topo, policy, workload=wl, load=args.load, requests=requests, seed=args.seed,
                         config=SimConfig(sticky_sessions=sticky))
            r.summary["policy"] = label
            results.append(r)
        base = results[1].summary["bytes_moved"]
        extra = {"sticky hits": [str(r.summary["sticky_hits"]) for r in results],
                 "bytes vs not sticky": [f"{r.summary['bytes_moved'] / base:.2f}" if base else "-" for r in results]}
        title = f"sticky delta vs not: {wl}, load {args.load:.0%}, {requests} requests, ({spec})"
        console.print(render_table(results, title=title, extra=extra))
        if args.markdown:
            print(f"\n**{title}**\n\n{markdown_table(results, extra=extra)}\n")
    console.print(f"[dim]total {time.monotonic() - t0:.1f} s wall[/dim]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
