"""In the guest: KV blocks move between two processes over UCX verbs on rxe (UCX_TLS=rc_verbs,ud_verbs:
no tcp, no shared memory), checksums verified; the chosen device's packet counters carry the transfer;
a second turn moves only the new blocks; a receiver killed mid-transfer fails the sender in time.

These use `ucx_peer` (a minimal mover over ucxx backed by nixl's verbs UCX), not kvlane.transport."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from kvlane.integration.softroce import packet_counters
from kvlane.integration.softroce.ucx_peer import Turn, run_pair

BLOCK = 64 << 10  # 16 RoCE MTUs per block


def _delta(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    return {d: (after[d][0] - before[d][0], after[d][1] - before[d][1]) for d in before}


def test_ucxx_maps_all_four_ucx_libraries_from_the_verbs_ucx(verbs_ucx_env: dict[str, str]) -> None:
    code = ("import ucxx; ucxx.init(); from kvlane.integration.softroce.ucx_verbs import mapped_ucx_libraries as m;"
            "print(ucxx.get_ucx_version()); print('\\n'.join(m()))")
    import os

    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **verbs_ucx_env}, capture_output=True,
                         text=True, check=True, timeout=180).stdout.splitlines()
    assert out[0] == "(1, 23, 0)"
    libs = out[1:]
    for name in ("libucs", "libuct", "libucp", "libucm"):
        assert [p for p in libs if Path(p).name.startswith(name + "-")], f"{name} not mapped: {libs}"
    assert all("nixl_cu12.libs" in p for p in libs), libs  # nothing from ucxx's own libucx wheel


@pytest.mark.parametrize(("device", "other"), [("rxe0", "rxe1"), ("rxe1", "rxe0")])
def test_blocks_move_over_the_chosen_device_only_and_the_second_turn_sends_the_delta(
        tmp_path: Path, verbs_ucx_env: dict[str, str], device: str, other: str) -> None:
    before = packet_counters()
    r = run_pair(tmp_path, device=f"{device}:1", ucx_env=verbs_ucx_env, n_blocks=8, block_bytes=BLOCK,
                 turns=[Turn("s1", 4), Turn("s1", 6)], deadline_s=240)
    moved = _delta(before, packet_counters())
    assert r.sender.ok, r.sender_log + r.receiver_log
    turns = [(t["offered"], t["moved_blocks"], t["bytes"], t["bad"]) for t in r.sender.turns]
    assert turns == [(4, 4, 4 * BLOCK, []), (6, 2, 2 * BLOCK, [])]  # turn 2: only blocks 4 and 5 move
    data_packets = 6 * BLOCK // 4096  # 96 packets of payload at RoCE MTU 4096, at least
    sent, rcvd = moved[device]
    assert sent >= data_packets and rcvd >= data_packets, moved
    assert max(moved[other]) <= 2, moved  # the other port stays quiet


def test_receiver_killed_mid_transfer_fails_the_sender_within_its_deadline(
        tmp_path: Path, verbs_ucx_env: dict[str, str]) -> None:
    deadline = 90.0
    r = run_pair(tmp_path, device="rxe0:1", ucx_env=verbs_ucx_env, n_blocks=32, block_bytes=1 << 20,
                 turns=[Turn("s1", 32)], deadline_s=deadline, kill_receiver_after_s=1.0)
    assert not r.sender.ok and r.sender_exit == 1, r.sender_log
    assert r.receiver_exit is None
    assert r.sender.error is not None
    assert r.sender.seconds <= deadline + 1
