"""The registered KV cache of one vLLM worker rank, as the connector sees it: one `[num_blocks, ...]` tensor
per layer, the layout fingerprint both ends must agree on, and the per-transfer result records the worker
reports. Runs in vLLM worker processes; moves no bytes itself (kvlane.transport does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class KVLayoutError(RuntimeError):
    """A KV cache layout the connector cannot move (the message says what and why)."""


def cpu_isa() -> str:
    """The CPU instruction set vLLM's CPU attention packed the pages for (pages differ between ISAs)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # older torch
        return "unknown"


class PagedLayers:
    """One rank's KV cache: every layer a contiguous `[num_blocks, ...]` tensor of one shape and dtype."""

    def __init__(self, layers: dict[str, torch.Tensor], block_size: int):
        if not layers:
            raise KVLayoutError("no KV cache tensors registered")
        self.names = sorted(layers)
        self.tensors = [layers[n] for n in self.names]
        shapes = {tuple(t.shape) for t in self.tensors}
        dtypes = {str(t.dtype) for t in self.tensors}
        devices = {str(t.device) for t in self.tensors}
        for name, t in zip(self.names, self.tensors, strict=True):
            if not t.is_contiguous():
                raise KVLayoutError(f"layer {name}: KV cache tensor {tuple(t.shape)} is not contiguous")
        if len(shapes) != 1 or len(dtypes) != 1 or len(devices) != 1:
            raise KVLayoutError(f"layers differ in shape/dtype/device: {sorted(shapes)} {sorted(dtypes)} "
                                f"{sorted(devices)}")
        shape = shapes.pop()
        self.device = devices.pop()
        self.num_blocks = shape[0]
        self.block_layer_bytes = self.tensors[0][0].numel() * self.tensors[0].element_size()
        self.block_bytes = self.block_layer_bytes * len(self.tensors)
        # Everything both ends must agree on for a byte copy of a block to mean the same KV. The page
        # packing of vLLM's CPU attention depends on the ISA; on GPUs it does not.
        isa = cpu_isa() if self.device == "cpu" else self.device.split(":")[0]
        self.fingerprint = (
            f"isa={isa}|dtype={dtypes.pop()}|block_size={block_size}|layers={len(self.tensors)}"
            f"|block_shape={'x'.join(str(d) for d in shape[1:])}"
        )

    def check_blocks(self, ids: list[int]) -> None:
        bad = [b for b in ids if not 0 <= b < self.num_blocks]
        if bad:
            raise KVLayoutError(f"block ids out of range [0, {self.num_blocks}): {bad[:5]}")

    def corrupt(self, ids: list[int]) -> None:
        """Flip every byte of blocks `ids` in every layer (XOR 0x5A): the `corrupt_kv` negative control."""
        self.check_blocks(ids)
        idx = torch.tensor(ids, dtype=torch.long, device=self.tensors[0].device)
        for t in self.tensors:
            raw = t.view(torch.uint8).view(t.shape[0], -1)
            raw[idx] = raw[idx] ^ 0x5A


@dataclass
class PushResult:
    ok: bool
    bytes: int
    seconds: float
    error: str | None = None
    path: str | None = None  # the transport path that carried it (the lease's unless the peer lacks it)
    phases: tuple[tuple[str, float], ...] = ()  # the transport's per-step seconds (TransferResult.phases)


@dataclass
class RecvResult:
    transfer_id: str
    ok: bool
    bytes: int = 0
    seconds: float = 0.0
    error: str | None = None
