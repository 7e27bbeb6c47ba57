#!/usr/bin/env bash
# The project's checks, as CI runs them: lint, types of the pure policy core, then every test suite that
# fits this machine (unit + property + transport + real vLLM on CPU). Extra args go to pytest.
# Usage: scripts/test.sh [pytest args]     (run scripts/setup.sh first on a fresh machine)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export UCX_WARN_UNUSED_ENV_VARS=n
.venv/bin/ruff check .
.venv/bin/mypy policy
set +e
.venv/bin/python -m pytest -q -rs "$@"
rc=$?
set -e
# pytest exit 5 = no tests collected: that is a failure of the suite, not a pass.
exit $rc
