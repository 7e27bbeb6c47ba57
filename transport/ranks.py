"""TP rank mapping between a prefill (P) and a decode (D) engine: which KV-head slice of which P rank
lands in which D rank, and at which byte offsets inside one KV block. Pure arithmetic, run by the
connector/transport in the worker process; it never moves bytes and never decides a pairing.

Block layout (vLLM CPU backend, per layer, per block): ``[kv_heads, block_size, 2 * head_size]``,
C-contiguous, so the heads of one rank are the outermost axis and any run of whole heads is one
contiguous byte range of ``n_heads * block_size * 2 * head_size * itemsize`` bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from .types import BlockCopy, coalesce


class RankMismatchError(ValueError):
    """A transfer between TP ranks that the configured mapping does not allow."""


@dataclass(frozen=True)
class HeadRoute:
    """P rank ``p_rank`` sends its local heads ``[p_head, p_head + n_heads)`` to D rank ``d_rank``,
    which stores them as its local heads ``[d_head, d_head + n_heads)``."""

    p_rank: int
    d_rank: int
    p_head: int
    d_head: int
    n_heads: int


@dataclass(frozen=True)
class BlockShape:
    """One rank's block geometry: ``[kv_heads, block_size, 2 * head_size]`` of ``itemsize``-byte items."""

    kv_heads: int
    block_size: int
    head_size: int
    itemsize: int

    def __post_init__(self) -> None:
        for name in ("kv_heads", "block_size", "head_size", "itemsize"):
            if getattr(self, name) <= 0:
                raise ValueError(f"BlockShape.{name} must be positive, got {getattr(self, name)}")

    @property
    def head_bytes(self) -> int:
        """Bytes of one KV head inside one block (K and V halves together)."""
        return self.block_size * 2 * self.head_size * self.itemsize

    @property
    def block_bytes(self) -> int:
        return self.kv_heads * self.head_bytes


def _check_tp(p_tp: int, d_tp: int, total_kv_heads: int) -> None:
    if p_tp <= 0 or d_tp <= 0:
        raise ValueError(f"TP sizes must be positive, got p_tp={p_tp}, d_tp={d_tp}")
    if max(p_tp, d_tp) % min(p_tp, d_tp) != 0:
        raise ValueError(f"heterogeneous TP needs one size to divide the other, got p_tp={p_tp}, d_tp={d_tp}")
    for tp, side in ((p_tp, "P"), (d_tp, "D")):
        if total_kv_heads % tp != 0:
            raise ValueError(
                f"{total_kv_heads} KV heads do not split evenly over {side} TP={tp} "
                "(replicated KV heads are not supported by the head mapping)"
            )


def head_routes(p_tp: int, d_tp: int, total_kv_heads: int) -> list[HeadRoute]:
    """Every (P rank → D rank) head slice for a model with ``total_kv_heads`` KV heads.

    Rank r of a TP group of size t holds global heads ``[r*H/t, (r+1)*H/t)``. The routes are the
    non-empty intersections of P and D head ranges, ordered by (d_rank, p_rank). For p_tp == d_tp
    this is the identity (rank i → rank i, all heads).
    """
    _check_tp(p_tp, d_tp, total_kv_heads)
    hp, hd = total_kv_heads // p_tp, total_kv_heads // d_tp
    routes = []
    for d in range(d_tp):
        d_lo, d_hi = d * hd, (d + 1) * hd
        for p in range(p_tp):
            lo, hi = max(d_lo, p * hp), min(d_hi, (p + 1) * hp)
            if lo < hi:
                routes.append(HeadRoute(p_rank=p, d_rank=d, p_head=lo - p * hp, d_head=lo - d_lo, n_heads=hi - lo))
    return routes


