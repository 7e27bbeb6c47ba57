"""Start, watch and stop the processes of a kvlane deployment: policy service, vLLM engines, router.

Runs in the caller's process (demo, integration tests, user scripts); each child runs in its own process
group with its output in a log file, so `stop()` kills the whole tree. Never leaves a child running
after `stop()`/`ProcessSet.__exit__`, and never binds anything but loopback unless the caller asks.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

#: Environment every child gets (FACTS.md): UCX prints a warning to stdout in every process unless told
#: not to; shared memory with error handling; blocking progress (the only usable mode on 2 cores).
UCX_ENV = {
    "UCX_WARN_UNUSED_ENV_VARS": "n",
    "UCX_MM_ERROR_HANDLING": "y",
    "UCXPY_PROGRESS_MODE": "blocking",
}
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}

POLICY_LISTENING = re.compile(r"policy service listening on (tcp://[0-9A-Za-z.\-\[\]:]+)")
ROUTER_LISTENING = re.compile(r"router listening on (http://[0-9A-Za-z.\-\[\]:]+)")

#: Connector extra-config keys kvlane itself sets; a caller's `extra_connector_config` may not override them.
CONNECTOR_OWN_KEYS = ("policy", "role", "engine_id", "http")


class ProcessDied(RuntimeError):
    """A child exited while we waited for it; the message carries its exit code and the tail of its log."""


class StartTimeout(TimeoutError):
    """A child did not become ready in time; the message carries the tail of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the usual bind-to-0 trick; racy but fine on loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            text = f.read().decode("utf-8", errors="replace")
    except OSError as exc:
        return f"<log {path} unreadable: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class ManagedProcess:
    """One child process (its own process group) writing to `log_file`."""

    name: str
    argv: list[str]
    log_file: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    #: Directories this launcher created for the child (e.g. its TMPDIR); removed by `stop()`.
    cleanup_dirs: list[Path] = field(default_factory=list)

    def start(self) -> ManagedProcess:
        if self.proc is not None:
            raise RuntimeError(f"{self.name}: already started (pid {self.proc.pid})")
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            cmd = shlex.join(self.argv).replace("\n", "\\n")  # one line, whatever the argv holds
            log.write(f"# kvlane launch {time.strftime('%H:%M:%S')}: {cmd}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name}: not started")
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_file, lines)

    def check_alive(self) -> None:
        """Raise ProcessDied (exit code + log tail) if the child has exited."""
        if self.proc is None:
            raise RuntimeError(f"{self.name}: not started")
        code = self.proc.poll()
        if code is not None:
            raise ProcessDied(
                f"{self.name} (pid {self.proc.pid}) exited with code {code} while starting; "
                f"last lines of {self.log_file}:\n{self.log_tail()}"
            )

    def wait_for_log(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        """Wait until a line of the log matches `pattern` (written after this process started)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                text = self.log_file.read_text(errors="replace")
            except OSError:
                text = ""
            # search only what the child wrote: after our own header line (which quotes the argv)
            header = text.rfind("# kvlane launch ")
            start = text.find("\n", header) + 1 if header >= 0 else 0
            m = pattern.search(text, start) if start > 0 or header < 0 else None
            if m:
                return m
            self.check_alive()
            if time.monotonic() > deadline:
                raise StartTimeout(
                    f"{self.name}: no line matching {pattern.pattern!r} within {timeout:.0f}s; "
                    f"last lines of {self.log_file}:\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def request_stop(self) -> None:
        """SIGTERM the process group without waiting (so several children can shut down in parallel)."""
        if self.proc is not None and self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGTERM)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after `timeout` s; returns the exit code. Idempotent."""
        if self.proc is None:
            return None
        pgid = self.proc.pid  # start_new_session: the child leads its own group
        if self.proc.poll() is None:
            _signal_group(pgid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(pgid, signal.SIGKILL)
                self.proc.wait(10)
        # Children that outlived the leader (e.g. vLLM's engine core) go too.
        _signal_group(pgid, signal.SIGKILL)
        while self.cleanup_dirs:
            shutil.rmtree(self.cleanup_dirs.pop(), ignore_errors=True)
        return self.proc.returncode


#: vLLM binds zmq IPC sockets at `$TMPDIR/<36-char uuid>`; sockaddr_un paths hold 107 bytes.
MAX_TMPDIR_CHARS = 64


def short_tmpdir(tag: str) -> Path:
    """A fresh private directory with a short path (under /tmp when it exists), for a child's TMPDIR."""
    base = "/tmp" if os.path.isdir("/tmp") else None
    return Path(tempfile.mkdtemp(prefix=f"kvl-{tag[:16]}-", dir=base))


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(UCX_ENV)
    env.update(OFFLINE_ENV)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update(extra)
    return env


def _kvlane_argv(*args: str) -> list[str]:
    """Run the kvlane CLI with this interpreter (works without the console script on PATH)."""
    return [sys.executable, "-c", "from kvlane.integration.cli import main; main()", *args]


def _log_path(log_file: str | os.PathLike[str] | None, stem: str) -> Path:
    if log_file is not None:
        return Path(log_file)
    return Path(tempfile.mkdtemp(prefix="kvlane-logs-")) / f"{stem}.log"


# --------------------------------------------------------------------------------------------- policy


@dataclass
class PolicyProcess(ManagedProcess):
    host: str = "127.0.0.1"
    port: int = 0

    @property
    def addr(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    def wait_ready(self, timeout: float = 30.0) -> str:
        """Wait for the 'policy service listening on tcp://...' line; return that address."""
        return self.wait_for_log(POLICY_LISTENING, timeout).group(1)



_P = TypeVar("_P", bound="ManagedProcess")


def _start_and_wait(proc: _P, ready: Callable[[float], Any], wait: float | None) -> _P:
    """Start `proc`; unless `wait` is None, block on `ready(wait)` and stop the process if that fails."""
    proc.start()
    if wait is not None:
        try:
            ready(wait)
        except BaseException:
            proc.stop()
            raise
    return proc

def start_policy_service(
    topology_spec: str,
    port: int,
    *,
    host: str = "127.0.0.1",
    log_file: str | os.PathLike[str] | None = None,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    wait: float | None = 30.0,
) -> PolicyProcess:
    """Run `kvlane policy serve --topology SPEC --host HOST --port PORT`; wait until it listens unless
    `wait` is None. `topology_spec` is a YAML path or a generator spec such as `loopback:gpus=2`."""
    proc = PolicyProcess(
        name=f"policy:{port}",
        argv=_kvlane_argv("policy", "serve", "--topology", topology_spec, "--host", host, "--port", str(port),
                          *extra_args),
        log_file=_log_path(log_file, f"policy-{port}"),
        env=_child_env(env),
        host=host,
        port=port,
    )
    return _start_and_wait(proc, proc.wait_ready, wait)


# --------------------------------------------------------------------------------------------- vLLM


@dataclass
class EngineProcess(ManagedProcess):
    engine_id: str = ""
    role: str | None = None
    host: str = "127.0.0.1"
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def wait_healthy(self, timeout: float = 300.0, poll: float = 1.0) -> None:
        """Poll GET /health until it answers 200. Raises ProcessDied (exit code + log tail) as soon as the
        engine exits, StartTimeout (with log tail) after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            if _http_ok(self.url + "/health"):
                return
            if time.monotonic() > deadline:
                raise StartTimeout(
                    f"engine {self.engine_id} ({self.url}) not healthy after {timeout:.0f}s; "
                    f"last lines of {self.log_file}:\n{self.log_tail()}"
                )
            time.sleep(poll)


def connector_config(
    *,
    role: Literal["prefill", "decode"],
    engine_id: str,
    policy_addr: str,
    http: str,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The `--kv-transfer-config` object for KVLaneConnector. `extra` keys are passed through to the
    connector's `kv_connector_extra_config`; they may not override kvlane's own keys."""
    if role not in ("prefill", "decode"):
        raise ValueError(f"role={role!r}: must be 'prefill' or 'decode' (None means no connector)")
    if not policy_addr.startswith("tcp://"):
        raise ValueError(f"policy_addr={policy_addr!r}: expected tcp://HOST:PORT")
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(CONNECTOR_OWN_KEYS))
    if clash:
        raise ValueError(f"extra_connector_config may not set {', '.join(clash)} (kvlane sets them)")
    return {
        "kv_connector": "KVLaneConnector",
        "kv_connector_module_path": "kvlane.connector.vllm",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {
            "policy": policy_addr,
            "role": role,
            "engine_id": engine_id,
            "http": http,
            **extra,
        },
    }


def vllm_command(
    model_dir: str | os.PathLike[str],
    port: int,
    *,
    host: str = "127.0.0.1",
    role: Literal["prefill", "decode"] | None = None,
    engine_id: str | None = None,
    policy_addr: str | None = None,
    tp: int = 1,
    block_size: int = 32,
    max_model_len: int = 4096,
    dtype: str = "float32",
    seed: int = 0,
    served_model_name: str | None = None,
    extra_connector_config: Mapping[str, Any] | None = None,
    extra_args: Sequence[str] = (),
    log_stats: bool = False,
) -> list[str]:
    """The argv of one vLLM OpenAI server (see `start_vllm_engine`). `log_stats`: keep vLLM's stats (its
    Prometheus gauges such as `vllm:kv_cache_usage_perc`, and a stats log line every 10 s); off by default."""
    if block_size <= 0 or block_size % 32:
        raise ValueError(f"block_size={block_size}: vLLM's CPU attention needs a positive multiple of 32")
    if tp < 1:
        raise ValueError(f"tp={tp}: must be >= 1")
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir),
        "--host", host, "--port", str(port),
        "--tensor-parallel-size", str(tp),
        "--block-size", str(block_size),
        "--max-model-len", str(max_model_len),
        "--dtype", dtype,
        "--seed", str(seed),
    ]
    if not log_stats:
        argv.append("--disable-log-stats")
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    if role is not None:
        if not engine_id or not policy_addr:
            raise ValueError(f"role={role!r} needs engine_id and policy_addr")
        cfg = connector_config(role=role, engine_id=engine_id, policy_addr=policy_addr,
                               http=f"http://{host}:{port}", extra=extra_connector_config)
        argv += ["--kv-transfer-config", json.dumps(cfg, separators=(",", ":"))]
    elif extra_connector_config:
        raise ValueError("extra_connector_config given without a role: a plain engine has no connector")
    argv += list(extra_args)
    return argv


