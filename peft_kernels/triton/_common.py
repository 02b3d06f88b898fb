"""What the Triton kernel files share: the interpreter flag, SM counts, the bank-index modes,
the sort + searchsorted segment builder, and the device guard every launcher runs under.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, Optional, TypeVar

import torch
import triton.language as tl
from torch import Tensor

__all__ = [
    "INTERPRET", "interpreting", "sm_count", "MODE_SHARED", "MODE_PER_ROW", "MODE_EXPLICIT", "index_mode",
    "sort_segments", "device_guard", "on_tensor_device",
]


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# Read once at import: config lists and block sizes are chosen when the kernel files load.
INTERPRET = interpreting()

# How a kernel finds a row's bank entry (a constexpr argument of every kernel that reads a bank).
MODE_SHARED = tl.constexpr(0)  # index None, T == 1: every row uses entry 0
MODE_PER_ROW = tl.constexpr(1)  # index None, T == B: row b uses entry b
MODE_EXPLICIT = tl.constexpr(2)  # row b uses entry index[b] (-1: none)


def index_mode(index: Optional[Tensor], T: int) -> int:
    """The bank-index mode of a call.

    Shapes: index ``[B]`` or None; T the bank size.
    Semantics: an explicit index is ``MODE_EXPLICIT``; None means shared when T == 1, else per row.
    """
    if index is not None:
        return MODE_EXPLICIT.value
    return MODE_SHARED.value if T == 1 else MODE_PER_ROW.value


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 for any other device).

    Semantics: cached per device index; ``cuda`` without an index means the current device.
    """
    if device.type != "cuda":
        return 1
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def sort_segments(keys: Tensor, num_segments: int) -> tuple[Tensor, Tensor]:
    """(order, starts): a stable sort of ``keys`` and where each key 0..num_segments-1 starts.

    Shapes: keys ``[N]`` (any integer dtype) -> order int64 ``[N]``, starts ``[num_segments + 1]``
    (keys' dtype).
    Semantics: the positions of key k are ``order[starts[k]:starts[k + 1]]`` in their original
    order; negative keys (-1: none) sort first and belong to no segment; ``starts[num_segments]``
    counts the keys below num_segments. All on the device: no host sync, CUDA-graph capturable.
    """
    sorted_keys, order = torch.sort(keys, stable=True)
    bounds = torch.arange(num_segments + 1, dtype=sorted_keys.dtype, device=keys.device)
    return order, torch.searchsorted(sorted_keys, bounds)


def device_guard(device: torch.device):
    """A context that makes ``device`` current when it is a CUDA device (a no-op otherwise)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


F = TypeVar("F", bound=Callable)


def on_tensor_device(fn: F) -> F:
    """Decorate a launcher so its kernels launch on the GPU of its first tensor argument.

    Semantics: Triton launches on the current device; on a multi-GPU machine the tensors may live
    elsewhere, so the launcher body runs under ``torch.cuda.device(<first tensor>.device)``.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)
        if first is None or first.device.type != "cuda":
            return fn(*args, **kwargs)
        with torch.cuda.device(first.device):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
