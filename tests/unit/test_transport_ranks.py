"""kvlane.transport.ranks: heterogeneous TP head mapping, checked by splitting/merging real numpy KV
blocks with the computed byte copies and reassembling the original tensor."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from kvlane.transport.ranks import (
    BlockShape,
    HeadRoute,
    RankMismatchError,
    block_copies,
    head_routes,
    peer_ranks,
    routes_between,
)
from kvlane.transport.types import BlockCopy


def apply(copies: list[BlockCopy], src: np.ndarray, dst: np.ndarray) -> None:
    s, d = src.reshape(-1).view(np.uint8), dst.reshape(-1).view(np.uint8)
    for c in copies:
        d[c.dst_offset:c.dst_offset + c.nbytes] = s[c.src_offset:c.src_offset + c.nbytes]


def shard(full: np.ndarray, tp: int) -> list[np.ndarray]:
    """full: [blocks, H, block_size, 2*head]; rank r holds heads [r*H/tp, (r+1)*H/tp)."""
    h = full.shape[1] // tp
    return [np.ascontiguousarray(full[:, r * h:(r + 1) * h]) for r in range(tp)]


def test_identity_when_sizes_match() -> None:
    assert head_routes(4, 4, 8) == [HeadRoute(r, r, 0, 0, 2) for r in range(4)]


def test_d_larger_splits_heads_by_hand() -> None:
    # 8 heads, P TP=2 (4 heads each), D TP=4 (2 heads each): D rank 3 gets P rank 1's heads 2..3.
    assert routes_between(2, 4, 8, p_rank=1, d_rank=3) == [HeadRoute(1, 3, 2, 0, 2)]
    assert peer_ranks(2, 4, 8, p_rank=0) == {0, 1}


def test_p_larger_merges_heads_by_hand() -> None:
    # 8 heads, P TP=4 (2 each), D TP=2 (4 each): D rank 1 holds P rank 3's heads at local heads 2..3.
    assert routes_between(4, 2, 8, p_rank=3, d_rank=1) == [HeadRoute(3, 1, 0, 2, 2)]
    assert peer_ranks(4, 2, 8, d_rank=1) == {2, 3}


def test_segment_byte_offsets_by_hand() -> None:
    # P block [4 heads, 16 tokens, 2*8] fp16: one head = 16*16*2 = 512 bytes, block = 2048 bytes.
    p, d = BlockShape(4, 16, 8, 2), BlockShape(2, 16, 8, 2)
    route = routes_between(2, 4, 8, p_rank=0, d_rank=1)[0]
    assert block_copies(0, [3], [5], p, d, route) == [BlockCopy(0, 3 * 2048 + 1024, 5 * 1024, 1024)]


def test_unrelated_ranks_refused() -> None:
    with pytest.raises(RankMismatchError, match="holds no KV head"):
        routes_between(2, 4, 8, p_rank=0, d_rank=2)
    with pytest.raises(RankMismatchError, match="outside TP size"):
        routes_between(2, 4, 8, p_rank=2, d_rank=0)
    with pytest.raises(ValueError, match="divide"):
        head_routes(2, 3, 6)
    with pytest.raises(ValueError, match="replicated"):
        head_routes(1, 4, 2)


@pytest.mark.parametrize(("p_tp", "d_tp", "heads"), [
    (1, 1, 2), (2, 2, 4), (1, 2, 2), (1, 4, 4), (2, 4, 4), (2, 4, 8), (1, 8, 8),
    (2, 1, 2), (4, 1, 4), (4, 2, 4), (4, 2, 8), (8, 2, 8), (2, 8, 16),
])
def test_split_and_merge_reassemble_exactly(p_tp: int, d_tp: int, heads: int) -> None:
    rng = np.random.default_rng(p_tp * 100 + d_tp * 10 + heads)
    n_blocks, bs, hs = 6, 4, 3
    for dtype in (np.float16, np.float32):
        full = rng.standard_normal((n_blocks, heads, bs, 2 * hs)).astype(dtype)
        p_shards = shard(full, p_tp)
        d_blocks = 9  # D has more blocks; P block b lands in D block perm[b]
        perm = [7, 0, 3, 8, 1, 5]
        d_shards = [np.zeros((d_blocks, heads // d_tp, bs, 2 * hs), dtype) for _ in range(d_tp)]
        p_shape = BlockShape(heads // p_tp, bs, hs, np.dtype(dtype).itemsize)
        d_shape = BlockShape(heads // d_tp, bs, hs, np.dtype(dtype).itemsize)
        routes = head_routes(p_tp, d_tp, heads)
        # every (P head) is sent exactly once
        assert sum(r.n_heads for r in routes) == heads
        for r in routes:
            apply(block_copies(0, list(range(n_blocks)), perm, p_shape, d_shape, r),
                  p_shards[r.p_rank], d_shards[r.d_rank])
        gathered = np.concatenate(d_shards, axis=1)[perm]
        assert np.array_equal(gathered, full)
        untouched = [b for b in range(d_blocks) if b not in perm]
        assert all(not s[untouched].any() for s in d_shards)


def test_homogeneous_copies_coalesce_contiguous_runs() -> None:
    shape = BlockShape(2, 4, 2, 2)  # 64-byte blocks
    copies = block_copies(1, [0, 1, 2, 5, 6], [10, 11, 12, 3, 4], shape)
    assert copies == [BlockCopy(1, 0, 640, 192), BlockCopy(1, 320, 192, 128)]
    with pytest.raises(ValueError, match="equal block shapes"):
        block_copies(0, [0], [0], shape, BlockShape(1, 4, 2, 2))


def test_all_small_tp_pairs_cover_every_head_once() -> None:
    for p_tp, d_tp in itertools.product([1, 2, 4, 8], repeat=2):
        heads = 8
        routes = head_routes(p_tp, d_tp, heads)
        got = sorted((r.d_rank * (heads // d_tp) + r.d_head + k) for r in routes for k in range(r.n_heads))
        assert got == list(range(heads))
        src = sorted((r.p_rank * (heads // p_tp) + r.p_head + k) for r in routes for k in range(r.n_heads))
        assert src == list(range(heads))


def test_route_transfer_ids_are_distinct_per_rank_pair() -> None:
    from kvlane.transport.ranks import route_transfer_id

    ids = {route_transfer_id("req-7", r) for r in head_routes(4, 2, 8)}
    assert ids == {"req-7.p0d0", "req-7.p1d0", "req-7.p2d1", "req-7.p3d1"}
