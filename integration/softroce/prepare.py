"""Host-side preparation for the soft-RoCE VM: Debian packages, the Debian kernel package (downloaded and
unpacked into a cache, never installed), and virtme-ng in the project venv. Runs in the user's shell
process (`kvlane softroce run`, the pytest harness); idempotent and cached; never touches /boot or
/lib/modules of the host.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .ucx_verbs import VerbsUcxError, ensure_verbs_ucx

#: Debian packages the host needs. The guest shares the host's root file system read-only, so the tools
#: the guest runs (modprobe, rdma, ibv_devinfo, ib_write_bw, pyverbs) are installed on the host.
APT_PACKAGES = (
    "qemu-system-x86",  # the VM (software emulation: --disable-kvm)
    "busybox-static",  # virtme-ng's initramfs
    "kmod",  # modprobe/depmod (guest and virtme-ng's depmod of the unpacked kernel)
    "file",  # virtme-ng reads the kernel version with it
    "rdma-core",  # `rdma link add ... type rxe`
    "ibverbs-providers",  # librxe (the soft-RoCE verbs provider)
    "ibverbs-utils",  # ibv_devinfo
    "python3-pyverbs",  # device discovery (kvlane.transport.rdma_devices)
    "perftest",  # ib_write_bw: the reference number for the benchmark
    "iproute2",  # ip link add ... type dummy
)

#: The meta package whose dependency names the current Debian kernel image package.
KERNEL_META = "linux-image-amd64"
VIRTME_NG = "virtme-ng==1.42"


class SoftRoceSetupError(RuntimeError):
    """The host cannot be prepared; the message says what is missing and how to fix it."""


@dataclass(frozen=True)
class Kernel:
    package: str  # e.g. linux-image-6.1.0-56-amd64
    version: str  # uname -r in the guest, e.g. 6.1.0-56-amd64
    root: Path  # the unpacked package (boot/, lib/modules/)

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.version}"


@dataclass(frozen=True)
class Prepared:
    kernel: Kernel
    vng: Path  # the vng executable
    venv_bin: Path  # put first on PATH for vng (it runs virtme-run from PATH)
    verbs_ucx: Path | None  # prefix made by ucx_verbs.ensure_verbs_ucx (None: nixl-cu12 not installed)


def repo_root() -> Path:
    """The checkout this module runs from (integration/softroce/ → two levels up)."""
    return Path(__file__).resolve().parents[2]


def cache_dir() -> Path:
    """`$KVLANE_SOFTROCE_CACHE`, else `<repo>/.work/softroce` (git-ignored)."""
    env = os.environ.get("KVLANE_SOFTROCE_CACHE")
    return Path(env).resolve() if env else repo_root() / ".work" / "softroce"


def _run(cmd: list[str], *, what: str, cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise SoftRoceSetupError(f"{what}: {cmd[0]} not found") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise SoftRoceSetupError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n" + "\n".join(tail))
    return proc.stdout


def missing_apt_packages(packages: tuple[str, ...] = APT_PACKAGES) -> list[str]:
    out = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package} ${db:Status-Status}\n", *packages],
        capture_output=True, text=True, check=False,
    ).stdout
    installed = {line.split()[0] for line in out.splitlines() if line.endswith(" installed")}
    return [p for p in packages if p not in installed]


def ensure_apt(packages: tuple[str, ...] = APT_PACKAGES, log=print) -> None:
    missing = missing_apt_packages(packages)
    if not missing:
        return
    if os.geteuid() != 0:
        raise SoftRoceSetupError(f"missing Debian packages (run as root or install them): {' '.join(missing)}")
    log(f"softroce: apt-get install {' '.join(missing)}")
    _run(["apt-get", "-o", "Acquire::Retries=5", "update", "-qq"], what="apt-get update")
    env_cmd = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-o", "Acquire::Retries=5", "install", "-y", "-qq",
               "--no-install-recommends"]
    _run([*env_cmd, *missing], what="apt-get install")
    still = missing_apt_packages(packages)
    if still:
        raise SoftRoceSetupError(f"apt-get did not install: {' '.join(still)}")


def kernel_package_name() -> str:
    """The concrete image package `linux-image-amd64` depends on in the host's apt lists."""
    out = _run(["apt-cache", "depends", KERNEL_META], what="apt-cache depends")
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends: linux-image-"):
            return line.split(":", 1)[1].strip()
    raise SoftRoceSetupError(f"apt-cache: {KERNEL_META} names no linux-image package (run apt-get update)")


