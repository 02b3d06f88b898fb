"""``multi_lora``: every row of a batch through its own LoRA adapter, forward and backward.

Validation -> backend dispatch -> autograd registration. Many adapters train in one batch:
each adapter's gradient sums over its own rows only.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .. import _ext, reference
from . import _checks as C
from ._dispatch import call, memo_key_of, register_autograd, register, register_native, select


@torch.library.custom_op("peft_kernels::multi_lora", mutates_args=())
def _lora_op(
    x: Tensor, lora_a: Tensor, lora_b: Tensor, adapter_index: Optional[Tensor], scaling: Tensor,
    ranks: Optional[Tensor], base: Optional[Tensor],
) -> Tensor:
    args = (x, lora_a, lora_b, adapter_index, scaling, ranks, base)
    return select("multi_lora", x.device, *args)[1](*args)


@_lora_op.register_fake
def _(x, lora_a, lora_b, adapter_index, scaling, ranks, base):
    return x.new_empty(x.shape[0], lora_b.shape[1])


@torch.library.custom_op("peft_kernels::multi_lora_backward", mutates_args=())
def _lora_backward_op(
    grad_y: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor, adapter_index: Optional[Tensor],
    scaling: Tensor, ranks: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    args = (grad_y, x, lora_a, lora_b, adapter_index, scaling, ranks)
    return select("multi_lora_backward", x.device, *args)[1](*args)


@_lora_backward_op.register_fake
def _(grad_y, x, lora_a, lora_b, adapter_index, scaling, ranks):
    return torch.empty_like(x), torch.empty_like(lora_a), torch.empty_like(lora_b)


def _setup(ctx, inputs, output):
    x, lora_a, lora_b, adapter_index, scaling, ranks, base = inputs
    ctx.save_for_backward(x, lora_a, lora_b, adapter_index, scaling, ranks)
    ctx.has_base = base is not None


def _backward(ctx, grad):
    x, lora_a, lora_b, adapter_index, scaling, ranks = ctx.saved_tensors
    grad = grad.contiguous()
    dx, da, db = _lora_backward_op(grad, x, lora_a, lora_b, adapter_index, scaling, ranks)
    dbase = grad if ctx.has_base and ctx.needs_input_grad[6] else None
    return dx, da, db, None, None, None, dbase


register_autograd(_lora_op, _backward, _setup)

register("multi_lora", "reference", reference.multi_lora)
register("multi_lora_backward", "reference", reference.multi_lora_backward)


def _native_supports(x, *args) -> Optional[str]:
    # The CUDA kernel is a BGMV-style decode kernel: one row at a time. Larger batches share each
    # adapter's weights across rows, which Triton's segmented kernels exploit.
    if x.device.type == "cuda" and x.shape[0] > 64:
        return "N > 64 rows: Triton's segmented kernels reuse each adapter's weights across rows"
    return None


register_native("multi_lora", "multi_lora_fwd", supports=_native_supports)
register_native("multi_lora_backward", "multi_lora_bwd")


def _register_native_fakes() -> None:
    """Shape functions of the compiled ops, for torch.compile and opcheck."""
    for name, fn in (
        ("multi_lora_fwd", lambda x, a, b, idx, scaling, ranks, base: x.new_empty(x.shape[0], b.shape[1])),
        ("multi_lora_bwd", lambda g, x, a, b, idx, scaling, ranks: (
            torch.empty_like(x), torch.empty_like(a), torch.empty_like(b))),
    ):
        qualified = f"peft_kernels::{name}"
        if hasattr(torch.ops.peft_kernels, name) and not torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "Meta"):
            torch.library.register_fake(qualified, fn)


_register_native_fakes()


def multi_lora(
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    adapter_index: Optional[Tensor],
    scaling: Tensor,
    *,
    ranks: Optional[Tensor] = None,
    base: Optional[Tensor] = None,
    validate: bool = True,
) -> Tensor:
    """Batched mixed-adapter LoRA: ``y = base + scaling[t] * x @ A[t]^T @ B[t]^T`` per row.

    Shapes: x [..., H_in] (N rows after flattening); lora_a [T, R, H_in] (PEFT ``lora_A.weight``
    stacked); lora_b [T, H_out, R] (``lora_B.weight`` stacked); adapter_index [N], or [B] for x
    [B, L, H_in] (one adapter per sequence), or None (T == 1, or T == N); scaling [T] float;
    ranks [T] int or None (all R); base [..., H_out] or None. Returns [..., H_out] in x's dtype.

    Semantics: row n uses adapter t = adapter_index[n] with its first ranks[t] rank slots
    (zero-padding beyond is never read by the kernels); -1 rows get base (or 0); the rank-space
    intermediate is fp32. Backward gives dx, dlora_a, dlora_b (each adapter's over its own
    rows) and dbase; scaling and the indices are constants. ``validate=False`` trusts the
    caller completely (no checks at all: what model code does per layer after checking once).
    """
    if validate:
        _check(x, lora_a, lora_b, adapter_index, scaling, ranks, base)
    H_in, H_out = lora_a.shape[2], lora_b.shape[1]
    lead = x.shape[:-1]
    N = lead.numel()
    if adapter_index is not None and x.dim() == 3 and adapter_index.shape[0] == x.shape[0] != N:
        adapter_index = adapter_index[:, None].expand(x.shape[0], x.shape[1]).reshape(N)
    if validate:
        C.bank_index("adapter_index", adapter_index, N, lora_a.shape[0], f"lora_a {C.shape_of(lora_a)}", validate)
    base2 = None if base is None else base.reshape(N, H_out)
    if scaling.dtype != torch.float32:
        scaling = scaling.float()
    y = multi_lora_rows(x.reshape(N, H_in), lora_a, lora_b, adapter_index, scaling, ranks, base2)
    return y.reshape(*lead, H_out)


def multi_lora_rows(x: Tensor, lora_a: Tensor, lora_b: Tensor, adapter_index: Optional[Tensor], scaling: Tensor,
                    ranks: Optional[Tensor], base: Optional[Tensor], kernels: Optional[dict] = None) -> Tensor:
    """:func:`multi_lora` on rows the caller has already checked: no validation, no reshaping.

    Shapes: x [N, H_in], adapter_index [N] or None, scaling [T] float32, base [N, H_out] or None.
    Semantics: the same op; the per-layer entry point of the LoRA method layer. ``kernels`` is a
    memo that lives in one model call (``call``'s): the layers of that call then choose the
    backend once, not once each (eager inference only; autograd and torch.compile go through the
    registered op).
    """
    args = (x, lora_a, lora_b, adapter_index, scaling, ranks, base)
    return call("multi_lora", _lora_op, args, x.device, (x, lora_a, lora_b, base), kernels, _memo_key(x))


def _memo_key(x: Tensor) -> tuple:
    return (x.shape[0], x.dtype)  # what _native_supports reads, besides the device


def chosen_kernel(kernels: dict, x: Tensor) -> Optional[Callable]:
    """The kernel :func:`multi_lora_rows` ran rows like ``x`` [N, H_in] (same N, dtype, device) on
    directly in the call that owns the memo ``kernels``; None when it went through the registered op.

    Semantics: a caller that gets a kernel may call it with the same arguments as
    ``multi_lora_rows`` for the rest of that call (nothing there needs autograd)."""
    return kernels.get(memo_key_of("multi_lora", x.device, _memo_key(x)))


def in_place_kernel(kernel: Callable) -> Optional[Callable]:
    """The form of ``kernel`` (a multi_lora backend's) that adds the LoRA term into ``base`` in place
    and returns it (same arguments; base [N, H_out] contiguous, x's dtype), or None if it has none.

    Semantics: only the C++ CPU kernel has one (``peft_kernels._C.multi_lora_add_``); for the
    caller that owns ``base`` (a base layer's fresh output), it saves the output allocation."""
    ext = _ext.CPU.module
    if ext is not None and kernel is getattr(ext, "multi_lora_fwd", None):
        return getattr(ext, "multi_lora_add_", None)
    return None


# Up to here the fused kernel was never slower than MKL's sgemm + the LoRA kernel (hidden 256-2048; AVX-512
# on a Zen 4: 1.0-2.4x on one thread, 1.3-4x on two, caches hot or flushed; AVX2 on a Zen 3: 1.07-2.0x on
# one thread); at 64 rows it sometimes was.
FUSED_LINEAR_MAX_ROWS = 32


def fused_linear_kernel(kernel: Callable, x: Tensor) -> Optional[Callable]:
    """The kernel that computes ``F.linear(x, weight, bias)`` plus the LoRA term in one pass, for rows
    like ``x`` [N, H_in] that ran on ``kernel`` (a multi_lora backend's), or None.

    Arguments (x, weight [H_out, H_in], bias [H_out] or None, lora_a, lora_b, adapter_index [N], scaling,
    ranks) -> y [N, H_out]. Semantics: only the C++ CPU kernel has one (``peft_kernels._C.multi_lora_linear``),
    for float32 on an AVX2 or AVX-512 CPU and at most ``FUSED_LINEAR_MAX_ROWS`` rows (decode), where MKL's sgemm
    spends most of its time packing the weight; it reads the weight and the banks once. The base part's
    sums run in another order than MKL's (float32 rounding, not bitwise), the same for every row alone."""
    ext = _ext.CPU.module
    if (ext is not None and kernel is getattr(ext, "multi_lora_fwd", None) and x.dtype is torch.float32
            and x.shape[0] <= FUSED_LINEAR_MAX_ROWS and _ext.CPU.build_info.get("multi_lora_linear")):
        return ext.multi_lora_linear
    return None


def _check(x, lora_a, lora_b, adapter_index, scaling, ranks, base) -> None:
    """Shapes, dtypes, devices and (on the host) ranks; the index is checked after expansion."""
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError(f"x must be a tensor [..., H_in] with at least 2 dims, got {C.shape_of(x) if isinstance(x, Tensor) else type(x).__name__}")
    C.tensor("x", x, x.dim(), layout="[..., H_in]")
    C.tensor("lora_a", lora_a, 3, layout="[T, R, H_in]")
    C.tensor("lora_b", lora_b, 3, layout="[T, H_out, R]")
    T, R, H_in = lora_a.shape
    H_out = lora_b.shape[1]
    C.dim_equal("x.shape[-1] (H_in)", x.shape[-1], H_in, f"x {C.shape_of(x)} vs lora_a {C.shape_of(lora_a)}")
    if lora_b.shape[0] != T or lora_b.shape[2] != R:
        raise ValueError(f"lora_b must be [T={T}, H_out, R={R}] to match lora_a {C.shape_of(lora_a)}, "
                         f"got {C.shape_of(lora_b)}")
    C.same_dtype("x", x, lora_a=lora_a, lora_b=lora_b, base=base)
    C.tensor("scaling", scaling, 1, layout="[T]")
    C.dim_equal("scaling.shape[0]", scaling.shape[0], T, f"one scale per adapter (lora_a {C.shape_of(lora_a)})")
    C.same_device("x", x, lora_a=lora_a, lora_b=lora_b, adapter_index=adapter_index, scaling=scaling,
                  ranks=ranks, base=base)
    C.lengths("ranks", ranks, T, R, f"the padded rank R = {R}", True)
    if base is not None and tuple(base.shape) != (*x.shape[:-1], H_out):
        raise ValueError(f"base must be {[*x.shape[:-1], H_out]} (x {C.shape_of(x)}, lora_b {C.shape_of(lora_b)}), "
                         f"got {C.shape_of(base)}")
