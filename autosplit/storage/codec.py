"""How values become cache bytes and back: tensors as numpy arrays (bfloat16 viewed as uint16,
bit-exact and zero-copy), and dataset sources (prompts, paths, ids, sizes) as tensors. The one
place that knows the cache's value encoding; the writer, both readers and the loader use it."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autosplit.errors import CacheError
from autosplit.plan import MAX_TEXT_BYTES

_TORCH_TO_NUMPY = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.float64: "float64",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.int16: "int16",
    torch.uint8: "uint8",
    torch.bool: "bool",
}


def torch_dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def to_storage(t: torch.Tensor) -> np.ndarray:
    """A tensor as the numpy array the cache stores (bf16 viewed as uint16, bit-exact)."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy()
    if t.dtype not in _TORCH_TO_NUMPY:
        raise CacheError(f"cannot cache tensors of dtype {t.dtype}; cast it in the unit that produces it")
    return t.numpy()


def from_storage(a: np.ndarray, logical_dtype: str) -> torch.Tensor:
    a = np.asarray(a)
    t = torch.from_numpy(np.ascontiguousarray(a)).reshape(a.shape)  # ascontiguousarray makes a scalar 1-d
    return t.view(torch.bfloat16) if logical_dtype == "bfloat16" else t


#: cap of a text source (prompt, path) cached for stage 2, in UTF-8 bytes
MAX_SOURCE_BYTES = MAX_TEXT_BYTES


def encode_source(value: Any) -> torch.Tensor:
    """A dataset source value (prompt, sample id, size, ...) as a tensor the cache can hold: text as
    UTF-8 bytes (uint8), integers and integer tuples as int64, floats as float64."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (str, Path)):
        return (
            torch.frombuffer(bytearray(str(value).encode()), dtype=torch.uint8)
            if str(value)
            else torch.zeros(0, dtype=torch.uint8)
        )
    if isinstance(value, float):
        return torch.tensor(value, dtype=torch.float64)
    if isinstance(value, (bool, int, np.integer)):
        return torch.tensor(int(value), dtype=torch.int64)
    if isinstance(value, (tuple, list)) and all(isinstance(v, (int, np.integer)) for v in value):
        return torch.tensor([int(v) for v in value], dtype=torch.int64)
    raise TypeError(f"cannot cache a dataset value of type {type(value).__name__}")


def decode_sources(batch: dict[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """The inverse of `encode_source` on a collated batch: each source in `names` becomes the list
    of per-sample Python values the units read."""
    for name in names:
        t = batch.get(name)
        if not isinstance(t, torch.Tensor):
            continue
        if t.dtype == torch.uint8:
            batch[name] = [bytes(row.numpy().tobytes()).rstrip(b"\0").decode() for row in t]
        elif t.dim() == 1:
            batch[name] = t.tolist()
        else:
            batch[name] = [tuple(row) for row in t.tolist()]
    return batch
