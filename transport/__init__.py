"""kvlane.transport: moves KV bytes between registered memory of two engine TP ranks (UCX or TCP).

Used from the vLLM worker process through `KVTransport`; it never decides pairs, paths or credits.
"""

from .config import HeteroTP, PathConfig, TransportConfig
from .core import KVTransport, PeerHandle, RankMismatchError
from .ranks import BlockShape, HeadRoute, block_copies, head_routes
from .types import (
    AuthError,
    BlockCopy,
    HandshakeTimeout,
    LayoutMismatchError,
    PeerError,
    TransferResult,
    TransportError,
    coalesce,
)
from .wire import WireError

__all__ = [
    "AuthError", "BlockCopy", "BlockShape", "HandshakeTimeout", "HeadRoute", "HeteroTP", "KVTransport", "LayoutMismatchError", "PathConfig",
    "PeerError", "PeerHandle", "RankMismatchError", "TransferResult", "TransportConfig", "TransportError",
    "WireError", "block_copies", "coalesce", "head_routes",
]
