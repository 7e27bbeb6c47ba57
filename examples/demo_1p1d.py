"""1 prefill + 1 decode vLLM engine on CPU joined by KVLaneConnector, with kvlane's policy service and router.

    .venv/bin/python examples/demo_1p1d.py [--reference prefill|separate|none] [--plain] [--transport ucx] [--max-tokens N]

Same as `kvlane demo pd`. What it shows, step by step (see kvlane.integration.demo for the code):
  1. builds a tiny random-weight Llama with an offline tokenizer (cached, ~3 s the first time);
  2. starts the policy service on a 2-GPU loopback topology, the prefill engine (core 0) and the decode
     engine (core 1) with KVLaneConnector (they register themselves with the policy), and the router;
  3. sends the requests (two completions, a 2-turn chat session, a streamed completion) through the router,
     printing each answer and the pair the policy chose (`x-kvlane-pair`);
  4. sends the same requests straight to the prefill engine, without kv_transfer_params: one plain
     engine's greedy output (the reference; --reference separate uses an extra engine started first);
  5. prints the policy snapshot (leases, measured path estimates) and the token-by-token comparison;
  6. stops every process, also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvlane.integration.demo import DemoOptions, run_pd_demo


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", type=Path, help="where the tiny model is built (default ~/.cache/kvlane)")
    ap.add_argument("--log-dir", type=Path, help="logs of every process (default: a new temp dir)")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--reference", choices=("prefill", "separate", "none"), default="prefill",
                    help="single-engine output to compare with: the P engine called directly (default), "
                         "an extra plain engine, or none")
    ap.add_argument("--plain", action="store_true", help="engines without KVLaneConnector (plumbing check)")
    ap.add_argument("--transport", help="KVLaneConnector transport backend (auto, tcp, ucx)")
    args = ap.parse_args()
    opts = DemoOptions(log_dir=args.log_dir, max_tokens=args.max_tokens, reference=args.reference,
                       plain=args.plain)
    if args.transport:
        if args.plain:
            ap.error("--transport needs the connector; drop --plain")
        opts.connector_extra["transport"] = args.transport
    if args.cache_dir:
        opts.cache_dir = args.cache_dir
    try:
        result = run_pd_demo(opts)
    except KeyboardInterrupt:
        print("interrupted; all processes stopped.", file=sys.stderr)
        return 130
    matches = result.matches()
    return 0 if matches is None or all(matches) else 2


if __name__ == "__main__":
    sys.exit(main())
