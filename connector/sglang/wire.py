"""Names and payloads the kvlane SGLang backend puts on the policy service's announce board.

Imported by the SGLang scheduler processes (both roles) and by the router helpers; pure data, no sockets,
no SGLang import. Page lists travel run-length encoded (int64 start/length pairs) so a long prompt fits the
board's 64 KiB payload limit; everything read back is checked and refused with the field's name.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

ANNOUNCE_VERSION = 1
#: The board refuses payloads over 64 KiB; leave room for the other fields.
MAX_RUN_BYTES = 60 * 1024
_SAFE = re.compile(r"[^A-Za-z0-9_.\-]+")


def transfer_id_for_room(room: int) -> str:
    """SGLang's bootstrap_room (the router's per-request random id, shared by P and D) -> kvlane transfer id."""
    if not isinstance(room, int) or isinstance(room, bool) or not 0 <= room < 2**64:
        raise ValueError(f"bootstrap_room must be an integer in [0, 2**64), got {room!r}")
    return f"sglang-{room}"


def rank_key(tid: str, rank: int) -> str:
    return f"{tid}.r{rank}"


def lease_key(tid: str) -> str:
    return f"{tid}.lease"


def outcome_key(tid: str, rank: int) -> str:
    return f"{tid}.out.r{rank}"


def engine_id_for(role: str, server_args: Any) -> str:
    """Default policy-service name of an SGLang engine: `sglang-<role>-<host>-<port>`."""
    host = _SAFE.sub("-", str(getattr(server_args, "host", "127.0.0.1")))
    return f"sglang-{role}-{host}-{int(getattr(server_args, 'port', 30000))}"


def pages_to_runs(pages: np.ndarray) -> bytes:
    p = np.asarray(pages, dtype=np.int64).reshape(-1)
    if len(p) == 0:
        return b""
    if (p < 0).any():
        raise ValueError("page indices must be >= 0")
    breaks = np.flatnonzero(np.diff(p) != 1) + 1
    starts = np.concatenate(([0], breaks))
    lengths = np.diff(np.concatenate((starts, [len(p)])))
    runs = np.stack([p[starts], lengths], axis=1).astype("<i8").tobytes()
    if len(runs) > MAX_RUN_BYTES:
        raise ValueError(f"{len(starts)} separate page runs do not fit one announce (max {MAX_RUN_BYTES // 16}); "
                         "use a larger --page-size")
    return runs


def runs_to_pages(raw: bytes) -> np.ndarray:
    if not isinstance(raw, bytes) or len(raw) % 16 or len(raw) > MAX_RUN_BYTES:
        raise ValueError("pages: expected at most 60 KiB of int64 (start, length) pairs")
    runs = np.frombuffer(raw, dtype="<i8").reshape(-1, 2)
    if (runs[:, 0] < 0).any() or (runs[:, 1] <= 0).any():
        raise ValueError("pages: negative start or non-positive run length")
    if runs[:, 1].sum() > 1 << 24:
        raise ValueError("pages: more than 16M pages")
    return np.concatenate([np.arange(s, s + n, dtype=np.int64) for s, n in runs]) if len(runs) else np.zeros(0, np.int64)


def encode_announce(*, decode: str, rank: int, tp_size: int, page_size: int, pages: np.ndarray,
                    aux_index: int | None, decode_prefix_len: int) -> dict[str, Any]:
    """What decode rank `rank` posts under `rank_key(tid, rank)`: where the KV must land."""
    return {"v": ANNOUNCE_VERSION, "decode": decode, "rank": rank, "tp_size": tp_size, "page_size": page_size,
            "pages": pages_to_runs(pages), "aux_index": None if aux_index is None else int(aux_index),
            "decode_prefix_len": int(decode_prefix_len)}


def decode_announce(raw: Any, *, rank: int, tp_size: int, page_size: int) -> dict[str, Any]:
    """Check a decode announce against this prefill rank; the payload with `pages` as a list of ints, or
    `{"aborted": reason}`. ValueError naming the field otherwise."""
    if not isinstance(raw, dict) or raw.get("v") != ANNOUNCE_VERSION:
        raise ValueError(f"not a kvlane SGLang v{ANNOUNCE_VERSION} announce")
    if "aborted" in raw:
        return {"aborted": str(raw["aborted"])[:500]}
    for key, typ in (("decode", str), ("rank", int), ("tp_size", int), ("page_size", int),
                     ("decode_prefix_len", int)):
        if type(raw.get(key)) is not typ:
            raise ValueError(f"field {key!r} missing or not {typ.__name__}")
    if raw["rank"] != rank:
        raise ValueError(f"announce for rank {raw['rank']} read by rank {rank}")
    if raw["tp_size"] != tp_size:
        raise ValueError(f"decode TP={raw['tp_size']}, prefill TP={tp_size}: kvlane moves rank i -> rank i "
                         "and needs equal TP sizes")
    if raw["page_size"] != page_size:
        raise ValueError(f"decode page size {raw['page_size']} != prefill page size {page_size}")
    aux = raw.get("aux_index")
    if aux is not None and (type(aux) is not int or aux < 0):
        raise ValueError("field 'aux_index' must be a non-negative int or None")
    if raw["decode_prefix_len"] < 0:
        raise ValueError("field 'decode_prefix_len' must be >= 0")
    return {**raw, "pages": runs_to_pages(raw.get("pages", b"")).tolist()}