def _unpacked_kernel(root: Path) -> Kernel | None:
    """A complete unpacked kernel under `root` (written last by `ensure_kernel`), or None."""
    marker = root / ".kvlane-complete"
    if not marker.is_file():
        return None
    package, version = marker.read_text().split()
    k = Kernel(package=package, version=version, root=root)
    return k if k.vmlinuz.is_file() and (root / "lib" / "modules" / version).is_dir() else None


def ensure_kernel(cache: Path, log=print) -> Kernel:
    """Download (apt-get download) and unpack (dpkg-deb -x) the Debian kernel once; reuse it after.

    A cached kernel is reused as is even when apt later offers a newer one, so runs stay comparable;
    delete `<cache>/kernel` to move on."""
    kdir = cache / "kernel"
    kdir.mkdir(parents=True, exist_ok=True)
    for existing in sorted(kdir.iterdir()):
        if existing.is_dir() and (k := _unpacked_kernel(existing)) is not None:
            return k
    package = kernel_package_name()
    version = package.removeprefix("linux-image-")
    log(f"softroce: downloading {package}")
    with tempfile.TemporaryDirectory(dir=kdir) as tmp:
        tmpdir = Path(tmp)
        _run(["apt-get", "-o", "Acquire::Retries=5", "download", "-q", package], what="apt-get download", cwd=tmpdir)
        debs = sorted(tmpdir.glob(f"{package}_*.deb"))
        if not debs:
            raise SoftRoceSetupError(f"apt-get download left no {package}_*.deb in {tmpdir}")
        unpacked = tmpdir / "root"
        _run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], what="dpkg-deb -x")
        ko = list((unpacked / "lib" / "modules" / version).rglob("rdma_rxe.ko*"))
        if not ko:
            raise SoftRoceSetupError(f"{package} has no rdma_rxe module")
        (unpacked / ".kvlane-complete").write_text(f"{package} {version}\n")
        final = kdir / package
        if final.exists():
            shutil.rmtree(final)
        unpacked.rename(final)
    k = _unpacked_kernel(final)
    assert k is not None
    return k


def ensure_vng(log=print) -> tuple[Path, Path]:
    """virtme-ng in the venv this Python runs from (the project's .venv); returns (vng, bin dir)."""
    bindir = Path(sys.executable).parent
    vng = bindir / "vng"
    if not vng.is_file():
        log(f"softroce: pip install {VIRTME_NG}")
        _run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", VIRTME_NG],
             what="pip install virtme-ng")
    if not vng.is_file():
        raise SoftRoceSetupError(f"virtme-ng installed but {vng} is missing")
    return vng, bindir


@contextmanager
def _lock(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".prepare.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def prepare(cache: Path | None = None, log=print) -> Prepared:
    """Everything `run_in_guest` needs; cheap (a few dpkg/stat calls) when already prepared."""
    cache = cache or cache_dir()
    with _lock(cache):
        ensure_apt(log=log)
        kernel = ensure_kernel(cache, log=log)
        vng, bindir = ensure_vng(log=log)
        # The guest sees the repo read-only: the verbs UCX prefix (symlinks only) is made here.
        try:
            verbs: Path | None = ensure_verbs_ucx(verbs_ucx_prefix(cache)).prefix
        except VerbsUcxError as exc:
            log(f"softroce: no verbs UCX for ucxx ({exc}); RDMA data tests will fail")
            verbs = None
    return Prepared(kernel=kernel, vng=vng, venv_bin=bindir, verbs_ucx=verbs)


def verbs_ucx_prefix(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "ucx-verbs"
