"""Runs kvlane's own transport (`kvlane.transport.KVTransport`, ucx backend) between a prefill-side and a
decode-side process over the soft-RoCE devices: one transport path per rxe device (path1 → rxe0,
path2 → rxe1, UCX_TLS=rc_verbs,ud_verbs so nothing but verbs can carry the bytes), TP ranks i → i.
Started by the guest tests (`run_pair`); the two roles run as child processes and report JSON lines.
It moves exactly the blocks the scenario names; it never chooses a path or a block by itself.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: path name → UCX device. Path 1 / path 2 of a 2-port host (ZCube) on the two rxe devices.
DEFAULT_PATHS = {"path1": "rxe0:1", "path2": "rxe1:1"}
VERBS_TLS = "rc_verbs,ud_verbs"


@dataclass(frozen=True)
class Move:
    """One transfer: `tid` on `path` from TP rank `rank`, P blocks `src` → D blocks `dst`."""

    tid: str
    path: str
    src: tuple[int, ...]
    dst: tuple[int, ...]
    rank: int = 0

    def to_json(self) -> dict:
        return {"tid": self.tid, "path": self.path, "src": list(self.src), "dst": list(self.dst), "rank": self.rank}

    @staticmethod
    def from_json(d: dict) -> Move:
        m = Move(tid=str(d["tid"]), path=str(d["path"]), src=tuple(int(x) for x in d["src"]),
                 dst=tuple(int(x) for x in d["dst"]), rank=int(d.get("rank", 0)))
        if len(m.src) != len(m.dst) or not m.src:
            raise ValueError(f"move {m.tid}: src and dst must be equally long and non-empty")
        return m


def prefill_blocks(rank: int, n_blocks: int, block_bytes: int) -> np.ndarray:
    """P's KV region of `rank`: deterministic bytes, so D can verify what it received on its own."""
    return np.random.default_rng(1000 + rank).integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)


def _digest(b: np.ndarray) -> str:
    return hashlib.blake2b(memoryview(np.ascontiguousarray(b)), digest_size=16).hexdigest()


def _counters() -> dict[str, list[int]]:
    from .guest import IB_SYSFS, packet_counters

    if not IB_SYSFS.is_dir():
        return {}
    return {d: list(v) for d, v in packet_counters().items()}


def _emit(**kv: object) -> None:
    """One JSON report line; ``t`` is the wall clock (shared by P and D in one guest) to order events."""
    print(json.dumps({**kv, "t": round(time.time(), 3)}), flush=True)


#: UCX keepalive off in the soft-RoCE scenario: its packets (~9/s per device while idle) would blur the
#: per-device packet counts the guest tests assert. (An earlier note here blamed keepalive for OFFERs that
#: never got through; that was D's expects running out during P's start-up, see docs/softroce.md. With
#: keepalive on the moves pass, and a killed D surfaced as an endpoint error after 32 s.) A dead peer is then
#: caught by RC retries or, at the latest, the deadline.
RXE_UCX_DEFAULTS = {"KEEPALIVE_INTERVAL": "inf"}
#: P publishes this file in the rendezvous directory once every link is connected; D arms its expects then.
P_CONNECTED = "P.connected"
#: ... and this one after its last push: D withdraws what is still armed (it can no longer arrive).
P_DONE = "P.done"
#: How long either side waits for the other's start-up (descriptors, connect) under emulation.
CONNECT_BUDGET_S = 600.0
#: How long P waits for D to check and report a completed move (BLAKE2b of its blocks) before the next one.
REPORT_BUDGET_S = 120.0
#: Added to each expect's deadline: P's per-move overhead (counters, reports) between pushes.
ARM_SLACK_S = 30.0
#: Set by `run_pair(ucx_defaults=...)` in the child processes (TransportConfig.ucx_defaults override).
UCX_DEFAULTS_ENV = "KVLANE_SOFTROCE_UCX_DEFAULTS"


def _config(tp: int, paths: dict[str, str], tls: str):
    from kvlane.transport import PathConfig, TransportConfig

    extra = {}
    if os.environ.get(UCX_DEFAULTS_ENV):
        extra["ucx_defaults"] = {str(k): str(v) for k, v in json.loads(os.environ[UCX_DEFAULTS_ENV]).items()}

    # Blocking progress: in thread mode ucxx gives ucp_ep_create 3 x 3 s on its progress thread, and
    # endpoint creation over verbs under QEMU emulation takes longer (UCXXTimedOutError in the guest).
    return TransportConfig(
        backend="ucx", tp_size=tp, connect_timeout_s=120.0, offer_hold_s=300.0, ucx_progress_mode="blocking", **extra,
        paths={name: PathConfig(ucx={"TLS": tls, "NET_DEVICES": dev}) for name, dev in paths.items()},
    )


