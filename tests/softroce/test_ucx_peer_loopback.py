"""The soft-RoCE block mover (`ucx_peer`) on the host over UCX/TCP on loopback: the same protocol the guest
tests run over rxe (checksums, delta, peer death), checked here in seconds without a VM."""

from __future__ import annotations

from pathlib import Path

import pytest
from kvlane.integration.softroce.ucx_peer import Turn, run_pair

pytest.importorskip("ucxx")
pytestmark = pytest.mark.ucx

TCP_ONLY = {"UCX_WARN_UNUSED_ENV_VARS": "n"}


def test_blocks_arrive_with_checksums_and_the_second_turn_moves_only_the_delta(tmp_path: Path) -> None:
    r = run_pair(tmp_path, device="lo", tls="tcp", ucx_env=TCP_ONLY, n_blocks=12, block_bytes=64 << 10,
                 turns=[Turn("s1", 8), Turn("s1", 12), Turn("s2", 3)], deadline_s=60)
    assert r.sender.ok, r.sender_log + r.receiver_log
    assert (r.sender_exit, r.receiver_exit) == (0, 0)
    moved = [(t["session"], t["offered"], t["moved_blocks"], t["bytes"], t["bad"]) for t in r.sender.turns]
    # s1: 8 new, then 12 offered of which 8 are held → 4 move; s2 is a new session → all 3 move.
    assert moved == [("s1", 8, 8, 8 * 65536, []), ("s1", 12, 4, 4 * 65536, []), ("s2", 3, 3, 3 * 65536, [])]


def test_receiver_killed_mid_transfer_fails_the_sender_within_its_deadline(tmp_path: Path) -> None:
    deadline = 30.0
    r = run_pair(tmp_path, device="lo", tls="tcp", ucx_env=TCP_ONLY, n_blocks=64, block_bytes=4 << 20,
                 turns=[Turn("s1", 64)], deadline_s=deadline, kill_receiver_after_s=0.0)
    assert not r.sender.ok and r.sender_exit == 1
    assert r.receiver_exit is None  # killed by the driver
    assert r.sender.error is not None and ("Reset" in r.sender.error or "Timeout" in r.sender.error)
    assert r.sender.seconds <= deadline
