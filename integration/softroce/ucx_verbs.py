"""A UCX with verbs for the project's ucxx: the UCX 1.23 that the `nixl-cu12` wheel bundles (with
`libuct_ib`), presented to ucxx under the standard library names through a private prefix of symlinks.
Runs wherever a process over RDMA is started (host or guest); builds only symlinks under the cache and
returns environment variables; never modifies a wheel or the system.

Why this route (docs/softroce.md): ucxx's own `libucx-cu12` has no verbs; Debian trixie's UCX 1.18.1
binaries need glibc 2.38 (`__isoc23_*`), which bookworm lacks; nixl's UCX 1.23 runs on bookworm and
satisfies ucxx 0.52 (UCX >= 1.19) when `RAPIDS_LIBUCX_PREFER_SYSTEM_LIBRARY=true`.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

#: The UCX modules the soft-RoCE path needs (verbs; cma for completeness). mlx5/efa/cuda are left out.
MODULES = ("libuct_ib", "libuct_cma")
#: Debian's verbs provider directory (librxe-rdmav34.so lives here).
SYSTEM_PROVIDER_DIR = "/usr/lib/x86_64-linux-gnu/libibverbs"


class VerbsUcxError(RuntimeError):
    """The verbs-capable UCX cannot be assembled; the message says what is missing."""


@dataclass(frozen=True)
class VerbsUcx:
    prefix: Path  # libucs.so, libuct.so, libucp.so, libucm.so (+ .so.0) and ucx/<module>.so
    libs_dir: Path  # nixl_cu12.libs: the real libraries (mangled names)
    libibverbs: Path  # the wheel's own libibverbs (its UCX is linked against it)

    def env(self) -> dict[str, str]:
        """Variables for a child process that imports ucxx and must use this UCX (all four libraries).

        LD_PRELOAD of the wheel's libibverbs makes Debian's rxe provider (linked against the system
        libibverbs) register with the copy UCX uses; LD_LIBRARY_PATH lets that copy find the provider."""
        return {
            "RAPIDS_LIBUCX_PREFER_SYSTEM_LIBRARY": "true",
            "LD_LIBRARY_PATH": os.pathsep.join([str(self.prefix), str(self.libs_dir), SYSTEM_PROVIDER_DIR]),
            "LD_PRELOAD": str(self.libibverbs),
            "UCX_MODULE_DIR": str(self.prefix / "ucx"),
            # UD over rxe with the IPv4-mapped GID drops datagrams unless this check is off (FACTS.md).
            "UCX_UD_ETH_DGID_CHECK": "n",
            "UCX_WARN_UNUSED_ENV_VARS": "n",
        }


def nixl_libs_dir() -> Path:
    spec = importlib.util.find_spec("nixl_cu12")
    if spec is None or not spec.submodule_search_locations:
        raise VerbsUcxError("nixl-cu12 is not installed in this venv (scripts/setup.sh installs nixl-cu12==1.5.1)")
    d = Path(next(iter(spec.submodule_search_locations))).parent / "nixl_cu12.libs"
    if not d.is_dir():
        raise VerbsUcxError(f"{d} is missing: nixl-cu12 wheel without bundled libraries?")
    return d


def _one(libs: Path, pattern: str) -> Path:
    found = sorted(libs.glob(pattern))
    if len(found) != 1:
        raise VerbsUcxError(f"expected one {pattern} in {libs}, found {[p.name for p in found]}")
    return found[0]


def _link(target: Path, link: Path) -> None:
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    tmp = link.with_name(link.name + ".tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    tmp.replace(link)


def ensure_verbs_ucx(prefix: Path, libs_dir: Path | None = None) -> VerbsUcx:
    """Create (idempotently) the symlink prefix over nixl's bundled UCX and return it."""
    libs = libs_dir or nixl_libs_dir()
    (prefix / "ucx").mkdir(parents=True, exist_ok=True)
    real = {name: _one(libs, f"lib{name}-*.so.0.0.0") for name in ("ucs", "uct", "ucp", "ucm")}
    for name, target in real.items():
        _link(target, prefix / f"lib{name}.so")
        _link(target, prefix / f"lib{name}.so.0")
    # ucxx's loader also opens libucs_signal.so, which nixl does not bundle; pointing it at the same
    # libucs keeps the wheel's own libucs_signal (and with it a second libucs) out of the process.
    _link(real["ucs"], prefix / "libucs_signal.so")
    for module in MODULES:
        _link(libs / "ucx" / f"{module}.so.0.0.0", prefix / "ucx" / f"{module}.so")
    verbs = _one(libs, "libibverbs-*.so*")
    return VerbsUcx(prefix=prefix, libs_dir=libs, libibverbs=verbs)


def mapped_ucx_libraries(pid: int | str = "self") -> list[str]:
    """Real paths of the UCX core libraries mapped into a process (to check that all come from one UCX)."""
    names = ("libucs", "libuct", "libucp", "libucm")
    paths = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 6 and os.path.basename(parts[-1]).startswith(names):
            paths.add(parts[-1])
    return sorted(paths)
