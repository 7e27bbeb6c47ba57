"""Value types of kvlane.transport: byte copies, transfer results and the transport's errors.

Imported by both sides of a transfer (the vLLM worker process on P and on D); plain data only —
no sockets, no threads, no policy.
"""

from __future__ import annotations

from dataclasses import dataclass


class TransportError(RuntimeError):
    """Base of the errors `KVTransport` raises synchronously (bad input, refused peer)."""


class LayoutMismatchError(TransportError):
    """The peer's KV layout (dtype, block bytes, region count, tag) differs from ours."""


class PeerError(TransportError):
    """The peer is unreachable, refused the handshake, or its link broke."""


class HandshakeTimeout(PeerError):
    """The handshake got no answer within `TransportConfig.connect_timeout_s` (peer busy, gone, or a stalled
    link); unlike a refusal it is worth one more try while the caller's deadline allows."""


class AuthError(PeerError):
    """The handshake's shared-secret check failed: wrong or missing secret on one side, or a replayed answer."""


@dataclass(frozen=True)
class BlockCopy:
    """Copy ``nbytes`` from byte ``src_offset`` of the sender's region ``region`` to byte ``dst_offset``
    of the receiver's region ``region``. Build them per block with `kvlane.transport.ranks.block_copies`."""

    region: int
    src_offset: int
    dst_offset: int
    nbytes: int

    def __post_init__(self) -> None:
        if self.region < 0 or self.src_offset < 0 or self.dst_offset < 0 or self.nbytes <= 0:
            raise ValueError(f"invalid {self}: region/offsets must be >= 0 and nbytes > 0")


@dataclass(frozen=True)
class TransferResult:
    transfer_id: str
    ok: bool
    bytes: int
    seconds: float
    path: str
    error: str | None = None
    #: Sender: seconds spent in each step that ran, in order ("handshake" only when a broken link was reopened,
    #: "arm": offer until the receiver's READY, "send": the data, "confirm": until the receiver's DONE).
    phases: tuple[tuple[str, float], ...] = ()


def coalesce(copies: list[BlockCopy]) -> list[BlockCopy]:
    """Merge copies that continue each other on both sides (same region, src and dst adjacent).

    Order is kept; only neighbours in the given order merge, so the result moves the same bytes to
    the same places in as few runs as the order allows.
    """
    out: list[BlockCopy] = []
    for c in copies:
        if out:
            last = out[-1]
            if (last.region == c.region and last.src_offset + last.nbytes == c.src_offset
                    and last.dst_offset + last.nbytes == c.dst_offset):
                out[-1] = BlockCopy(last.region, last.src_offset, last.dst_offset, last.nbytes + c.nbytes)
                continue
        out.append(c)
    return out


def dst_intervals(spans: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Normalise (region, dst_offset, nbytes) spans: sort, refuse overlaps, merge adjacent ones.

    Two lists of spans cover the same destination bytes iff their normal forms are equal.
    """
    out: list[tuple[int, int, int]] = []
    for region, off, n in sorted(spans):
        if out and out[-1][0] == region:
            r, o, m = out[-1]
            if off < o + m:
                raise ValueError(f"destination ranges overlap in region {region}: [{o}, {o + m}) and [{off}, {off + n})")
            if off == o + m:
                out[-1] = (r, o, m + n)
                continue
        out.append((region, off, n))
    return out