def _copies(m: Move, block_bytes: int):
    from kvlane.transport import BlockCopy

    return [BlockCopy(region=0, src_offset=s * block_bytes, dst_offset=d * block_bytes, nbytes=block_bytes)
            for s, d in zip(m.src, m.dst, strict=True)]


def _wait_file(p: Path, timeout: float) -> bytes:
    t0 = time.monotonic()
    while not p.exists():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{p} did not appear within {timeout:.0f}s")
        time.sleep(0.05)
    return p.read_bytes()


def _publish(p: Path, data: bytes) -> None:
    tmp = p.with_name("." + p.name)
    tmp.write_bytes(data)
    tmp.rename(p)


def role_d(rdv: Path, tp: int, n_blocks: int, block_bytes: int, moves: list[Move], paths: dict[str, str],
           tls: str, deadline_s: float) -> int:
    from kvlane.transport import KVTransport

    ts = [KVTransport("D", r, _config(tp, paths, tls)) for r in range(tp)]
    kv = [np.zeros((n_blocks, block_bytes), dtype=np.uint8) for _ in range(tp)]
    for t, region in zip(ts, kv, strict=True):
        t.register_regions([region], layout_tag="softroce")
        _publish(rdv / f"D.rank{t.rank}.desc", t.descriptor())
    _emit(role="D", event="published")
    # Arm only once P is connected: P's start-up and handshakes took 40-160 s under emulation, and an expect
    # armed before that ran out before P even offered (that was the "lost OFFER" of the first guest runs).
    # All moves are armed at once; P pushes them one after another, each within deadline_s, so move k
    # may start up to k deadlines late.
    _wait_file(rdv / P_CONNECTED, CONNECT_BUDGET_S)
    _emit(role="D", event="armed")
    futs = [ts[m.rank].expect(m.tid, _copies(m, block_bytes), deadline_s=(k + 1) * deadline_s + ARM_SLACK_S)
            for k, m in enumerate(moves)]
    want = {r: prefill_blocks(r, n_blocks, block_bytes) for r in sorted({m.rank for m in moves})}
    ok_all = True
    for m, fut in zip(moves, futs, strict=True):
        while not fut.done():  # P is done: every move it completed has resolved here (D resolves before DONE)
            try:
                fut.result(timeout=0.5)
            except concurrent.futures.TimeoutError:
                if (rdv / P_DONE).exists():
                    ts[m.rank].cancel(m.tid)
        res = fut.result()
        bad = [d for s, d in zip(m.src, m.dst, strict=True) if _digest(kv[m.rank][d]) != _digest(want[m.rank][s])]
        ok_all &= res.ok and not bad
        _emit(role="D", tid=m.tid, ok=res.ok, bytes=res.bytes, path=res.path, bad_blocks=bad, error=res.error)
        _publish(rdv / f"D.{m.tid}.reported", b"1")
    for t in ts:
        t.close()
    return 0 if ok_all else 1


def role_p(rdv: Path, tp: int, n_blocks: int, block_bytes: int, moves: list[Move], paths: dict[str, str],
           tls: str, deadline_s: float) -> int:
    from kvlane.transport import KVTransport, RankMismatchError

    ts = [KVTransport("P", r, _config(tp, paths, tls)) for r in range(tp)]
    for t in ts:
        t.register_regions([prefill_blocks(t.rank, n_blocks, block_bytes)], layout_tag="softroce")
    descs = [_wait_file(rdv / f"D.rank{r}.desc", CONNECT_BUDGET_S) for r in range(tp)]
    if tp > 1:  # TP rank i talks to rank i only: the transport refuses rank 0 → rank 1 before any byte moves
        try:
            ts[0].connect(descs[1])
            _emit(role="P", event="cross_rank", refused=False)
        except RankMismatchError as exc:
            _emit(role="P", event="cross_rank", refused=True, error=str(exc))
    peers = [t.connect(descs[t.rank]) for t in ts]
    import ucxx

    from .ucx_verbs import mapped_ucx_libraries

    _publish(rdv / P_CONNECTED, b"1")
    _emit(role="P", event="connected", paths=sorted(peers[0].links), ucx_version=list(ucxx.get_ucx_version()),
          ucx_libraries=mapped_ucx_libraries())
    ok_all = True
    for m in moves:
        before = _counters()
        _emit(role="P", event="pushing", tid=m.tid)
        res = ts[m.rank].push(peers[m.rank], m.tid, m.path, _copies(m, block_bytes), deadline_s=deadline_s).result()
        after = _counters()
        delta = {d: [after[d][i] - before[d][i] for i in (0, 1)] for d in after}
        ok_all &= res.ok
        _emit(role="P", tid=m.tid, ok=res.ok, bytes=res.bytes, seconds=res.seconds, path=res.path,
              error=res.error, counters=delta)
        if res.ok:  # D has its bytes; let it check and report them before the next move (which may kill it)
            try:
                _wait_file(rdv / f"D.{m.tid}.reported", REPORT_BUDGET_S)
            except TimeoutError as exc:
                _emit(role="P", event="no_report", tid=m.tid, error=str(exc))
    _publish(rdv / P_DONE, b"1")
    for t in ts:
        t.close()
    return 0 if ok_all else 1


