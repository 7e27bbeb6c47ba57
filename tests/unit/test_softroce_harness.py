"""The soft-RoCE harness's host-side pieces that need no VM: the guest boot script, the kernel cache,
the verbs-UCX symlink prefix, the CLI's --env parsing."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import typer
from kvlane.integration.cli.softroce import _parse_env
from kvlane.integration.softroce import guest, in_guest
from kvlane.integration.softroce.prepare import Kernel, Prepared, _unpacked_kernel
from kvlane.integration.softroce.ucx_verbs import VerbsUcxError, ensure_verbs_ucx
from kvlane.integration.softroce.vm import run_in_guest


def test_boot_script_creates_both_rxe_devices_then_runs_the_command_in_the_repo(tmp_path: Path) -> None:
    s = guest.boot_script([".venv/bin/pytest", "tests/softroce/guest", "-k", "a b"], repo=Path("/r"),
                          log_dir=tmp_path, env={"X": "it's"})
    lines = s.splitlines()
    for dev, netdev, addr in guest.RXE_LINKS:
        assert f"ip link add {netdev} type dummy || fail 'ip link add {netdev}'" in lines
        assert f"ip addr add {addr} dev {netdev} || fail 'ip addr {netdev}'" in lines
        assert f"rdma link add {dev} type rxe netdev {netdev} || fail 'rdma link add {dev}'" in lines
    assert "modprobe rdma_rxe || fail 'modprobe rdma_rxe failed'" in lines
    assert "ip link set d0 mtu 9000 || fail 'mtu d0'" in lines  # MTU 9000 → RoCE MTU 4096
    # Order: setup, env, cd, the command (shell-quoted), its exit code into <log>/rc.
    assert lines[-4:] == ["export X='it'\"'\"'s'", "cd /r || fail 'cd /r'",
                          ".venv/bin/pytest tests/softroce/guest -k 'a b'", 'echo $? > "$rc_file"']
    assert f"rc_file={tmp_path / 'rc'}" in lines


def test_boot_script_refuses_empty_command_and_bad_env_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no command"):
        guest.boot_script([], repo=tmp_path, log_dir=tmp_path, env={})
    with pytest.raises(ValueError, match="bad environment variable name 'A;rm'"):
        guest.boot_script(["true"], repo=tmp_path, log_dir=tmp_path, env={"A;rm": "1"})


def test_not_in_guest_without_the_marker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(guest.GUEST_ENV, raising=False)
    assert in_guest() is False


def test_kernel_cache_counts_only_complete_unpacks(tmp_path: Path) -> None:
    root = tmp_path / "linux-image-6.1.0-9-amd64"
    (root / "boot").mkdir(parents=True)
    (root / "lib" / "modules" / "6.1.0-9-amd64").mkdir(parents=True)
    (root / "boot" / "vmlinuz-6.1.0-9-amd64").write_bytes(b"k")
    assert _unpacked_kernel(root) is None  # no completion marker: an interrupted unpack
    (root / ".kvlane-complete").write_text("linux-image-6.1.0-9-amd64 6.1.0-9-amd64\n")
    k = _unpacked_kernel(root)
    assert k is not None and k.vmlinuz == root / "boot" / "vmlinuz-6.1.0-9-amd64"
    (root / "boot" / "vmlinuz-6.1.0-9-amd64").unlink()
    assert _unpacked_kernel(root) is None


def _fake_nixl_libs(d: Path) -> Path:
    (d / "ucx").mkdir(parents=True)
    for name, h in (("ucs", "14c2"), ("uct", "1141"), ("ucp", "b39b"), ("ucm", "f6ca")):
        (d / f"lib{name}-{h}.so.0.0.0").write_bytes(name.encode())
    for m in ("libuct_ib", "libuct_cma", "libuct_ib_mlx5"):
        (d / "ucx" / f"{m}.so.0.0.0").write_bytes(m.encode())
    (d / "libibverbs-1de1.so.1.14.48.0").write_bytes(b"v")
    return d


def test_verbs_ucx_prefix_gives_ucxx_all_four_libraries_from_one_ucx(tmp_path: Path) -> None:
    libs = _fake_nixl_libs(tmp_path / "libs")
    v = ensure_verbs_ucx(tmp_path / "prefix", libs)
    p = v.prefix
    for name in ("ucs", "uct", "ucp", "ucm"):
        assert (p / f"lib{name}.so").read_bytes() == name.encode()
        assert (p / f"lib{name}.so.0").resolve() == (p / f"lib{name}.so").resolve()
    assert (p / "libucs_signal.so").resolve() == (p / "libucs.so").resolve()  # no second libucs
    assert sorted(os.listdir(p / "ucx")) == ["libuct_cma.so", "libuct_ib.so"]
    env = v.env()
    assert env["LD_LIBRARY_PATH"].split(":")[:2] == [str(p), str(libs)]
    assert env["LD_PRELOAD"] == str(libs / "libibverbs-1de1.so.1.14.48.0")
    assert env["RAPIDS_LIBUCX_PREFER_SYSTEM_LIBRARY"] == "true" and env["UCX_UD_ETH_DGID_CHECK"] == "n"
    assert ensure_verbs_ucx(tmp_path / "prefix", libs) == v  # idempotent


def test_verbs_ucx_names_the_missing_library(tmp_path: Path) -> None:
    libs = _fake_nixl_libs(tmp_path / "libs")
    (libs / "libucp-b39b.so.0.0.0").unlink()
    with pytest.raises(VerbsUcxError, match=r"expected one libucp-\*\.so\.0\.0\.0"):
        ensure_verbs_ucx(tmp_path / "prefix", libs)


def test_cli_env_pairs() -> None:
    assert _parse_env(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}
    with pytest.raises(typer.BadParameter, match="KEY=VALUE"):
        _parse_env(["A"])


def _fake_vng(tmp_path: Path, body: str) -> Prepared:
    """A stand-in for vng that only plays the guest's part of the protocol (markers, <log>/rc)."""
    vng = tmp_path / "vng"
    vng.write_text("#!/bin/sh\n"
                   'while [ "$1" != "--rwdir" ]; do shift; done; log="$2"\n' + body)
    vng.chmod(0o755)
    kernel = Kernel(package="linux-image-x", version="x", root=tmp_path)
    return Prepared(kernel=kernel, vng=vng, venv_bin=tmp_path, verbs_ucx=None)


