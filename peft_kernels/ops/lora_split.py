"""``lora_shrink`` / ``lora_expand``: the two halves of ``multi_lora`` as ops of their own.

``lora_shrink`` projects every row into its adapter's rank space, ``lora_expand`` projects a
rank-space vector back out through the row's adapter (vLLM's shrink/expand split). Between them
the caller may do anything per row (a bottleneck adapter adds a bias and applies a
non-linearity); ``multi_lora`` is ``lora_expand(lora_shrink(x))`` fused.

Validation -> backend dispatch -> autograd registration, like ``multi_lora``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from . import _checks as C
from ._dispatch import call, register_autograd, register, register_native, select

_RANK_DTYPES = (torch.float32, torch.float64)


@torch.library.custom_op("peft_kernels::lora_shrink", mutates_args=())
def _shrink_op(x: Tensor, lora_a: Tensor, adapter_index: Optional[Tensor], ranks: Optional[Tensor],
               scaling: Optional[Tensor]) -> Tensor:
    args = (x, lora_a, adapter_index, ranks, scaling)
    return select("lora_shrink", x.device, *args)[1](*args)


@_shrink_op.register_fake
def _(x, lora_a, adapter_index, ranks, scaling):
    return x.new_empty(x.shape[0], lora_a.shape[1], dtype=_rank_dtype(x.dtype))


@torch.library.custom_op("peft_kernels::lora_shrink_backward", mutates_args=())
def _shrink_backward_op(grad_h: Tensor, x: Tensor, lora_a: Tensor, adapter_index: Optional[Tensor],
                        ranks: Optional[Tensor], scaling: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    args = (grad_h, x, lora_a, adapter_index, ranks, scaling)
    return select("lora_shrink_backward", x.device, *args)[1](*args)


@_shrink_backward_op.register_fake
def _(grad_h, x, lora_a, adapter_index, ranks, scaling):
    return torch.empty_like(x), torch.empty_like(lora_a)


def _shrink_setup(ctx, inputs, output):
    x, lora_a, adapter_index, ranks, scaling = inputs
    ctx.save_for_backward(x, lora_a, adapter_index, ranks, scaling)


def _shrink_backward(ctx, grad):
    x, lora_a, adapter_index, ranks, scaling = ctx.saved_tensors
    dx, da = _shrink_backward_op(grad.contiguous(), x, lora_a, adapter_index, ranks, scaling)
    return dx, da, None, None, None


register_autograd(_shrink_op, _shrink_backward, _shrink_setup)


@torch.library.custom_op("peft_kernels::lora_expand", mutates_args=())
def _expand_op(h: Tensor, lora_b: Tensor, adapter_index: Optional[Tensor], scaling: Tensor,
               ranks: Optional[Tensor], base: Optional[Tensor]) -> Tensor:
    args = (h, lora_b, adapter_index, scaling, ranks, base)
    return select("lora_expand", h.device, *args)[1](*args)


@_expand_op.register_fake
def _(h, lora_b, adapter_index, scaling, ranks, base):
    return lora_b.new_empty(h.shape[0], lora_b.shape[1])


@torch.library.custom_op("peft_kernels::lora_expand_backward", mutates_args=())
def _expand_backward_op(grad_y: Tensor, h: Tensor, lora_b: Tensor, adapter_index: Optional[Tensor],
                        scaling: Tensor, ranks: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    args = (grad_y, h, lora_b, adapter_index, scaling, ranks)
    return select("lora_expand_backward", h.device, *args)[1](*args)


@_expand_backward_op.register_fake
def _(grad_y, h, lora_b, adapter_index, scaling, ranks):
    return torch.empty_like(h), torch.empty_like(lora_b)


def _expand_setup(ctx, inputs, output):
    h, lora_b, adapter_index, scaling, ranks, base = inputs
    ctx.save_for_backward(h, lora_b, adapter_index, scaling, ranks)
    ctx.has_base = base is not None


def _expand_backward(ctx, grad):
    h, lora_b, adapter_index, scaling, ranks = ctx.saved_tensors
    grad = grad.contiguous()
    dh, db = _expand_backward_op(grad, h, lora_b, adapter_index, scaling, ranks)
    dbase = grad if ctx.has_base and ctx.needs_input_grad[5] else None
    return dh, db, None, None, None, dbase


register_autograd(_expand_op, _expand_backward, _expand_setup)

for _op in ("lora_shrink", "lora_shrink_backward", "lora_expand", "lora_expand_backward"):
    register(_op, "reference", getattr(reference, _op))


register_native("lora_shrink", "lora_shrink_fwd")
register_native("lora_shrink_backward", "lora_shrink_bwd")
register_native("lora_expand", "lora_expand_fwd")
register_native("lora_expand_backward", "lora_expand_bwd")


def _register_native_fakes() -> None:
    """Shape functions of the compiled ops (``torch.ops.peft_kernels.*_fwd/_bwd``), for compile / opcheck."""
    ops = torch.ops.peft_kernels

    def fake(name, fn):
        qualified = f"peft_kernels::{name}"
        if hasattr(ops, name) and not torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "Meta"):
            torch.library.register_fake(qualified, fn)

    fake("lora_shrink_fwd", lambda x, a, idx, ranks, scaling: x.new_empty(
        x.shape[0], a.shape[1], dtype=_rank_dtype(x.dtype)))
    fake("lora_shrink_bwd", lambda gh, x, a, idx, ranks, scaling: (torch.empty_like(x), torch.empty_like(a)))
    fake("lora_expand_fwd", lambda h, b, idx, scaling, ranks, base: b.new_empty(h.shape[0], b.shape[1]))
    fake("lora_expand_bwd", lambda g, h, b, idx, scaling, ranks: (torch.empty_like(h), torch.empty_like(b)))


def _rank_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def lora_shrink(
    x: Tensor,
    lora_a: Tensor,
    adapter_index: Optional[Tensor],
    *,
    ranks: Optional[Tensor] = None,
    scaling: Optional[Tensor] = None,
    validate: bool = True,
) -> Tensor:
    """Every row into its own adapter's rank space: ``h[n] = scaling[t] * lora_a[t] @ x[n]``.

    Shapes: x [N, H_in]; lora_a [T, R, H_in] (PEFT ``lora_A.weight`` stacked); adapter_index [N], or
    None (T == 1, or T == N); ranks [T] int or None (all R); scaling [T] float or None (1).
    Returns h [N, R] in fp32 (fp64 for fp64 x): the rank-space dtype of ``multi_lora``.

    Semantics: row n uses adapter t = adapter_index[n] and its first ranks[t] rank slots; columns
    j >= ranks[t] and rows with -1 are exactly 0 (the bank's padding is never read). Backward gives
    dx and dlora_a (each adapter's over its own rows); the indices and scaling are constants.
    ``validate=False`` skips every check.
    """
    if validate:
        _check_shrink(x, lora_a, adapter_index, ranks, scaling)
    if scaling is not None and scaling.dtype != torch.float32:
        scaling = scaling.float()
    args = (x, lora_a, adapter_index, ranks, scaling)
    return call("lora_shrink", _shrink_op, args, x.device, (x, lora_a))


def lora_expand(
    h: Tensor,
    lora_b: Tensor,
    adapter_index: Optional[Tensor],
    scaling: Tensor,
    *,
    ranks: Optional[Tensor] = None,
    base: Optional[Tensor] = None,
    validate: bool = True,
) -> Tensor:
    """Every row's rank-space vector out through its own adapter: ``y[n] = base[n] + scaling[t] * lora_b[t] @ h[n]``.

    Shapes: h [N, R] (fp32, fp64, or lora_b's dtype); lora_b [T, H_out, R] (PEFT ``lora_B.weight``
    stacked); adapter_index [N] or None (T == 1, or T == N); scaling [T] float; ranks [T] int or
    None (all R); base [N, H_out] in lora_b's dtype, or None. Returns y [N, H_out] in lora_b's dtype.

    Semantics: only h[n, :ranks[t]] and lora_b[t, :, :ranks[t]] are read; the sum is fp32 (fp64
    for fp64); rows with -1 get base (or 0). Backward gives dh (h's dtype, 0 in the rank padding
    and on -1 rows), dlora_b (each adapter's over its own rows) and dbase.
    ``validate=False`` skips every check.
    """
    if validate:
        _check_expand(h, lora_b, adapter_index, scaling, ranks, base)
    if scaling.dtype != torch.float32:
        scaling = scaling.float()
    args = (h, lora_b, adapter_index, scaling, ranks, base)
    return call("lora_expand", _expand_op, args, h.device, (h, lora_b, base))


def _check_common(rows_name: str, rows: Tensor, bank_name: str, bank: Tensor, adapter_index, ranks,
                  scaling, R: int) -> None:
    T = bank.shape[0]
    if scaling is not None:
        C.tensor("scaling", scaling, 1, layout="[T]")
        C.dim_equal("scaling.shape[0]", scaling.shape[0], T, f"one scale per adapter ({bank_name} {C.shape_of(bank)})")
    C.same_device(rows_name, rows, **{bank_name: bank}, adapter_index=adapter_index, scaling=scaling, ranks=ranks)
    C.lengths("ranks", ranks, T, R, f"the padded rank R = {R}", True)
    C.bank_index("adapter_index", adapter_index, rows.shape[0], T, f"{bank_name} {C.shape_of(bank)}", True)


def _check_shrink(x, lora_a, adapter_index, ranks, scaling) -> None:
    C.tensor("x", x, 2, layout="[N, H_in]")
    C.tensor("lora_a", lora_a, 3, layout="[T, R, H_in]")
    C.dim_equal("x.shape[1] (H_in)", x.shape[1], lora_a.shape[2], f"x {C.shape_of(x)} vs lora_a {C.shape_of(lora_a)}")
    C.same_dtype("x", x, lora_a=lora_a)
    _check_common("x", x, "lora_a", lora_a, adapter_index, ranks, scaling, lora_a.shape[1])


def _check_expand(h, lora_b, adapter_index, scaling, ranks, base) -> None:
    C.tensor("h", h, 2, layout="[N, R]")
    C.tensor("lora_b", lora_b, 3, layout="[T, H_out, R]")
    C.dim_equal("h.shape[1] (R)", h.shape[1], lora_b.shape[2], f"h {C.shape_of(h)} vs lora_b {C.shape_of(lora_b)}")
    if h.dtype not in (*_RANK_DTYPES, lora_b.dtype):
        raise TypeError(f"h must be float32, float64 or lora_b's dtype {lora_b.dtype}, got {h.dtype} "
                        f"(h shape {C.shape_of(h)})")
    if not isinstance(scaling, Tensor):
        raise TypeError(f"scaling must be a torch.Tensor [T], got {type(scaling).__name__}")
    C.same_dtype("lora_b", lora_b, base=base)
    if base is not None and tuple(base.shape) != (h.shape[0], lora_b.shape[1]):
        raise ValueError(f"base must be {[h.shape[0], lora_b.shape[1]]} (h {C.shape_of(h)}, lora_b "
                         f"{C.shape_of(lora_b)}), got {C.shape_of(base)}")
    C.same_device("h", h, base=base)
    _check_common("h", h, "lora_b", lora_b, adapter_index, ranks, scaling, lora_b.shape[2])


_register_native_fakes()
