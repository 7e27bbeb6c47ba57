"""Registered KV memory: turns numpy arrays / torch tensors (CPU or CUDA) into raw regions and byte
views of them, without copying and without `.numpy()`. Runs in the worker process that owns the KV
cache; it never frees or reallocates the memory it points to (it keeps the owner object alive).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Region:
    """One registered KV tensor: ``shape[0]`` is the number of blocks, the rest is one block."""

    owner: Any  # keeps the tensor alive while registered
    ptr: int
    nbytes: int
    device: str  # "cpu" or "cuda:<n>"
    dtype: str
    shape: tuple[int, ...]

    @property
    def num_blocks(self) -> int:
        return self.shape[0]

    @property
    def block_bytes(self) -> int:
        return self.nbytes // self.shape[0]

    @property
    def is_host(self) -> bool:
        return self.device == "cpu"

    def fingerprint(self) -> dict[str, Any]:
        """What must match between P and D (the block count may differ)."""
        return {"dtype": self.dtype, "block_shape": list(self.shape[1:]), "block_bytes": self.block_bytes}


def _contiguous(shape: tuple[int, ...], strides: tuple[int, ...] | None, itemsize: int) -> bool:
    if strides is None:
        return True
    expect = itemsize
    for dim, stride in zip(reversed(shape), reversed(strides), strict=True):
        if dim != 1 and stride != expect:
            return False
        expect *= dim
    return True


def as_region(x: Any) -> Region:
    """Describe ``x`` (torch tensor, object with ``__cuda_array_interface__`` or ``__array_interface__``)."""
    if hasattr(x, "data_ptr") and hasattr(x, "element_size") and hasattr(x, "device"):  # torch.Tensor
        if not x.is_contiguous():
            raise ValueError("KV region must be contiguous (torch tensor is not)")
        if x.dim() < 1 or x.shape[0] == 0:
            raise ValueError(f"KV region needs a leading block dimension, got shape {tuple(x.shape)}")
        dev = str(x.device)
        if dev not in ("cpu",) and not dev.startswith("cuda"):
            raise ValueError(f"KV region on unsupported device {dev}")
        if dev == "cuda":
            dev = f"cuda:{x.device.index or 0}"
        return Region(x, int(x.data_ptr()), int(x.numel() * x.element_size()), dev,
                      str(x.dtype).removeprefix("torch."), tuple(int(s) for s in x.shape))
    for attr, dev in (("__cuda_array_interface__", "cuda:0"), ("__array_interface__", "cpu")):
        iface = getattr(x, attr, None)
        if iface is None:
            continue
        shape = tuple(int(s) for s in iface["shape"])
        dt = np.dtype(iface["typestr"])
        if not _contiguous(shape, iface.get("strides"), dt.itemsize):
            raise ValueError(f"KV region must be C-contiguous (strides {iface.get('strides')} for shape {shape})")
        ptr, readonly = iface["data"]
        if readonly:
            raise ValueError("KV region is read-only; the receiver must be able to write into it")
        if len(shape) < 1 or shape[0] == 0:
            raise ValueError(f"KV region needs a leading block dimension, got shape {shape}")
        nbytes = int(np.prod(shape)) * dt.itemsize
        name = x.dtype.name if hasattr(x, "dtype") and hasattr(x.dtype, "name") else dt.name
        return Region(x, int(ptr), nbytes, dev, str(name), shape)
    raise TypeError(f"cannot register {type(x).__name__} as KV memory: need a torch tensor or an object "
                    "with __array_interface__ / __cuda_array_interface__")


class _CudaSpan:
    """A byte range of device memory exposed through ``__cuda_array_interface__`` (what UCX consumes)."""

    def __init__(self, ptr: int, nbytes: int, owner: Any) -> None:
        self._owner = owner
        self.__cuda_array_interface__ = {
            "data": (ptr, False), "shape": (nbytes,), "typestr": "|u1", "strides": None, "version": 3,
        }


def span(region: Region, offset: int, nbytes: int) -> Any:
    """A writable zero-copy view of ``nbytes`` at ``offset``: numpy uint8 for host memory, a
    ``__cuda_array_interface__`` object for device memory."""
    if offset < 0 or nbytes <= 0 or offset + nbytes > region.nbytes:
        raise ValueError(f"byte range [{offset}, {offset + nbytes}) is outside the region of {region.nbytes} bytes")
    if region.is_host:
        return np.frombuffer((ctypes.c_ubyte * nbytes).from_address(region.ptr + offset), dtype=np.uint8)
    return _CudaSpan(region.ptr + offset, nbytes, region.owner)
