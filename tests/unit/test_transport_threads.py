"""TransportConfig.thread_cpus: where the transport's own threads run. A vLLM CPU worker pins its main thread
to one core (VLLM_CPU_OMP_THREADS_BIND); every thread it starts inherits that core, and with P and D
sharing the cores UCX handshakes starved there (docs/transport.md, "Threads and CPU affinity").
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np
import pytest
from kvlane.transport import KVTransport, TransportConfig
from pydantic import ValidationError

CPUS = sorted(os.sched_getaffinity(0))
needs_two = pytest.mark.skipif(len(CPUS) < 2, reason="needs 2 CPUs to tell a pinned thread from a free one")


def _tasks() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


def _in_pinned_thread(cpu: int, cfg: TransportConfig) -> dict[str, Any]:
    """Build a KVTransport from a thread pinned to ``cpu`` (like vLLM's worker main thread); report the
    affinity of that thread and of every thread the construction started, then close it."""
    out: dict[str, Any] = {}

    def run() -> None:
        os.sched_setaffinity(0, {cpu})
        before = _tasks()
        try:
            t = KVTransport("E", 0, cfg)
        except Exception as exc:
            out["error"] = exc
            return
        try:
            t.register_regions([np.zeros((4, 64), np.uint8)])
            t.descriptor()
            out["new"] = {tid: frozenset(os.sched_getaffinity(tid)) for tid in _tasks() - before}
            out["caller"] = frozenset(os.sched_getaffinity(0))
            out["loop"] = frozenset(os.sched_getaffinity(t._thread.native_id))
        finally:
            t.close()

    th = threading.Thread(target=run)
    th.start()
    th.join(60)
    assert not th.is_alive(), "KVTransport construction/close hung"
    return out


def test_thread_cpus_validated() -> None:
    with pytest.raises(ValidationError, match="thread_cpus must be a non-empty set"):
        TransportConfig(thread_cpus=frozenset())
    with pytest.raises(ValidationError, match="thread_cpus must be a non-empty set"):
        TransportConfig(thread_cpus=frozenset({-1}))
    assert TransportConfig(thread_cpus=[0, 0, 1]).thread_cpus == frozenset({0, 1})


def test_thread_cpus_nowhere_allowed_is_a_clear_error() -> None:
    missing = max(os.cpu_count() or 1, max(CPUS)) + 64
    out = _in_pinned_thread(CPUS[0], TransportConfig(backend="tcp", thread_cpus=frozenset({missing})))
    err = out.get("error")
    assert isinstance(err, ValueError), out
    assert f"thread_cpus [{missing}]" in str(err) and "allowed here" in str(err)


@needs_two
def test_tcp_loop_thread_inherits_without_thread_cpus_and_moves_with_it() -> None:
    pinned, free = CPUS[0], frozenset(CPUS)
    out = _in_pinned_thread(pinned, TransportConfig(backend="tcp"))
    assert out["loop"] == {pinned} and out["caller"] == {pinned}  # the bug's precondition: inherited
    out = _in_pinned_thread(pinned, TransportConfig(backend="tcp", thread_cpus=free))
    assert out["loop"] == free
    assert out["caller"] == {pinned}  # the caller's own pinning is left alone
    assert out["new"] and all(cpus == free for cpus in out["new"].values()), out["new"]


@needs_two
@pytest.mark.ucx
def test_ucx_progress_and_notifier_threads_follow_thread_cpus() -> None:
    pytest.importorskip("ucxx")
    pinned, free = CPUS[0], frozenset(CPUS)
    # two paths: each UCX context starts a progress thread (C++) and a notifier thread (Python)
    base = TransportConfig(backend="ucx")
    out = _in_pinned_thread(pinned, base)
    assert len(out["new"]) >= 5, out["new"]  # loop + 2 x (progress, notifier)
    assert all(cpus == {pinned} for cpus in out["new"].values()), out["new"]
    out = _in_pinned_thread(pinned, base.model_copy(update={"thread_cpus": free}))
    assert len(out["new"]) >= 5, out["new"]
    assert all(cpus == free for cpus in out["new"].values()), out["new"]
    assert out["caller"] == {pinned}
