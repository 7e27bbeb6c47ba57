"""Topology scale benchmark: build time, first and cached `paths()` per GPU pair, plan_tiles, at 1K–16K GPUs.

Run: `python benchmarks/bench_topology.py [--pairs 2000]`. Prints one table; compare rows within one run
(the machine is shared: absolute times move, the ratios between rows are what to read).
"""

from __future__ import annotations

import argparse
import random
import time

from kvlane.policy.topology import load_topology, plan_tiles

SPECS = [
    "zcube:n=32,k=2",
    "zcube:n=128,k=2",
    "roft:nodes=2048,rails=8,radix=128",
    "railfly:rails=8,radix=768",
    "railfabric:switches=256,down=128",
    "fattree:k=40,gpus_per_node=8",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pairs", type=int, default=2000, help="random GPU pairs per fabric")
    args = ap.parse_args()
    rng = random.Random(0)
    print(f"{'fabric':40} {'GPUs':>7} {'links':>7} {'build s':>8} {'paths µs (1st)':>15} "
          f"{'paths µs (cached)':>18} {'1st/cached':>10} {'tiles s':>8}")
    for spec in SPECS:
        t0 = time.perf_counter()
        t = load_topology(spec)
        build = time.perf_counter() - t0
        gpus = t.gpus
        pairs = [tuple(rng.sample(gpus, 2)) for _ in range(args.pairs)]
        t0 = time.perf_counter()
        for a, b in pairs:
            t.paths(a, b)
        first = (time.perf_counter() - t0) / len(pairs) * 1e6
        t0 = time.perf_counter()
        for a, b in pairs:
            t.paths(a, b)
        cached = (time.perf_counter() - t0) / len(pairs) * 1e6
        t0 = time.perf_counter()
        plan_tiles(t, ratio="3:2")
        tiles = time.perf_counter() - t0
        print(f"{spec:40} {t.num_gpus:>7,} {t.num_links:>7,} {build:>8.2f} {first:>15.1f} {cached:>18.1f} "
              f"{first / cached:>10.1f} {tiles:>8.2f}")


if __name__ == "__main__":
    main()
