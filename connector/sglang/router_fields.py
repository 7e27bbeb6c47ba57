"""What a P/D router needs to front SGLang engines that use the kvlane backend: SGLang's per-request
bootstrap fields (host, port, room), derived from the EngineInfo the engines register with the policy.

Pure functions for the router process (kvlane's router or any other); no SGLang import, no sockets.
SGLang's PD protocol: the router sends the same request body to the prefill and to the decode engine, both
carrying `bootstrap_host`/`bootstrap_port` (the prefill's bootstrap server) and one random `bootstrap_room`;
the client gets the decode engine's response. kvlane turns the room into the transfer id.
"""

from __future__ import annotations

import secrets
from typing import Any

from kvlane.policy.types import EngineInfo

from .wire import transfer_id_for_room

__all__ = ["bootstrap_fields", "is_sglang_engine", "new_bootstrap_room", "sglang_pd_bodies", "transfer_id_for_room"]

#: EngineInfo.endpoints keys the kvlane SGLang backend registers (besides ENGINE_KIND = "sglang").
BOOTSTRAP = "sglang_bootstrap"


def is_sglang_engine(info: EngineInfo) -> bool:
    return info.kind == "sglang"


def new_bootstrap_room() -> int:
    """A fresh room (SGLang's routers draw a random 63-bit integer per request)."""
    return secrets.randbelow(2**63)


def bootstrap_fields(prefill: EngineInfo, room: int) -> dict[str, Any]:
    """The three fields both halves of one request carry; ValueError if `prefill` is no SGLang prefill."""
    addr = prefill.endpoints.get(BOOTSTRAP)
    if prefill.role.value != "prefill" or not addr:
        raise ValueError(f"engine {prefill.engine_id!r} is not an SGLang prefill engine with a bootstrap endpoint "
                         f"(endpoints {sorted(prefill.endpoints)})")
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"engine {prefill.engine_id!r}: bootstrap endpoint {addr!r} is not HOST:PORT")
    transfer_id_for_room(room)  # validates the room
    return {"bootstrap_host": host.strip("[]"), "bootstrap_port": int(port), "bootstrap_room": room}


def sglang_pd_bodies(body: dict[str, Any], prefill: EngineInfo, decode: EngineInfo,
                     room: int | None = None) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(prefill body, decode body, kvlane transfer id) for one OpenAI-style request routed to an SGLang pair.
    Both bodies are the client's body plus the bootstrap fields; the prefill's is not streamed (SGLang's
    prefill caps its own output at one token and the router only waits for it). Bootstrap fields the client
    set itself are overwritten, so a client cannot steer the transfer."""
    if not is_sglang_engine(decode) or decode.role.value != "decode":
        raise ValueError(f"engine {decode.engine_id!r} is not an SGLang decode engine")
    room = new_bootstrap_room() if room is None else room
    fields = bootstrap_fields(prefill, room)
    p_body = {k: v for k, v in body.items() if k != "stream_options"}
    return {**p_body, **fields, "stream": False}, {**body, **fields}, transfer_id_for_room(room)
