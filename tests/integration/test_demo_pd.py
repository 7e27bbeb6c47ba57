"""The 1P1D demo end to end (real vLLM on CPU, minutes): policy service, P and D with KVLaneConnector, the
router; every answer through the router equals the single engine's greedy output token for token, each
request took exactly one lease that was released, and the session's second turn stayed on its home D."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from kvlane.integration.demo import DemoOptions, run_pd_demo  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_demo_pd_matches_single_engine_through_the_router(tmp_path):
    lines: list[str] = []
    result = run_pd_demo(DemoOptions(log_dir=tmp_path / "logs", max_tokens=16), say=lines.append)
    assert result.reference is not None
    assert [a.label for a in result.answers] == [r.label for r in result.reference]
    for ans, ref in zip(result.answers, result.reference, strict=True):
        assert ans.token_ids is not None and len(ans.token_ids) == 16, ans
        assert ans.token_ids == ref.token_ids, (ans.label, ans.text, ref.text)
        assert ans.pair.startswith("p=prefill-0; d=decode-0; score=")
    turn2 = next(a for a in result.answers if a.label == "session turn 2")
    assert "sticky=1" in turn2.pair
    counters = result.snapshot["counters"]
    n = len(result.answers)
    assert counters["decisions"] == n and counters["sticky"] == 1
    assert counters["grants_reserved"] + counters["grants_best_effort"] == n
    assert counters["releases"] == n and counters["expired"] == 0
    assert result.snapshot["leases"] == []
    assert lines[-1] == "all processes stopped."
