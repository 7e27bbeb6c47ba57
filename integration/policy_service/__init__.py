"""kvlane's policy service: the pure `kvlane.policy` Policy behind a framed-msgpack TCP protocol (plus the
connector rendezvous and per-rank transport descriptors), and its clients. The server runs in its own
process (`kvlane policy serve`); clients run in routers and connectors. See docs/policy-service.md.
"""

from .client import EmbeddedPolicy, PolicyApi, PolicyClient, SyncPolicyClient, parse_address
from .protocol import (
    OPS,
    AnnounceTimeout,
    AuthFailed,
    BadRequest,
    Busy,
    CallTimeout,
    ConnectionLost,
    FrameTimeout,
    FrameTooLarge,
    PayloadTooLarge,
    ServiceError,
    UnknownOp,
    load_secret,
)
from .server import PolicyServer
from .service import PolicyService, ServiceMetrics

__all__ = [
    "OPS",
    "AnnounceTimeout",
    "AuthFailed",
    "BadRequest",
    "Busy",
    "CallTimeout",
    "ConnectionLost",
    "FrameTimeout",
    "FrameTooLarge",
    "EmbeddedPolicy",
    "PayloadTooLarge",
    "PolicyApi",
    "PolicyClient",
    "PolicyServer",
    "PolicyService",
    "ServiceError",
    "ServiceMetrics",
    "SyncPolicyClient",
    "UnknownOp",
    "load_secret",
    "parse_address",
]
