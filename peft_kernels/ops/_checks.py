"""Input validation shared by the ops: every message names the argument and the shapes.

The ops run these checks only with ``validate=True`` (the default); model code checks its
batch once and calls the ops with ``validate=False`` in every layer. Range checks read index
tensors on the host (a GPU sync that breaks CUDA-graph capture), so even with
``validate=True`` they are skipped while the call is being compiled or captured.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor

INDEX_DTYPES = (torch.int32, torch.int64)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def shape_of(t: Optional[Tensor]) -> str:
    return "None" if t is None else f"{list(t.shape)}"


def host_checks_enabled(validate: bool) -> bool:
    """True when range checks may read tensors on the host (no compile, no graph capture)."""
    if not validate or torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def tensor(name: str, t, ndim: int, dtypes: Iterable[torch.dtype] = FLOAT_DTYPES, layout: str = "") -> Tensor:
    """Check that ``t`` is a Tensor of rank ``ndim`` with a dtype in ``dtypes``."""
    dtypes = tuple(dtypes)
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{layout and ' ' + layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims {layout}, got shape {shape_of(t)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {t.dtype} (shape {shape_of(t)})")
    return t


def same_dtype(ref_name: str, ref: Tensor, **others: Optional[Tensor]) -> None:
    for name, t in others.items():
        if t is not None and t.dtype != ref.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}: they must match "
                f"({name} shape {shape_of(t)}, {ref_name} shape {shape_of(ref)})"
            )


def same_device(ref_name: str, ref: Tensor, **others: Optional[Tensor]) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(
                f"{name} is on {t.device} but {ref_name} is on {ref.device}: all tensors must "
                f"share one device ({name} shape {shape_of(t)}, {ref_name} shape {shape_of(ref)})"
            )


def dim_equal(what: str, got: int, want: int, context: str) -> None:
    if got != want:
        raise ValueError(f"{what} is {got} but must be {want}: {context}")


def bank_index(name: str, index: Optional[Tensor], rows: int, entries: int, bank: str, validate: bool) -> None:
    """Check a per-row bank index: ``[rows]`` int32/int64 in ``[-1, entries)``, or None.

    ``None`` needs ``entries == 1`` (shared) or ``entries == rows`` (row b uses entry b).
    """
    if index is None:
        if entries not in (1, rows):
            raise ValueError(
                f"{name}=None needs the bank to hold 1 entry or one per row, but {bank} has "
                f"{entries} entries for {rows} rows: pass {name} [{rows}]"
            )
        return
    tensor(name, index, 1, INDEX_DTYPES, f"[{rows}]")
    dim_equal(f"{name}.shape[0]", index.shape[0], rows, f"one entry per row ({name} shape {shape_of(index)})")
    if host_checks_enabled(validate) and index.numel():
        lo, hi = int(index.min()), int(index.max())
        if lo < -1 or hi >= entries:
            raise ValueError(
                f"{name} holds values in [{lo}, {hi}] but must be in [-1, {entries}) "
                f"({bank} has {entries} entries; {name} shape {shape_of(index)})"
            )


def lengths(name: str, lens: Optional[Tensor], entries: int, max_len: int, what: str, validate: bool) -> None:
    """Check per-entry lengths: ``[entries]`` int32/int64 with values in ``[0, max_len]``."""
    if lens is None:
        return
    tensor(name, lens, 1, INDEX_DTYPES, f"[{entries}]")
    dim_equal(f"{name}.shape[0]", lens.shape[0], entries, f"one length per bank entry ({name} shape {shape_of(lens)})")
    if host_checks_enabled(validate) and lens.numel():
        lo, hi = int(lens.min()), int(lens.max())
        if lo < 0 or hi > max_len:
            raise ValueError(
                f"{name} holds values in [{lo}, {hi}] but must be in [0, {max_len}] ({what}; "
                f"{name} shape {shape_of(lens)})"
            )