# ---------------------------------------------------------------------------------------------- driver


@dataclass
class PairRun:
    p: list[dict] = field(default_factory=list)  # P's JSON lines
    d: list[dict] = field(default_factory=list)  # D's JSON lines
    p_exit: int | None = None
    d_exit: int | None = None  # None: D was killed by the driver
    p_log: str = ""
    d_log: str = ""
    wall_seconds: float = 0.0

    def p_result(self, tid: str) -> dict:
        for r in self.p:
            if r.get("tid") == tid and "ok" in r:
                return r
        raise KeyError(f"P reported nothing for {tid}; log:\n{self.p_log}")

    def d_result(self, tid: str) -> dict:
        for r in self.d:
            if r.get("tid") == tid:
                return r
        raise KeyError(f"D reported nothing for {tid}; log:\n{self.d_log}")


def _json_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def run_pair(rdv: Path, moves: list[Move], *, ucx_env: dict[str, str], n_blocks: int, block_bytes: int,
             tp: int = 1, paths: dict[str, str] | None = None, tls: str = VERBS_TLS, deadline_s: float = 120.0,
             kill_d_on: str | None = None, kill_after_s: float = 1.0,
             ucx_defaults: dict[str, str] | None = RXE_UCX_DEFAULTS) -> PairRun:
    """Start D and P as two processes; with `kill_d_on=tid`, SIGKILL D `kill_after_s` after P starts
    pushing that transfer."""
    rdv.mkdir(parents=True, exist_ok=True)
    for stale in [*rdv.glob("D.*"), rdv / P_CONNECTED, rdv / P_DONE]:  # from an earlier run here
        stale.unlink(missing_ok=True)
    spec = json.dumps([m.to_json() for m in moves])
    common = ["--rendezvous", str(rdv), "--tp", str(tp), "--blocks", str(n_blocks), "--block-bytes",
              str(block_bytes), "--paths", json.dumps(paths or DEFAULT_PATHS), "--tls", tls,
              "--deadline", str(deadline_s), "--moves", spec]
    env = {**os.environ, **ucx_env, "UCX_WARN_UNUSED_ENV_VARS": "n"}
    if ucx_defaults is not None:
        env[UCX_DEFAULTS_ENV] = json.dumps(ucx_defaults)
    mod = [sys.executable, "-m", "kvlane.integration.softroce.kv_pair"]
    t0 = time.monotonic()
    d = subprocess.Popen([*mod, "D", *common], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    p = subprocess.Popen([*mod, "P", *common], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert p.stdout is not None
    run = PairRun()
    p_lines: list[str] = []
    killed = False
    budget = 600 + deadline_s * len(moves)
    try:
        for line in p.stdout:
            p_lines.append(line)
            if kill_d_on and not killed and f'"event": "pushing", "tid": "{kill_d_on}"' in line:
                time.sleep(kill_after_s)
                d.send_signal(signal.SIGKILL)
                killed = True
        run.p_exit = p.wait(timeout=budget)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    try:
        d_out, _ = d.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        d.kill()
        d_out, _ = d.communicate()
    run.d_exit = None if killed else d.returncode
    run.p_log, run.d_log = "".join(p_lines), d_out
    (rdv / "P.log").write_text(run.p_log)
    (rdv / "D.log").write_text(run.d_log)
    run.p, run.d = _json_lines(run.p_log), _json_lines(d_out)
    run.wall_seconds = time.monotonic() - t0
    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("role", choices=["P", "D"])
    ap.add_argument("--rendezvous", type=Path, required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--blocks", type=int, required=True)
    ap.add_argument("--block-bytes", type=int, required=True)
    ap.add_argument("--paths", default=json.dumps(DEFAULT_PATHS), help="JSON {path name: UCX device}")
    ap.add_argument("--tls", default=VERBS_TLS)
    ap.add_argument("--deadline", type=float, default=120.0)
    ap.add_argument("--moves", required=True, help="JSON list of moves")
    a = ap.parse_args(argv)
    moves = [Move.from_json(x) for x in json.loads(a.moves)]
    paths = {str(k): str(v) for k, v in json.loads(a.paths).items()}
    fn = role_p if a.role == "P" else role_d
    rc = fn(a.rendezvous, a.tp, a.blocks, a.block_bytes, moves, paths, a.tls, a.deadline)
    # Reports are printed; skip interpreter/UCX teardown, which can block on a dead peer.
    sys.stdout.flush()
    os._exit(rc)


if __name__ == "__main__":
    sys.exit(main())
