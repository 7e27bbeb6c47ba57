"""kvlane vs every baseline in the flow-level simulator: an oversubscribed (4:1) 3-tier fat-tree and a ZCube
cell, at 50/70/90% load; prints one table per fabric and load with the p99 KV-transfer-time ratios vs random
and least-loaded measured side by side in the same run.

    python benchmarks/sim_policies.py            # small fabrics (128/144 GPUs), ~1-2 min on 2 cores
    python benchmarks/sim_policies.py --full     # 1,024-GPU fabrics (fattree k=16, ZCube(32,2))
    python benchmarks/sim_policies.py --modes one-shot --seeds 1-8 --policies kvlane,random,least-loaded --quiet
                                                 # several seeds: mean and range of each ratio (a p99 of 300
                                                 # transfers is the 3rd-worst one, so one seed is noisy)

Pure simulation (no network, no GPU); see docs/simulator.md for the model and the measured tables.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

from kvlane.policy.sim import POLICIES, SimConfig, markdown_table, render_table, simulate
from kvlane.policy.sim.metrics import markdown_rows
from kvlane.policy.topology import load_topology
from rich.console import Console


def fabrics(full: bool) -> list[tuple[str, str]]:
    # tiles=3:2: every fabric gets the seed's affinity-tile placement (roles + tiles), the same for every policy.
    if full:
        return [("fat-tree 4:1, 1,024 GPUs", "fattree:k=16,oversub=4,gpus_per_node=4,tiles=3:2"),
                ("ZCube(32,2) cell, 1,024 GPUs", "zcube:n=32,k=2,gpus_per_node=8,tiles=3:2")]
    return [("fat-tree 4:1, 128 GPUs", "fattree:k=8,oversub=4,gpus_per_node=2,tiles=3:2"),
            ("ZCube(12,2) cell, 144 GPUs", "zcube:n=12,k=2,gpus_per_node=4,tiles=3:2")]


def ratio(a: float, b: float) -> str:
    if not (math.isfinite(a) and math.isfinite(b)) or a <= 0:
        return "-"
    return f"{b / a:.2f}x"


def parse_seeds(text: str) -> list[int]:
    """"1-4" or "1,3,5" (or a mix) -> [1, 2, 3, 4] / [1, 3, 5]."""
    out: list[int] = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b) + 1) if b else [int(a)])
    if not out:
        raise SystemExit(f"--seeds {text!r}: no seed given")
    return out


def spread(rows: list[list[float]], i: int, fmt: str) -> str:
    """Column i over seeds: the value (one seed) or 'mean [min-max]'."""
    vals = [r[i] for r in rows if math.isfinite(r[i]) and r[i] > 0]
    if not vals:
        return "-"
    if len(vals) == 1:
        return fmt.format(vals[0])
    return f"{fmt.format(sum(vals) / len(vals))} [{fmt.format(min(vals))}-{fmt.format(max(vals))}]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="1,024-GPU fabrics")
    ap.add_argument("--loads", default="0.5,0.7,0.9")
    ap.add_argument("--workload", default="coding-agent")
    ap.add_argument("--requests", type=int, default=None, help="default 300 (600 with --full)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--seeds", default=None, help="several seeds, e.g. 1-8 or 1,3,5: ratios as mean [min-max]")
    ap.add_argument("--modes", default="sessions,one-shot",
                    help="sessions (multi-turn, sticky deltas count) and/or one-shot (same bytes for all)")
    ap.add_argument("--link-scale", type=float, default=1.0, help="multiply every link's bandwidth")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--ecmp", choices=["listed", "per-hop"], default="per-hop",
                    help="baselines' routing: one of the topology's listed routes, or per-hop ECMP hashing")
    ap.add_argument("--quiet", action="store_true", help="only the summary table")
    ap.add_argument("--markdown", action="store_true", help="print the tables as markdown too (for docs)")
    args = ap.parse_args(argv)
    requests = args.requests or (600 if args.full else 300)
    seeds = parse_seeds(args.seeds) if args.seeds else [args.seed]
    policies = [p for p in args.policies.split(",") if p]
    console = Console(width=200)
    cfg = SimConfig(link_scale=args.link_scale)
    t0 = time.monotonic()
    summary: list[list[str]] = []
    for label, spec in fabrics(args.full):
        topo = load_topology(spec)
        for mode in args.modes.split(","):
            for load in (float(x) for x in args.loads.split(",")):
                rows: list[list[float]] = []
                for seed in seeds:
                    results = [simulate(topo, p, workload=args.workload, load=load, requests=requests,
                                        seed=seed, config=cfg, multi_turn=mode == "sessions", ecmp=args.ecmp)
                               for p in policies]
                    by = {r.policy: r.summary for r in results}
                    k = by["kvlane"]["kv_transfer_p99_s"] if "kvlane" in by else math.nan
                    tk = by["kvlane"]["ttft_p99_s"] if "kvlane" in by else math.nan
                    extra = {"p99 xfer ÷ kvlane": [ratio(k, r.summary["kv_transfer_p99_s"]) for r in results],
                             "TTFT p99 ÷ kvlane": [ratio(tk, r.summary["ttft_p99_s"]) for r in results]}
                    title = (f"{label} ({spec}): {args.workload} {mode}, load {load:.0%}, {requests} requests, "
                             f"seed {seed}, link scale {args.link_scale:g}")
                    if not args.quiet:
                        console.print(render_table(results, title=title, extra=extra))
                    if args.markdown and not args.quiet:
                        print(f"\n**{title}**\n\n{markdown_table(results, extra=extra)}\n")
                    rnd = by.get("random", {}).get("kv_transfer_p99_s", math.nan)
                    ll = by.get("least-loaded", {}).get("kv_transfer_p99_s", math.nan)
                    rows.append([k, rnd, ll, rnd / k, ll / k, by.get("random", {}).get("ttft_p99_s", math.nan) / tk,
                                 by.get("least-loaded", {}).get("ttft_p99_s", math.nan) / tk])
                summary.append([label, mode, f"{load:.0%}", *(spread(rows, i, "{:.3f}") for i in range(3)),
                                *(spread(rows, i, "{:.2f}x") for i in range(3, 7))])
    if len(seeds) > 1:
        print(f"seeds {seeds}: each cell is mean [min-max] over seeds")
    headers = ["fabric", "workload", "load", "kvlane p99 xfer s", "random", "least-loaded",
               "vs random", "vs least-loaded", "TTFT p99 vs random", "TTFT p99 vs least-loaded"]
    from rich.table import Table

    table = Table(title="p99 KV-transfer time: how many times lower kvlane's is (target >= 2x on the fat-tree)")
    for h in headers:
        table.add_column(h, justify="left" if h in ("fabric", "workload") else "right")
    for row in summary:
        table.add_row(*row)
    console.print(table)
    if args.markdown:
        print(markdown_rows(headers, summary))
    console.print(f"[dim]total {time.monotonic() - t0:.1f} s wall[/dim]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
