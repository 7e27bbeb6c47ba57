"""The soft-RoCE scenario driver (`kv_pair`: kvlane.transport between a P and a D process) on the host
over UCX/TCP on loopback: the same moves, checks and kill the guest runs over rxe, in seconds, no VM."""

from __future__ import annotations

from pathlib import Path

import pytest
from kvlane.integration.softroce.kv_pair import Move, run_pair

pytest.importorskip("ucxx")
pytestmark = pytest.mark.ucx

LO = {"path1": "lo", "path2": "lo"}
BLOCK = 64 << 10


def test_rank_to_rank_moves_with_checksums_and_the_delta_turn_moves_only_new_blocks(tmp_path: Path) -> None:
    moves = [Move("turn1", "path1", (0, 1, 2, 3), (0, 1, 2, 3), 0), Move("turn2", "path2", (4, 5), (4, 5), 0),
             Move("rank1", "path2", (0, 1), (6, 7), 1)]
    r = run_pair(tmp_path, moves, ucx_env={}, n_blocks=8, block_bytes=BLOCK, tp=2, paths=LO, tls="tcp",
                 deadline_s=30)
    assert (r.p_exit, r.d_exit) == (0, 0), r.p_log + r.d_log
    assert next(e for e in r.p if e.get("event") == "cross_rank")["refused"] is True
    got = [(m.tid, r.p_result(m.tid)["bytes"], r.d_result(m.tid)["bad_blocks"], r.p_result(m.tid)["path"])
           for m in moves]
    assert got == [("turn1", 4 * BLOCK, [], "path1"), ("turn2", 2 * BLOCK, [], "path2"), ("rank1", 2 * BLOCK, [], "path2")]


def test_d_killed_mid_push_fails_p_within_the_deadline(tmp_path: Path) -> None:
    big = Move("big", "path1", tuple(range(32)), tuple(range(32)))
    r = run_pair(tmp_path, [big], ucx_env={}, n_blocks=32, block_bytes=2 << 20, paths=LO, tls="tcp",
                 deadline_s=20, kill_d_on="big", kill_after_s=0.0)
    p = r.p_result("big")
    assert p["ok"] is False and p["error"] and p["seconds"] <= 20
    assert r.p_exit == 1 and r.d_exit is None
