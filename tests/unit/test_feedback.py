"""Per-path EWMA feedback: measurements replace the static estimate, failures penalise, hottest ranks."""

from __future__ import annotations

import pytest
from kvlane.policy.config import FeedbackConfig
from kvlane.policy.feedback import PathFeedback, path_key

GB = 10**9


def test_unmeasured_path_uses_static_bandwidth():
    fb = PathFeedback(FeedbackConfig())
    key = path_key("zcube-path1", ("a", "b"))
    assert fb.gbps(key, 400.0) == 400.0


def test_ewma_of_bandwidth_and_latency():
    fb = PathFeedback(FeedbackConfig(ewma_alpha=0.5))
    key = path_key("zcube-path1", ["a", "b"])
    fb.observe(key, 400.0, nbytes=GB, seconds=0.08, ok=True, now=1.0)  # 100 Gbps
    assert fb.gbps(key, 400.0) == pytest.approx(100.0)
    est = fb.observe(key, 400.0, nbytes=GB, seconds=0.04, ok=True, now=2.0)  # 200 Gbps
    assert est.bw_gbps == pytest.approx(150.0)
    assert est.latency_s == pytest.approx(0.06)
    assert est.slowdown == pytest.approx(400 / 150)
    assert (est.samples, est.updated_at) == (2, 2.0)


def test_small_transfers_update_latency_only():
    fb = PathFeedback(FeedbackConfig(min_sample_bytes=1 << 20))
    key = path_key("rail0", ("x",))
    est = fb.observe(key, 100.0, nbytes=4096, seconds=0.001, ok=True, now=0.0)
    assert est.bw_gbps is None and est.latency_s == pytest.approx(0.001)
    assert fb.gbps(key, 100.0) == 100.0


def test_failures_count_and_penalise():
    fb = PathFeedback(FeedbackConfig(ewma_alpha=0.5, failure_bw_factor=0.5))
    key = path_key("p", ("l",))
    est = fb.observe(key, 100.0, nbytes=0, seconds=1.0, ok=False, now=0.0)
    # sample = 0.5 × 100; EWMA = 0.5·100 + 0.5·50 = 75
    assert est.failures == 1 and est.bw_gbps == pytest.approx(75.0)
    fb.observe(key, 100.0, nbytes=0, seconds=1.0, ok=False, now=1.0)
    assert fb.gbps(key, 100.0) == pytest.approx(0.5 * 75 + 0.5 * 37.5)


def test_local_paths_are_keyed_by_their_nics():
    assert path_key("local", (), "n0", "n1") != path_key("local", (), "n2", "n3")


def test_hottest_by_load_and_slowdown():
    fb = PathFeedback(FeedbackConfig(ewma_alpha=1.0))
    fast, slow = path_key("p1", ("a", "b")), path_key("p2", ("c", "d"))
    fb.observe(fast, 100.0, nbytes=GB, seconds=0.08, ok=True, now=0.0)  # 100 Gbps: not slow
    fb.observe(slow, 100.0, nbytes=GB, seconds=0.32, ok=True, now=0.0)  # 25 Gbps: 4× slow
    hot = fb.hottest(5, {"a": 0.2, "c": 0.9, "z": 0.0})
    assert [x["link"] for x in hot["links_by_load"]] == ["c", "a"]
    assert [(x["path"], x["slowdown"]) for x in hot["paths_by_slowdown"]] == [("p2", 4.0)]


def test_bounded_number_of_paths():
    fb = PathFeedback(FeedbackConfig(max_paths=16))
    for i in range(20):
        fb.observe(path_key("p", (f"l{i}",)), 10.0, nbytes=1 << 20, seconds=0.01, ok=True, now=float(i))
    assert len(fb) == 16 and fb.get(path_key("p", ("l0",))) is None
