"""kvlane.connector.sglang: kvlane as an SGLang PD transfer backend (`--disaggregation-transfer-backend kvlane`).

A thin facade: the classes live in `conn.py` (scheduler processes) and `bootstrap.py` (SGLang's main
process), the plugin hook in `plugin.py`. Importing this package does not import SGLang; the classes load
on first access, so the CLI and router helpers work without SGLang installed.
"""

from __future__ import annotations

from typing import Any

from .plugin import BACKEND, register

__all__ = ["BACKEND", "KVLaneKVBootstrapServer", "KVLaneKVManager", "KVLaneKVReceiver", "KVLaneKVSender",
           "KVLaneTransferError", "register"]

_LAZY = {"KVLaneKVBootstrapServer", "KVLaneKVManager", "KVLaneKVReceiver", "KVLaneKVSender", "KVLaneTransferError"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import conn

        return getattr(conn, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
