#!/usr/bin/env bash
# The project's checks, as CI runs them (run scripts/setup.sh first on a fresh machine):
#   1. ruff over the tree, mypy over the pure policy core;
#   2. the default suite: unit, property, fuzz, transport (two processes), policy service, router, simulator;
#   3. the slow suite (marker `vllm`): real vLLM prefill/decode engines on CPU through KVLaneConnector
#      (token-exact vs a single engine, negative control, sticky delta, decode killed mid-stream, TP=2 and
#      P TP=1 -> D TP=2 (marker vllm_tp), 1,000 requests with injected faults (marker load));
#   4. RDMA verbs on soft-RoCE: scripts/setup_softroce.sh (apt, kernel package, virtme-ng; seconds once
#      done) then the guest suite in a QEMU VM with rxe0/rxe1 (tests/softroce/test_softroce_vm.py, 5-8 min).
# Usage: scripts/test.sh [--fast] [pytest args]     --fast: skip steps 3 and 4
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
fast=0
if [[ "${1:-}" == "--fast" ]]; then fast=1; shift; fi
export UCX_WARN_UNUSED_ENV_VARS=n
.venv/bin/ruff check .
.venv/bin/mypy policy
# pytest exit 5 (no tests collected) is a failure here like any other non-zero exit.
.venv/bin/python -m pytest -q -rs -m "not vllm and not bench" "$@"
if ((fast == 0)); then
  .venv/bin/python -m pytest -q -rs -m vllm --durations=10 "$@"
  bash scripts/setup_softroce.sh
  KVLANE_SOFTROCE=1 .venv/bin/python -m pytest -q -rs tests/softroce/test_softroce_vm.py "$@"
fi