def test_run_returns_the_guest_exit_code_and_keeps_logs(tmp_path: Path) -> None:
    prep = _fake_vng(tmp_path, f'echo "{guest.READY_MARK} uptime=1"; echo "{guest.SETUP_MARK} uptime=2"\n'
                               'echo "hello from guest"; echo 3 > "$log/rc"\n')
    res = run_in_guest(["false"], prep=prep, repo=tmp_path, log_dir=tmp_path / "logs", echo=None, timeout=60)
    assert res.exit_code == 3
    assert res.boot_seconds is not None and res.setup_seconds is not None
    assert "hello from guest" in (res.log_dir / "console.log").read_text()
    assert "export KVLANE_SOFTROCE_GUEST=1" in (res.log_dir / "boot.sh").read_text()
    assert json.loads((res.log_dir / "timing.json").read_text())["exit_code"] == 3


def test_run_without_a_result_is_125_and_a_hung_vm_is_killed_with_124(tmp_path: Path) -> None:
    res = run_in_guest(["true"], prep=_fake_vng(tmp_path, "exit 0\n"), repo=tmp_path, log_dir=tmp_path / "a",
                       echo=None)
    assert res.exit_code == 125 and res.boot_seconds is None
    t0 = time.monotonic()
    res = run_in_guest(["true"], prep=_fake_vng(tmp_path, "sleep 30 & sleep 30\n"), repo=tmp_path,
                       log_dir=tmp_path / "b", echo=None, timeout=1.0)
    assert res.exit_code == 124 and time.monotonic() - t0 < 15
