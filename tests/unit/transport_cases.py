"""What the kvlane.transport tests share: the backends each runs on (ucx only where ucxx imports), the path
each backend's tests use, and the small fp16 block geometry of their regions."""

from __future__ import annotations

import importlib.util

import pytest
from kvlane.transport import BlockShape

HAS_UCXX = importlib.util.find_spec("ucxx") is not None
BACKENDS = [
    pytest.param("tcp", id="tcp"),
    pytest.param("ucx", id="ucx", marks=[pytest.mark.ucx,
                                        pytest.mark.skipif(not HAS_UCXX, reason="ucxx not importable")]),
]
PATH = {"tcp": "tcp", "ucx": "shm"}
BLOCK = [2, 4, 16]  # [kv_heads, block_size, 2*head_size] fp16 → 256-byte blocks
SHAPE = BlockShape(kv_heads=2, block_size=4, head_size=8, itemsize=2)
