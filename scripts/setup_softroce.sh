#!/usr/bin/env bash
# Prepares a fresh machine for the soft-RoCE suite (real RDMA verbs over rdma_rxe in a QEMU guest):
# Debian packages (qemu, rdma-core, rxe provider, pyverbs, perftest), the Debian kernel package unpacked
# into .work/softroce/kernel (never installed), virtme-ng in .venv, and the verbs-capable UCX for ucxx
# (symlinks over nixl-cu12's bundled UCX 1.23 in .work/softroce/ucx-verbs). Idempotent; a second run
# only re-checks. Run scripts/setup.sh first (it creates .venv with ucxx and nixl-cu12).
# Usage: scripts/setup_softroce.sh            then: .venv/bin/kvlane softroce run -- <command>
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [[ ! -x .venv/bin/python ]]; then
  echo "setup_softroce: .venv missing; run scripts/setup.sh first" >&2
  exit 2
fi
# nixl-cu12 carries the UCX with verbs that ucxx uses in the guest (docs/softroce.md explains why).
if ! .venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('nixl_cu12') is None)"; then
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "nixl-cu12==1.5.1"
fi
# Everything else (apt, kernel, virtme-ng, the UCX prefix) is done by the same code `kvlane softroce run`
# calls, so the two cannot drift apart.
.venv/bin/kvlane softroce prepare
echo "setup_softroce: ready"