def routes_between(p_tp: int, d_tp: int, total_kv_heads: int, p_rank: int, d_rank: int) -> list[HeadRoute]:
    """The routes from one P rank to one D rank; raises RankMismatchError when they share no head."""
    for rank, tp, side in ((p_rank, p_tp, "P"), (d_rank, d_tp, "D")):
        if not 0 <= rank < tp:
            raise RankMismatchError(f"{side} rank {rank} is outside TP size {tp}")
    found = [r for r in head_routes(p_tp, d_tp, total_kv_heads) if r.p_rank == p_rank and r.d_rank == d_rank]
    if not found:
        raise RankMismatchError(
            f"P rank {p_rank} (TP={p_tp}) holds no KV head of D rank {d_rank} (TP={d_tp}); "
            f"D rank {d_rank} receives from P ranks {sorted(peer_ranks(p_tp, d_tp, total_kv_heads, d_rank=d_rank))}"
        )
    return found


def peer_ranks(p_tp: int, d_tp: int, total_kv_heads: int, *, p_rank: int | None = None,
               d_rank: int | None = None) -> set[int]:
    """D ranks a P rank sends to (give ``p_rank``) or P ranks a D rank receives from (give ``d_rank``)."""
    if (p_rank is None) == (d_rank is None):
        raise ValueError("give exactly one of p_rank, d_rank")
    routes = head_routes(p_tp, d_tp, total_kv_heads)
    if p_rank is not None:
        return {r.d_rank for r in routes if r.p_rank == p_rank}
    return {r.p_rank for r in routes if r.d_rank == d_rank}


def route_transfer_id(request_id: str, route: HeadRoute) -> str:
    """Transfer id of one route of a request. Transfer ids are unique per receiving rank and per
    sending rank, and with heterogeneous TP one request fans out (or in) over several rank pairs."""
    return f"{request_id}.p{route.p_rank}d{route.d_rank}"


def route_segment(route: HeadRoute, p_shape: BlockShape, d_shape: BlockShape) -> tuple[int, int, int]:
    """(src offset in a P block, dst offset in a D block, nbytes) of one route inside one block."""
    if (p_shape.block_size, p_shape.head_size, p_shape.itemsize) != (d_shape.block_size, d_shape.head_size,
                                                                     d_shape.itemsize):
        raise ValueError(f"P and D blocks differ beyond their head count: {p_shape} vs {d_shape}")
    if route.p_head + route.n_heads > p_shape.kv_heads or route.d_head + route.n_heads > d_shape.kv_heads:
        raise ValueError(f"{route} does not fit P {p_shape.kv_heads} / D {d_shape.kv_heads} local heads")
    hb = p_shape.head_bytes
    return route.p_head * hb, route.d_head * hb, route.n_heads * hb


def block_copies(
    region: int,
    src_blocks: list[int],
    dst_blocks: list[int],
    p_shape: BlockShape,
    d_shape: BlockShape | None = None,
    route: HeadRoute | None = None,
) -> list[BlockCopy]:
    """Byte copies that move ``src_blocks[i]`` of a P region into ``dst_blocks[i]`` of the D region.

    Without ``route`` (homogeneous TP) whole blocks move and contiguous runs are coalesced; with a
    route only that head slice of each block moves (contiguous whenever whole blocks do).
    """
    if len(src_blocks) != len(dst_blocks):
        raise ValueError(f"{len(src_blocks)} source blocks but {len(dst_blocks)} destination blocks")
    d_shape = d_shape or p_shape
    if route is None:
        if p_shape != d_shape:
            raise ValueError(f"whole-block copies need equal block shapes, got {p_shape} vs {d_shape}")
        s_off, d_off, n = 0, 0, p_shape.block_bytes
    else:
        s_off, d_off, n = route_segment(route, p_shape, d_shape)
    copies = [
        BlockCopy(region, s * p_shape.block_bytes + s_off, d * d_shape.block_bytes + d_off, n)
        for s, d in zip(src_blocks, dst_blocks, strict=True)
    ]
    return coalesce(copies)
