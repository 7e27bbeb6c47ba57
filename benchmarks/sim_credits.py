"""Credits on vs off under incast, in the flow-level simulator. The same pairing policy with and without D
ingress credits, side by side in one run, in two scenarios:

  waves   — every prefill engine gets `--per-p` identical long prompts at the same instant, in 5 waves: prefills
            complete together and their KV converges on the decode pool (the seed's §7 worst case). KV of a
            dense-attention 70B-class model (327,680 B/token) so transfers are long enough to collide.
  bursty  — realistic: clumps of sessions (GLM-5.1 KV, 89,856 B/token), one-shot repo-heavy prompts.

    python benchmarks/sim_credits.py            # small fabrics, about a minute on 2 cores
    python benchmarks/sim_credits.py --full     # 1,024-GPU fabrics
    python benchmarks/sim_credits.py --lease-retry poll   # denied P polls after retry_after (the old behaviour)

Reads: "D in max/p99" = concurrent incoming KV streams per decode engine, seen when a stream starts;
"KV xfer" = wire time (lease granted → last byte); "KV wait" = prefill done → last byte (lease waits
included: what credits cost). See docs/simulator.md.
"""

from __future__ import annotations

import argparse
import sys
import time

from kvlane.policy.config import CreditConfig, PolicyConfig
from kvlane.policy.sim import CostModel, SimConfig, markdown_table, render_table, simulate, synchronized
from kvlane.policy.sim.simulator import plan_engines
from kvlane.policy.topology import load_topology
from rich.console import Console

DENSE_70B_KV_BYTES_PER_TOKEN = 80 * 2 * 8 * 128 * 2  # layers × (K,V) × KV heads × head dim × BF16


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--max-streams", type=int, default=2)
    ap.add_argument("--per-p", type=int, default=3, help="requests per prefill engine per wave")
    ap.add_argument("--scenarios", default="waves,bursty")
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--lease-retry", choices=["wakeup", "poll"], default="wakeup",
                    help="denied P: wait in D's FIFO queue and wake on a release (default), or poll after retry_after")
    args = ap.parse_args(argv)
    fabrics = ([("ZCube(32,2) cell, 1,024 GPUs", "zcube:n=32,k=2,gpus_per_node=8,tiles=3:2"),
                ("fat-tree 4:1, 1,024 GPUs", "fattree:k=16,oversub=4,gpus_per_node=4,tiles=3:2")] if args.full else
               [("ZCube(12,2) cell, 144 GPUs", "zcube:n=12,k=2,gpus_per_node=4,tiles=3:2"),
                ("fat-tree 4:1, 128 GPUs", "fattree:k=8,oversub=4,gpus_per_node=2,tiles=3:2")])
    pcfg = PolicyConfig(credits=CreditConfig(max_streams=args.max_streams))
    console = Console(width=200)
    t0 = time.monotonic()
    for scenario in args.scenarios.split(","):
        for label, spec in fabrics:
            topo = load_topology(spec)
            if scenario == "waves":
                cfg = SimConfig(cost=CostModel(kv_bytes_per_token=DENSE_70B_KV_BYTES_PER_TOKEN),
                                lease_retry=args.lease_retry)
                n_p = sum(1 for _, r, _ in plan_engines(topo, cfg) if r.can_prefill())
                wl = synchronized(n_p * args.per_p, prompt_tokens=32_000, output_tokens=200, waves=5,
                                  interval_s=20.0, name="waves")
                desc = (f"{args.per_p} x 32K-token prompts per prefill engine at once ({n_p} P), 5 waves 20 s "
                        "apart, dense 70B KV")
                kw = {}
            else:
                cfg = SimConfig(lease_retry=args.lease_retry)
                wl = "repo-heavy"  # type: ignore[assignment]
                desc = "repo-heavy one-shot, bursty clumps (mean 12), load 80%, GLM-5.1 KV"
                kw = {"load": 0.8, "requests": 600 if args.full else 300, "arrivals": "bursty", "burst_size": 12.0,
                      "multi_turn": False, "seed": args.seed}
            results = [simulate(topo, policy, workload=wl, credits=credits, config=cfg, policy_config=pcfg, **kw)
                       for policy in ("kvlane", "least-loaded", "random") for credits in (True, False)]
            title = (f"credits on/off, {scenario}: {label} ({spec}), {desc}, max_streams {args.max_streams}, "
                     f"lease retry {args.lease_retry}")
            extra = {"denials": [str(r.summary["lease_denials"]) for r in results],
                     "lease wait p99 s": [f"{r.summary['lease_wait_p99_s']:.3f}" for r in results]}
            console.print(render_table(results, title=title, extra=extra))
            if args.markdown:
                print(f"\n**{title}**\n\n{markdown_table(results, extra=extra)}\n")
    console.print(f"[dim]total {time.monotonic() - t0:.1f} s wall[/dim]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
