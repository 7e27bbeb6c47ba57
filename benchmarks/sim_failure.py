"""Single ToR / switch failure on ZCube vs ROFT at the same GPU count, in the flow-level simulator (seed §2:
"in a 4K GPU cluster with a single ToR failure, ZCube performance degrades only 2.8 %, compared to 46.9 % for
ROFT"). Each fabric runs healthy and with one switch failed (`kvlane.policy.sim.failure.degrade`); the policy
under test is built on the degraded fabric, so it pairs and routes around the failure itself.

Failure modes (ROFT has one NIC per GPU, ZCube two):
  relay    — a GPU whose only NIC hangs off the dead ToR sends/receives through a sibling GPU's NIC over NVLink
             (ZCube: the GPUs behind the dead switch simply use their other port; nothing is relayed)
  drained  — engines with a GPU that lost every NIC are taken out of service (the policy never sees them)
  spine    — (ROFT) one spine switch fails; paths re-route around it

Workloads (same arrivals for healthy and failed runs):
  serving  — coding-agent one-shot requests at --load x the *healthy* cluster's prefill capacity, GLM-5.1 KV
  burst    — every prefill engine finishes a 32K-token prompt at the same instant (dense 70B KV, 10.5 GB each):
             a network-bound all-at-once KV exchange; "wire s" = time at least one KV flow is on the wire,
             "KV GB/s" = bytes moved / wire s (the fabric's delivered KV throughput)

    python benchmarks/sim_failure.py                 # 4,096-GPU ZCube(64,2) vs ROFT (512 x 8 GPUs)
    python benchmarks/sim_failure.py --size small    # 256 GPUs, seconds
    python benchmarks/sim_failure.py --markdown      # also print markdown tables (docs/simulator.md)
    python benchmarks/sim_failure.py --policies least-loaded --ecmp per-hop   # baselines hash per hop

Pure simulation; see docs/simulator.md ("Single switch failure") for the model and the measured tables.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass

from kvlane.policy.sim import (
    CostModel,
    SimConfig,
    Simulator,
    generate,
    get_profile,
    make_policy,
    session_rate_for_load,
    synchronized,
)
from kvlane.policy.sim.failure import degrade
from kvlane.policy.sim.metrics import SimResult, markdown_rows, percentile
from kvlane.policy.sim.simulator import plan_engines
from kvlane.policy.topology import Topology, load_topology
from rich.console import Console
from rich.table import Table

DENSE_70B_KV_BYTES_PER_TOKEN = 80 * 2 * 8 * 128 * 2  # layers × (K,V) × KV heads × head dim × BF16

# (label, spec, ToR to fail, spine to fail or None)
SIZES = {
    "4k": [("ZCube(64,2), 4,096 GPUs", "zcube:n=64,k=2,gpus_per_node=8,tiles=3:2", "A0", None),
           ("ROFT 512x8, 4,096 GPUs", "roft:nodes=512,rails=8,radix=64,tiles=3:2", "l0.r0", "s0.0")],
    "1k": [("ZCube(32,2), 1,024 GPUs", "zcube:n=32,k=2,gpus_per_node=8,tiles=3:2", "A0", None),
           ("ROFT 128x8, 1,024 GPUs", "roft:nodes=128,rails=8,radix=32,tiles=3:2", "l0.r0", "s0.0")],
    "small": [("ZCube(16,2), 256 GPUs", "zcube:n=16,k=2,gpus_per_node=8,tiles=3:2", "A0", None),
              ("ROFT 32x8, 256 GPUs", "roft:nodes=32,rails=8,radix=16,tiles=3:2", "l0.r0", "s0.0")],
}


@dataclass
class Run:
    fabric: str
    workload: str
    policy: str
    scenario: str
    result: SimResult
    engines_down: int
    relayed: int
    burst_s: float
    burst_gbps: float
    cpu_s: float


def scenarios(topo: Topology, tor: str, spine: str | None) -> list[tuple[str, Topology]]:
    out = [("healthy", topo), (f"ToR {tor} down, relay", degrade(topo, [tor], relay="nvlink"))]
    drained = degrade(topo, [tor], relay="none")
    if drained.down_gpus:  # type: ignore[attr-defined]
        out.append((f"ToR {tor} down, drained", drained))
    if spine:
        out.append((f"spine {spine} down", degrade(topo, [spine])))
    return out


def run_one(fabric: str, wl_name: str, policy: str, scenario: str, topo: Topology, workload, cfg: SimConfig,
            seed: int, ecmp: str = "per-hop") -> Run:
    t0 = time.process_time()
    sim = Simulator(topo, make_policy(policy, topo, seed=seed, ecmp=ecmp), cfg, policy_name=policy)
    res = sim.run(workload)
    moved = [r for r in sim.requests if not math.isnan(r.transfer_end)]
    burst = sim.network.busy_time  # seconds during which at least one KV flow was on the wire
    gbps = sum(r.kv_bytes for r in moved) / burst / 1e9 if moved and burst > 0 else math.nan
    failure = getattr(topo, "failure", None)
    return Run(fabric, wl_name, policy, scenario, res, len(sim.down_engines),
               len(failure.relayed) if failure else 0, burst, gbps, time.process_time() - t0)


def pct(after: float, before: float) -> str:
    if not (math.isfinite(after) and math.isfinite(before)) or before <= 0:
        return "-"
    return f"{(after / before - 1) * 100:+.1f}%"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="4k")
    ap.add_argument("--policies", default="kvlane,least-loaded")
    ap.add_argument("--workloads", default="serving,burst")
    ap.add_argument("--load", type=float, default=0.7)
    ap.add_argument("--requests", type=int, default=0, help="serving requests (default: 2 per prefill engine)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--ecmp", choices=["listed", "per-hop"], default="per-hop",
                    help="baselines' routing (see kvlane.policy.sim.baselines.ECMP_MODES)")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    console = Console(width=220)
    t_start = time.monotonic()
    runs: list[Run] = []
    for label, spec, tor, spine in SIZES[args.size]:
        topo = load_topology(spec)
        scen = scenarios(topo, tor, spine)
        for wl_name in args.workloads.split(","):
            if wl_name == "serving":
                cfg = SimConfig()
                prof = get_profile("coding-agent")
                n_p = sum(1 for _, r, _ in plan_engines(topo, cfg) if r.can_prefill())
                n_req = args.requests or 2 * n_p
                rate = session_rate_for_load(prof, args.load, topo, cfg)  # healthy capacity, same arrivals for all
                wl = generate(prof, requests=n_req, session_rate=rate, seed=args.seed, multi_turn=False)
            elif wl_name == "burst":
                cfg = SimConfig(cost=CostModel(kv_bytes_per_token=DENSE_70B_KV_BYTES_PER_TOKEN))
                n_p = sum(1 for _, r, _ in plan_engines(topo, cfg) if r.can_prefill())
                wl = synchronized(n_p, prompt_tokens=32_000, output_tokens=200, name="burst")
            else:
                raise SystemExit(f"unknown workload {wl_name!r} (serving, burst)")
            for policy in args.policies.split(","):
                for name, t in scen:
                    r = run_one(label, wl_name, policy, name, t, wl, cfg, args.seed, args.ecmp)
                    runs.append(r)
                    console.print(f"[dim]{label} {wl_name} {policy} {name}: {r.cpu_s:.1f} s CPU[/dim]")

    headers = ["fabric", "workload", "policy", "scenario", "engines down", "GPUs relayed", "TTFT p50 s",
               "TTFT p99 s", "KV xfer p50 s", "KV xfer p99 s", "KV wait p99 s", "wire s", "KV GB/s",
               "Δ TTFT p99", "Δ KV xfer p99", "Δ KV GB/s"]
    rows = []
    base: dict[tuple[str, str, str], Run] = {}
    for r in runs:
        key = (r.fabric, r.workload, r.policy)
        if r.scenario == "healthy":
            base[key] = r
        b = base[key]
        s, bs = r.result.summary, b.result.summary
        rows.append([r.fabric, r.workload, r.policy, r.scenario, str(r.engines_down), str(r.relayed),
                     f"{s['ttft_p50_s']:.3f}", f"{s['ttft_p99_s']:.3f}", f"{s['kv_transfer_p50_s']:.4f}",
                     f"{s['kv_transfer_p99_s']:.4f}", f"{s['kv_wait_p99_s']:.4f}",
                     f"{r.burst_s:.3f}" if r.workload == "burst" else "-",
                     f"{r.burst_gbps:.0f}" if r.workload == "burst" else "-",
                     pct(s["ttft_p99_s"], bs["ttft_p99_s"]), pct(s["kv_transfer_p99_s"], bs["kv_transfer_p99_s"]),
                     pct(r.burst_gbps, b.burst_gbps) if r.workload == "burst" else "-"])
    table = Table(title=f"single switch failure, {args.size} fabrics, seed {args.seed}, serving load {args.load:.0%}, "
                        f"baselines' ECMP {args.ecmp}")
    for h in headers:
        table.add_column(h, justify="left" if h in ("fabric", "workload", "policy", "scenario") else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if args.markdown:
        print("\n" + markdown_rows(headers, rows))
    lat = [r.result.summary["kv_transfer_p99_s"] for r in runs]
    console.print(f"[dim]{len(runs)} runs, total {time.monotonic() - t_start:.1f} s wall, "
                  f"{sum(r.cpu_s for r in runs):.1f} s CPU; median KV xfer p99 {percentile(lat, 50):.4f} s[/dim]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
