"""kvlane.transport over soft-RoCE (rxe0, UCX rc_verbs) vs perftest's ib_write_bw on the same device, in the
same guest, side by side. Everything is emulated (QEMU TCG + rxe): the ratio is the result, not the MB/s.

Run:  .venv/bin/kvlane softroce run -- .venv/bin/python benchmarks/softroce_bench.py [--mib 16]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvlane.integration.softroce import in_guest
from kvlane.integration.softroce.kv_pair import Move, run_pair
from kvlane.integration.softroce.prepare import verbs_ucx_prefix
from kvlane.integration.softroce.ucx_verbs import ensure_verbs_ucx

SERVER_IP = "198.18.0.1"  # d0's address in the guest (guest.RXE_LINKS)


def ib_write_bw(size: int, iters: int) -> float:
    """Average MB/s (perftest's MB = 2^20 bytes) of ib_write_bw between two processes on rxe0."""
    args = ["ib_write_bw", "-d", "rxe0", "-x", "1", "-s", str(size), "-n", str(iters), "-F"]
    server = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(2.0)
    try:
        client = subprocess.run([*args, SERVER_IP], capture_output=True, text=True, timeout=600)
    finally:
        server_out = server.communicate(timeout=120)[0]
    for line in (client.stdout + server_out).splitlines():
        cols = line.split()
        if len(cols) == 5 and cols[0] == str(size) and re.fullmatch(r"[\d.]+", cols[3]):
            return float(cols[3])
    raise RuntimeError(f"no result line from ib_write_bw:\n{client.stdout}\n{client.stderr}\n{server_out}")


def transport_bw(mib: int, block: int) -> tuple[float, float]:
    """(MB/s, seconds) of one kvlane push of `mib` MiB in `block`-byte blocks over path1 (rxe0)."""
    n = mib * (1 << 20) // block
    env = ensure_verbs_ucx(verbs_ucx_prefix()).env()
    moves = [Move("warm", "path1", (0,), (0,)), Move("bulk", "path1", tuple(range(n)), tuple(range(n)))]
    with tempfile.TemporaryDirectory() as tmp:
        # "warm": the first move after connect is slower (1 MiB: 0.7-1.4 s vs 0.24-0.45 s for the next ones,
        # docs/softroce.md); only "bulk" is measured.
        r = run_pair(Path(tmp), moves, ucx_env=env, n_blocks=n, block_bytes=block, deadline_s=120)
    res = r.p_result("bulk")
    if not res["ok"]:
        raise RuntimeError(f"transport push failed: {res['error']}\n{r.p_log}\n{r.d_log}")
    return res["bytes"] / (1 << 20) / res["seconds"], res["seconds"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=16, help="bytes moved by each side (MiB)")
    ap.add_argument("--block", type=int, default=1 << 20, help="KV block bytes for the transport")
    a = ap.parse_args()
    if not in_guest():
        print("run inside the soft-RoCE guest: kvlane softroce run -- .venv/bin/python benchmarks/softroce_bench.py",
              file=sys.stderr)
        return 2
    ib = ib_write_bw(a.block, max(5, a.mib * (1 << 20) // a.block))
    kv, secs = transport_bw(a.mib, a.block)
    print(f"\nsoft-RoCE rxe0, {a.mib} MiB in {a.block >> 10} KiB messages/blocks (emulated: compare the ratio)")
    print(f"| {'what':<44} | {'MB/s':>8} | {'ratio':>6} |")
    print(f"|{'-' * 46}|{'-' * 10}|{'-' * 8}|")
    print(f"| {'ib_write_bw (perftest, RDMA write)':<44} | {ib:8.1f} | {1.0:6.2f} |")
    print(f"| {'kvlane.transport push (ucx rc_verbs, tagged)':<44} | {kv:8.1f} | {kv / ib:6.2f} |")
    print(f"(transport push took {secs:.1f} s including its offer/ready/done handshake)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
