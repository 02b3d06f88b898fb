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


def _setup(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, key_padding_mask, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, key_padding_mask, out, lse)
    ctx.causal, ctx.scale = causal, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, key_padding_mask, out, lse = ctx.saved_tensors
    grads = _attn_backward_op(
        grad_out.contiguous(), q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, key_padding_mask,
        ctx.causal, ctx.scale, out, lse,
    )
    return (*grads, None, None, None, None, None)


register_autograd(_attn_op, _backward, _setup)


def _reference_backward(grad_out, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, key_padding_mask,
                        causal, softmax_scale, out, lse):
    return reference.prefix_attention_backward(
        grad_out, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, key_padding_mask, causal, softmax_scale
    )


register("prefix_attention", "reference", reference.prefix_attention)
register("prefix_attention_backward", "reference", _reference_backward)

_NATIVE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _native_supports(q, k, v, prefix_k, prefix_v, *rest) -> Optional[str]:
    # The C++ kernels (csrc/cpu/prefix_attention.cpp, prefix_flash.cpp) exist for these dtypes only.
    if q.device.type != "cpu":
        return f"the cpp kernel takes CPU tensors, got {q.device}"
    if q.dtype not in _NATIVE_DTYPES:
        return f"the cpp kernel takes float32/float64/float16/bfloat16, got {q.dtype}"
    return None


def _native_backward_supports(grad_out, q, *rest) -> Optional[str]:
    return _native_supports(q, *rest)


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


register_native("prefix_attention", "prefix_attention_fwd", supports=_native_supports)
register_native("prefix_attention_backward", "prefix_attention_bwd", supports=_native_backward_supports)
if ("cpp" in kernels("prefix_attention") and "cpp" in kernels("prefix_attention_backward")
        and hasattr(torch.ops.peft_kernels, "prefix_flash_fwd") and hasattr(torch.ops.peft_kernels, "prefix_flash_bwd")):
    register("prefix_attention", "cpp", _cpp_forward, supports=_native_supports)
    register("prefix_attention_backward", "cpp", _cpp_backward, supports=_native_backward_supports)

    @torch.library.register_fake("peft_kernels::prefix_flash_fwd")
    def _(q, k, v, prefix_k, prefix_v, *rest):
        return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=torch.float32)

    @torch.library.register_fake("peft_kernels::prefix_flash_bwd")
    def _(grad_out, q, k, v, prefix_k, prefix_v, *rest):
        return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v, prefix_k, prefix_v))


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


def _check(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, key_padding_mask) -> None:
    C.tensor("q", q, 4, layout="[B, Hq, Lq, D]")
    C.tensor("k", k, 4, layout="[B, Hkv, Lk, D]")
    C.tensor("v", v, 4, layout="[B, Hkv, Lk, D]")
    C.tensor("prefix_k", prefix_k, 4, layout="[T, Hkv, P, D]")
    C.tensor("prefix_v", prefix_v, 4, layout="[T, Hkv, P, D]")
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    shapes = (f"q {C.shape_of(q)}, k {C.shape_of(k)}, v {C.shape_of(v)}, "
              f"prefix_k {C.shape_of(prefix_k)}, prefix_v {C.shape_of(prefix_v)}")
    if k.shape[0] != B or k.shape[3] != D or v.shape != k.shape:
        raise ValueError(f"k and v must both be [B={B}, Hkv, Lk, D={D}]: {shapes}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query heads Hq={Hq} must be a multiple of key/value heads Hkv={Hkv}: {shapes}")
    if prefix_k.shape[1] != Hkv or prefix_k.shape[3] != D or prefix_v.shape != prefix_k.shape:
        raise ValueError(f"prefix_k and prefix_v must both be [T, Hkv={Hkv}, P, D={D}]: {shapes}")
    C.same_dtype("q", q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v)
    C.same_device("q", q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v, prefix_index=prefix_index,
                  prefix_lens=prefix_lens, key_padding_mask=key_padding_mask)
    T, P = prefix_k.shape[0], prefix_k.shape[2]
    C.bank_index("prefix_index", prefix_index, B, T, f"prefix_k {C.shape_of(prefix_k)}", True)
    C.lengths("prefix_lens", prefix_lens, T, P, f"prefix length P = {P}", True)
    if key_padding_mask is not None:
        C.tensor("key_padding_mask", key_padding_mask, 2, (torch.bool,), f"[B={B}, Lk={Lk}]")
        if tuple(key_padding_mask.shape) != (B, Lk):
            raise ValueError(f"key_padding_mask must be [B={B}, Lk={Lk}], got {C.shape_of(key_padding_mask)}")
