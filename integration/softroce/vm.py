"""Boots the soft-RoCE guest with virtme-ng (Debian kernel, QEMU software emulation, host root shared
read-only) and runs one command in it. Runs in the user's shell process; owns the qemu child it starts
and kills only that one (its own process group) on timeout. Never runs more than the one VM per call.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .guest import GUEST_ENV, LOG_ENV, READY_MARK, SETUP_MARK, boot_script
from .prepare import Prepared, cache_dir, prepare, repo_root

#: Environment every guest command gets (host values of PATH/HOME are copied in as well).
GUEST_BASE_ENV = {
    GUEST_ENV: "1",
    "PYTHONDONTWRITEBYTECODE": "1",  # the repo is read-only in the guest
    "UCX_WARN_UNUSED_ENV_VARS": "n",
    "HYPOTHESIS_STORAGE_DIRECTORY": "/tmp/hypothesis",  # its default (.hypothesis/ in the repo) is read-only
}


@dataclass(frozen=True)
class GuestRun:
    exit_code: int  # the command's exit code; 97 = rxe setup failed; 124 = timeout; 125 = no result
    log_dir: Path  # console.log, boot.sh, rc, timing.json
    boot_seconds: float | None  # host launch → guest script start
    setup_seconds: float | None  # host launch → rxe devices ACTIVE
    total_seconds: float


def new_log_dir(base: Path | None = None) -> Path:
    base = base or cache_dir() / "runs"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    d = base / f"{stamp}-{os.getpid()}"
    d.mkdir(parents=True, exist_ok=False)
    return d


def vng_command(prep: Prepared, *, log_dir: Path, memory: str, cpus: int, script: Path) -> list[str]:
    return [
        "nice", "-n", "10",
        str(prep.vng), "--run", str(prep.kernel.vmlinuz), "--disable-kvm",
        "--memory", memory, "--cpus", str(cpus),
        "--rwdir", str(log_dir),
        "--exec", f"sh {script}",
    ]


def _pump(stream: TextIO, sink: TextIO, echo: TextIO | None, t0: float, marks: dict[str, float]) -> None:
    for line in stream:
        sink.write(line)
        sink.flush()
        if echo is not None:
            echo.write(line)
            echo.flush()
        for mark in (READY_MARK, SETUP_MARK):
            if line.startswith(mark) and mark not in marks:
                marks[mark] = time.monotonic() - t0


def run_in_guest(
    command: list[str],
    *,
    prep: Prepared | None = None,
    repo: Path | None = None,
    env: dict[str, str] | None = None,
    memory: str = "2G",
    cpus: int = 2,
    timeout: float = 900.0,
    log_dir: Path | None = None,
    echo: TextIO | None = sys.stdout,
) -> GuestRun:
    """Boot, create rxe0/rxe1, run `command` in `repo` (default: this checkout), return its exit code.

    Logs stay in `log_dir` (default `<cache>/runs/<stamp>-<pid>/`)."""
    if not command:
        raise ValueError("no command given (usage: kvlane softroce run -- <command...>)")
    if cpus < 1:
        raise ValueError(f"cpus must be >= 1, got {cpus}")
    prep = prep or prepare()
    repo = (repo or repo_root()).resolve()
    log_dir = log_dir or new_log_dir()
    log_dir.mkdir(parents=True, exist_ok=True)
    genv = {**GUEST_BASE_ENV, LOG_ENV: str(log_dir)}
    for key in ("PATH", "HOME", "LANG"):
        if key in os.environ:
            genv[key] = os.environ[key]
    genv.update(env or {})
    script = log_dir / "boot.sh"
    script.write_text(boot_script(command, repo=repo, log_dir=log_dir, env=genv))
    rc_file = log_dir / "rc"
    rc_file.unlink(missing_ok=True)
    cmd = vng_command(prep, log_dir=log_dir, memory=memory, cpus=cpus, script=script)
    (log_dir / "command").write_text(json.dumps({"guest": command, "vng": cmd}, indent=1) + "\n")
    host_env = {**os.environ, "PATH": f"{prep.venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"}

    marks: dict[str, float] = {}
    t0 = time.monotonic()
    timed_out = False
    with open(log_dir / "console.log", "w") as sink:
        proc = subprocess.Popen(
            cmd, cwd=repo, env=host_env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True,
        )
        assert proc.stdout is not None
        pump = threading.Thread(target=_pump, args=(proc.stdout, sink, echo, t0, marks), daemon=True)
        pump.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)  # our own session: vng and the qemu it started
            proc.wait()
        pump.join(timeout=10)
    total = time.monotonic() - t0
    if timed_out:
        exit_code = 124
    elif rc_file.is_file() and rc_file.read_text().strip().lstrip("-").isdigit():
        exit_code = int(rc_file.read_text().strip())
    else:
        exit_code = 125
    result = GuestRun(
        exit_code=exit_code, log_dir=log_dir, boot_seconds=marks.get(READY_MARK),
        setup_seconds=marks.get(SETUP_MARK), total_seconds=total,
    )
    (log_dir / "timing.json").write_text(json.dumps({
        "exit_code": exit_code, "vng_exit": proc.returncode, "timed_out": timed_out,
        "boot_seconds": result.boot_seconds, "setup_seconds": result.setup_seconds, "total_seconds": total,
    }, indent=1) + "\n")
    return result
