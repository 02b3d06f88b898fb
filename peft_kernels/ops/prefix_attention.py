"""``prefix_attention``: attention over a per-layer prefix bank plus the row's own keys.

Validation -> backend dispatch -> autograd registration. The prefix K/V are a second key
source read straight from the bank ``[T, Hkv, P, D]``: never concatenated, never copied per row.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from . import _checks as C
from ._dispatch import call, kernels, register_autograd, register, register_native, select


@torch.library.custom_op("peft_kernels::prefix_attention", mutates_args=())
def _attn_op(
    q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, prefix_index: Optional[Tensor],
    prefix_lens: Optional[Tensor], key_padding_mask: Optional[Tensor], causal: bool, softmax_scale: float,
) -> tuple[Tensor, Tensor]:
    args = (q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, key_padding_mask, causal, softmax_scale)
    return select("prefix_attention", q.device, *args)[1](*args)


@_attn_op.register_fake
def _(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, key_padding_mask, causal, softmax_scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("peft_kernels::prefix_attention_backward", mutates_args=())
def _attn_backward_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
    prefix_index: Optional[Tensor], prefix_lens: Optional[Tensor], key_padding_mask: Optional[Tensor],
    causal: bool, softmax_scale: float, out: Tensor, lse: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    args = (grad_out, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, key_padding_mask, causal,
            softmax_scale, out, lse)
    return select("prefix_attention_backward", q.device, *args)[1](*args)


@_attn_backward_op.register_fake
def _(grad_out, q, k, v, prefix_k, prefix_v, *rest):
    return tuple(torch.empty_like(t) for t in (q, k, v, prefix_k, prefix_v))


def register_attention_autograd(op, backward_op) -> None:
    """Autograd of an attention op through its backward op.

    Shapes: ``op(q, k, v, prefix_k, prefix_v, *rest) -> (out, lse)``; ``backward_op(grad_out, q, k, v,
    prefix_k, prefix_v, *rest, out, lse) -> (dq, dk, dv, dprefix_k, dprefix_v)``.
    Semantics: the tensor inputs (and out, lse) are saved for backward and the other inputs kept as
    they are; grad_out is made contiguous; lse and every input after prefix_v get no gradient.
    """
    def setup(ctx, inputs, output):
        out, lse = output
        ctx.save_for_backward(*(x if isinstance(x, Tensor) else None for x in inputs), out, lse)
        ctx.constants = tuple(None if isinstance(x, Tensor) else x for x in inputs)
        ctx.mark_non_differentiable(lse)

    def backward(ctx, grad_out, _grad_lse):
        *saved, out, lse = ctx.saved_tensors
        inputs = (c if x is None else x for x, c in zip(saved, ctx.constants))
        grads = backward_op(grad_out.contiguous(), *inputs, out, lse)
        return (*grads, *(None,) * (len(ctx.constants) - 5))

    register_autograd(op, backward, setup)


register_attention_autograd(_attn_op, _attn_backward_op)


def without_out_lse(reference_backward):
    """A reference backward as the backward op's kernel, which also receives the forward's out and lse.

    Shapes: the backward op's arguments ``(grad_out, *inputs, out, lse)``; returns the reference's grads.
    Semantics: ``reference_backward(grad_out, *inputs)``: the reference recomputes what it needs.
    """
    def backward(*args):
        return reference_backward(*args[:-2])

    return backward


register("prefix_attention", "reference", reference.prefix_attention)
register("prefix_attention_backward", "reference", without_out_lse(reference.prefix_attention_backward))

_NATIVE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def native_supports(q, *rest) -> Optional[str]:
    """Why the cpp kernels of the prefix attention ops cannot take ``q`` (None when they can).

    Shapes: q of any attention op (the other arguments are ignored).
    Semantics: csrc/cpu/prefix_attention.cpp, prefix_flash.cpp and prefix_flash_varlen.cpp exist for
    CPU tensors of float32/float64/float16/bfloat16 only.
    """
    if q.device.type != "cpu":
        return f"the cpp kernel takes CPU tensors, got {q.device}"
    if q.dtype not in _NATIVE_DTYPES:
        return f"the cpp kernel takes float32/float64/float16/bfloat16, got {q.dtype}"
    return None


def native_backward_supports(grad_out, q, *rest) -> Optional[str]:
    """:func:`native_supports` for a backward op's arguments (grad_out, q, ...).

    Shapes: as the backward op's. Semantics: the answer for ``q``.
    """
    return native_supports(q)


def fake_contiguous_grads(grad_out, q, k, v, prefix_k, prefix_v, *rest):
    """Fake (shape-only) result of an attention backward kernel.

    Shapes: contiguous tensors like q, k, v, prefix_k, prefix_v.
    Semantics: empty tensors of their dtypes and devices, for tracing.
    """
    return tuple(t.new_empty(t.shape) for t in (q, k, v, prefix_k, prefix_v))


# The cpp backend has two kernels: the cascade over ATen's flash attention (prefix_attention.cpp)
# and the fused flash pass (prefix_flash.cpp). Measured on a 2-core AMD EPYC (2 threads, T = 4 bank,
# row b uses entry b % 4, causal, medians of 7 interleaved, kernels called directly), cascade / fused
# time for (B, Hq, Hkv, Lq, Lk, P, D), fp32 fwd, fp32 fwd+bwd, bf16 fwd, bf16 fwd+bwd:
#   (4, 8, 8, 128, 128, 16, 64):     2.57  2.26  2.53  3.56
#   (8, 16, 4, 512, 512, 32, 64):    1.80  1.70  1.90  1.71
#   (2, 32, 8, 1024, 1024, 64, 128): 1.30  1.47  1.37  1.13
#   (16, 32, 8, 1, 1024, 64, 128):   1.65  1.56  5.98  2.46
#   (1, 32, 8, 2048, 2048, 64, 128): 1.15 (fp32 fwd)
# The fused kernel's lead shrinks as Lq x Lk grows (ATen's coarse causal blocks waste less), so
# it runs up to the largest score matrix measured, the cascade beyond.
FUSED_MAX_SCORES = 2048 * 2048


def _fused(q: Tensor, k: Tensor) -> bool:
    return q.shape[2] * k.shape[2] <= FUSED_MAX_SCORES


def _cpp_forward(q, k, v, *rest):
    if _fused(q, k):
        return torch.ops.peft_kernels.prefix_flash_fwd(q, k, v, *rest)
    return torch.ops.peft_kernels.prefix_attention_fwd(q, k, v, *rest)


def _cpp_backward(grad_out, q, k, *rest):
    if _fused(q, k):
        return torch.ops.peft_kernels.prefix_flash_bwd(grad_out, q, k, *rest)
    return torch.ops.peft_kernels.prefix_attention_bwd(grad_out, q, k, *rest)


register_native("prefix_attention", "prefix_attention_fwd", supports=native_supports)
register_native("prefix_attention_backward", "prefix_attention_bwd", supports=native_backward_supports)
if ("cpp" in kernels("prefix_attention") and "cpp" in kernels("prefix_attention_backward")
        and hasattr(torch.ops.peft_kernels, "prefix_flash_fwd") and hasattr(torch.ops.peft_kernels, "prefix_flash_bwd")):
    register("prefix_attention", "cpp", _cpp_forward, supports=native_supports)
    register("prefix_attention_backward", "cpp", _cpp_backward, supports=native_backward_supports)

    @torch.library.register_fake("peft_kernels::prefix_flash_fwd")
    def _(q, k, v, prefix_k, prefix_v, *rest):
        return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=torch.float32)

    torch.library.register_fake("peft_kernels::prefix_flash_bwd", fake_contiguous_grads)


def prefix_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    *,
    prefix_index: Optional[Tensor] = None,
    prefix_lens: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
    validate: bool = True,
):
    """Fused attention over [the row's prefix keys ; the row's own keys], GQA-aware.

    Shapes: q [B, Hq, Lq, D]; k, v [B, Hkv, Lk, D] with Hq % Hkv == 0; prefix_k, prefix_v
    [T, Hkv, P, D]; prefix_index [B] int32/int64 or None (T == 1 shared, or T == B);
    prefix_lens [T] (<= P) or None; key_padding_mask [B, Lk] bool (True = real key) or None.
    Returns out [B, Hq, Lq, D] in q's dtype, and lse [B, Hq, Lq] fp32 if ``return_lse``.

    Semantics: query i of row b sees prefix key p iff p < prefix_lens[t] (t = the row's
    prefix; none if -1) and sequence key j iff key_padding_mask[b, j] and (not causal or
    j <= i + Lk - Lq), i.e. bottom-right aligned causal (decode with Lq = 1 sees every key).
    Scale defaults to D**-0.5; softmax in fp32; a query with no visible key gets 0 (lse -inf).
    Backward gives dq, dk, dv, dprefix_k, dprefix_v (prefix grads summed over every row and
    query head that used the prefix); lse is not differentiable. ``validate=False`` trusts the
    caller completely (no checks: what model code does per layer after checking once).
    """
    if validate:
        _check(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, key_padding_mask)
    scale = float(q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale)
    args = (q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, key_padding_mask, causal, scale)
    out, lse = call("prefix_attention", _attn_op, args, q.device, (q, k, v, prefix_k, prefix_v))
    return (out, lse) if return_lse else out


def check_operands(q, k, v, prefix_k, prefix_v, dims: int, q_layout: str, kv_layout: str) -> None:
    """Refuse operands that are not float tensors of the right rank (TypeError / ValueError naming them).

    Shapes: q ``q_layout`` and k, v ``kv_layout``, all of rank ``dims``; prefix_k, prefix_v [T, Hkv, P, D].
    Semantics: the per-tensor checks of the prefix attention ops, q first.
    """
    C.tensor("q", q, dims, layout=q_layout)
    C.tensor("k", k, dims, layout=kv_layout)
    C.tensor("v", v, dims, layout=kv_layout)
    C.tensor("prefix_k", prefix_k, 4, layout="[T, Hkv, P, D]")
    C.tensor("prefix_v", prefix_v, 4, layout="[T, Hkv, P, D]")


def check_heads_and_bank(q, k, v, prefix_k, prefix_v, Hq: int, Hkv: int, D: int, kv_ok: bool, kv_layout: str) -> None:
    """Refuse k / v that fail ``kv_ok``, Hq not a multiple of Hkv, a bank unlike [T, Hkv, P, D] or mixed dtypes.

    Shapes: q's Hq heads of size D; k's Hkv heads; prefix_k, prefix_v [T, Hkv, P, D].
    Semantics: ValueError naming every operand's shape (``kv_layout`` for k, v), TypeError for dtypes.
    """
    shapes = (f"q {C.shape_of(q)}, k {C.shape_of(k)}, v {C.shape_of(v)}, "
              f"prefix_k {C.shape_of(prefix_k)}, prefix_v {C.shape_of(prefix_v)}")
    if not kv_ok:
        raise ValueError(f"k and v must both be {kv_layout}: {shapes}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query heads Hq={Hq} must be a multiple of key/value heads Hkv={Hkv}: {shapes}")
    if prefix_k.shape[1] != Hkv or prefix_k.shape[3] != D or prefix_v.shape != prefix_k.shape:
        raise ValueError(f"prefix_k and prefix_v must both be [T, Hkv={Hkv}, P, D={D}]: {shapes}")
    C.same_dtype("q", q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v)


def check_bank_args(prefix_index, prefix_lens, prefix_k, rows: int) -> None:
    """Refuse a prefix_index or prefix_lens that does not fit the bank.

    Shapes: prefix_index [rows] or None; prefix_lens [T] or None; prefix_k [T, Hkv, P, D].
    Semantics: prefix_index in [-1, T) (None needs T == 1 or T == rows); prefix_lens in [0, P].
    """
    T, P = prefix_k.shape[0], prefix_k.shape[2]
    C.bank_index("prefix_index", prefix_index, rows, T, f"prefix_k {C.shape_of(prefix_k)}", True)
    C.lengths("prefix_lens", prefix_lens, T, P, f"prefix length P = {P}", True)


def _check(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, key_padding_mask) -> None:
    check_operands(q, k, v, prefix_k, prefix_v, 4, "[B, Hq, Lq, D]", "[B, Hkv, Lk, D]")
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    check_heads_and_bank(q, k, v, prefix_k, prefix_v, Hq, Hkv, D,
                         k.shape[0] == B and k.shape[3] == D and v.shape == k.shape, f"[B={B}, Hkv, Lk, D={D}]")
    C.same_device("q", q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v, prefix_index=prefix_index,
                  prefix_lens=prefix_lens, key_padding_mask=key_padding_mask)
    check_bank_args(prefix_index, prefix_lens, prefix_k, B)
    if key_padding_mask is not None:
        C.tensor("key_padding_mask", key_padding_mask, 2, (torch.bool,), f"[B={B}, Lk={Lk}]")
        if tuple(key_padding_mask.shape) != (B, Lk):
            raise ValueError(f"key_padding_mask must be [B={B}, Lk={Lk}], got {C.shape_of(key_padding_mask)}")
