"""The SGLang plugin entry point (`sglang.srt.plugins` group): makes `--disaggregation-transfer-backend
kvlane` valid and resolve to kvlane's classes, through SGLang's own hook registry (no fork, no file patch).

SGLang calls `register()` in every process it starts (main, schedulers, detokenizer) before serving.
It only registers; it never starts threads or opens sockets.
"""

from __future__ import annotations

import enum
import logging
from typing import Any

log = logging.getLogger("kvlane.sglang")

BACKEND = "kvlane"
UTILS = "sglang.srt.disaggregation.utils"

_registered = False


def extended_transfer_backend(original: type[enum.Enum]) -> type[enum.Enum]:
    """SGLang's closed TransferBackend enum plus KVLANE = "kvlane" (same names/values otherwise)."""
    if BACKEND in {m.value for m in original}:
        return original
    members = [(m.name, m.value) for m in original] + [("KVLANE", BACKEND)]
    return enum.Enum(original.__name__, members, module=original.__module__,  # type: ignore[return-value]
                     qualname=original.__qualname__)


def kv_classes() -> dict[str, Any]:
    """KVClassType value -> kvlane class (KVARGS stays SGLang's own container)."""
    from .conn import KVLaneKVBootstrapServer, KVLaneKVManager, KVLaneKVReceiver, KVLaneKVSender

    return {"manager": KVLaneKVManager, "sender": KVLaneKVSender, "receiver": KVLaneKVReceiver,
            "bootstrap_server": KVLaneKVBootstrapServer}


def _get_kv_class_hook(original_fn: Any, transfer_backend: Any, class_type: Any) -> Any:
    value = getattr(transfer_backend, "value", transfer_backend)
    ctype = getattr(class_type, "value", class_type)
    if value == BACKEND and ctype != "kvargs":
        return kv_classes().get(ctype)
    if isinstance(transfer_backend, enum.Enum):
        # a member of the pre-plugin enum (held since before the hook applied): map it by value
        import importlib

        transfer_backend = importlib.import_module(UTILS).TransferBackend(value)
    return original_fn(transfer_backend, class_type)


def register() -> None:
    """Entry point: extend the CLI choices and hook TransferBackend / get_kv_class (idempotent)."""
    global _registered
    if _registered:
        return
    from sglang.srt.arg_groups.choices import (
        DISAGG_TRANSFER_BACKEND_CHOICES,
        add_disagg_transfer_backend_choices,
    )
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if BACKEND not in DISAGG_TRANSFER_BACKEND_CHOICES:
        add_disagg_transfer_backend_choices([BACKEND])

    import importlib

    utils = importlib.import_module(UTILS)
    HookRegistry.register(f"{UTILS}.TransferBackend", extended_transfer_backend(utils.TransferBackend),
                          HookType.REPLACE)
    HookRegistry.register(f"{UTILS}.get_kv_class", _get_kv_class_hook, HookType.AROUND)
    _registered = True
    log.info("kvlane: registered SGLang transfer backend %r", BACKEND)