def vllm_env(
    *,
    cpu_cores: Iterable[int] | str | None,
    kv_cache_gib: int = 1,
    tmpdir: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Environment for one vLLM CPU engine: OMP binding, KV cache size, its own TMPDIR, offline hub."""
    if cpu_cores is None:
        bind = "auto"
    elif isinstance(cpu_cores, str):
        bind = cpu_cores
    else:
        cores = list(cpu_cores)
        if not cores or any(c < 0 for c in cores):
            raise ValueError(f"cpu_cores={cores}: need at least one core id >= 0")
        bind = ",".join(str(c) for c in cores)
    if kv_cache_gib < 1:
        raise ValueError(f"kv_cache_gib={kv_cache_gib}: vLLM takes whole GiB, at least 1")
    tmp = Path(tmpdir) if tmpdir is not None else short_tmpdir("vllm")
    if len(str(tmp)) > MAX_TMPDIR_CHARS:
        raise ValueError(
            f"TMPDIR {tmp} is {len(str(tmp))} characters; vLLM puts zmq IPC sockets there (<dir>/<uuid>) and "
            f"socket paths are limited to 107 bytes: use a directory of at most {MAX_TMPDIR_CHARS} characters"
        )
    tmp.mkdir(parents=True, exist_ok=True)
    extra = {
        "VLLM_CPU_OMP_THREADS_BIND": bind,
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        "TMPDIR": str(tmp),
    }
    if env:
        extra.update(env)
    return _child_env(extra)


def start_vllm_engine(
    model_dir: str | os.PathLike[str],
    port: int,
    *,
    role: Literal["prefill", "decode"] | None = None,
    engine_id: str | None = None,
    policy_addr: str | None = None,
    cpu_cores: Iterable[int] | str | None = None,
    tp: int = 1,
    block_size: int = 32,
    max_model_len: int = 4096,
    dtype: str = "float32",
    served_model_name: str | None = None,
    kv_cache_gib: int = 1,
    extra_connector_config: Mapping[str, Any] | None = None,
    extra_args: Sequence[str] = (),
    log_file: str | os.PathLike[str] | None = None,
    tmpdir: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    host: str = "127.0.0.1",
    log_stats: bool = False,
) -> EngineProcess:
    """Start one vLLM OpenAI server (does not wait: call `wait_healthy`).

    role None → a plain engine without connector (the single-engine reference); "prefill"/"decode" →
    KVLaneConnector with `{"policy", "role", "engine_id", "http"}` plus `extra_connector_config` in its
    extra config. `cpu_cores` pins the engine's OMP threads (idle vLLM CPU workers spin a whole core).
    """
    engine_id = engine_id or (f"{role}-{port}" if role else f"plain-{port}")
    argv = vllm_command(model_dir, port, host=host, role=role, engine_id=engine_id, policy_addr=policy_addr,
                        tp=tp, block_size=block_size, max_model_len=max_model_len, dtype=dtype,
                        served_model_name=served_model_name, extra_connector_config=extra_connector_config, extra_args=extra_args,
                        log_stats=log_stats)
    log = _log_path(log_file, f"vllm-{engine_id}")
    # The engine's TMPDIR goes when it stops, given or not: it holds sockets and vLLM's compile caches
    # (~150 MB per engine); a few dozen test runs had filled this machine's disk with them (session 4).
    tmp = short_tmpdir(engine_id) if tmpdir is None else Path(tmpdir)
    proc = EngineProcess(
        name=f"vllm:{engine_id}",
        argv=argv,
        log_file=log,
        env=vllm_env(cpu_cores=cpu_cores, kv_cache_gib=kv_cache_gib, tmpdir=tmp, env=env),
        engine_id=engine_id,
        role=role,
        host=host,
        port=port,
        cleanup_dirs=[tmp],
    )
    return proc.start()  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------- router


@dataclass
class RouterProcess(ManagedProcess):
    host: str = "127.0.0.1"
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            if _http_ok(self.url + "/health"):
                return
            if time.monotonic() > deadline:
                raise StartTimeout(f"router {self.url} not healthy after {timeout:.0f}s; last lines of "
                                   f"{self.log_file}:\n{self.log_tail()}")
            time.sleep(0.2)


def start_router(
    policy_addr: str,
    port: int,
    *,
    host: str = "127.0.0.1",
    log_file: str | os.PathLike[str] | None = None,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    wait: float | None = 30.0,
) -> RouterProcess:
    """Run `kvlane router serve --policy ADDR --host HOST --port PORT`; wait for /health unless wait=None."""
    proc = RouterProcess(
        name=f"router:{port}",
        argv=_kvlane_argv("router", "serve", "--policy", policy_addr, "--host", host, "--port", str(port),
                          *extra_args),
        log_file=_log_path(log_file, f"router-{port}"),
        env=_child_env(env),
        host=host,
        port=port,
    )
    return _start_and_wait(proc, proc.wait_healthy, wait)


# --------------------------------------------------------------------------------------------- groups


class ProcessSet:
    """Owns started processes; `stop_all()` (also on `__exit__`) stops them all in parallel. Turning the
    owner's own SIGTERM into an exception that reaches `__exit__` is the caller's business."""

    def __init__(self) -> None:
        self.procs: list[ManagedProcess] = []

    def add(self, proc: ManagedProcess) -> ManagedProcess:
        self.procs.append(proc)
        return proc

    def stop_all(self, timeout: float = 20.0) -> None:
        """SIGTERM every child at once, then wait for each (SIGKILL after a shared `timeout`)."""
        for proc in reversed(self.procs):
            proc.request_stop()
        deadline = time.monotonic() + timeout
        while self.procs:
            self.procs.pop().stop(max(deadline - time.monotonic(), 0.1))

    def __enter__(self) -> ProcessSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
