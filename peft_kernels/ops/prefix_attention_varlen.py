"""``prefix_attention_varlen``: ``prefix_attention`` over packed sequences (FlashAttention's varlen layout).

Validation -> backend dispatch -> autograd registration. Sequence s owns the query rows
``cu_seqlens_q[s]:cu_seqlens_q[s+1]`` and the key rows ``cu_seqlens_k[s]:cu_seqlens_k[s+1]``; its
prefix is read straight from the bank ``[T, Hkv, P, D]`` (never concatenated, never copied).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from . import _checks as C
from ._dispatch import call, kernels, register, register_native, select
from .prefix_attention import (check_bank_args, check_heads_and_bank, check_operands, fake_contiguous_grads,
                               native_backward_supports, native_supports, register_attention_autograd,
                               without_out_lse)


@torch.library.custom_op("peft_kernels::prefix_attention_varlen", mutates_args=())
def _varlen_op(
    q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
    max_seqlen_q: int, max_seqlen_k: int, prefix_index: Optional[Tensor], prefix_lens: Optional[Tensor],
    causal: bool, softmax_scale: float,
) -> tuple[Tensor, Tensor]:
    args = (q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, prefix_index,
            prefix_lens, causal, softmax_scale)
    return select("prefix_attention_varlen", q.device, *args)[1](*args)


def _fake_forward(q, k, v, prefix_k, prefix_v, *rest):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


_varlen_op.register_fake(_fake_forward)


@torch.library.custom_op("peft_kernels::prefix_attention_varlen_backward", mutates_args=())
def _varlen_backward_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, prefix_index: Optional[Tensor],
    prefix_lens: Optional[Tensor], causal: bool, softmax_scale: float, out: Tensor, lse: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    args = (grad_out, q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            prefix_index, prefix_lens, causal, softmax_scale, out, lse)
    return select("prefix_attention_varlen_backward", q.device, *args)[1](*args)


_varlen_backward_op.register_fake(fake_contiguous_grads)
register_attention_autograd(_varlen_op, _varlen_backward_op)


register("prefix_attention_varlen", "reference", reference.prefix_attention_varlen)
register("prefix_attention_varlen_backward", "reference", without_out_lse(reference.prefix_attention_varlen_backward))

register_native("prefix_attention_varlen", "prefix_flash_varlen_fwd", supports=native_supports)
register_native("prefix_attention_varlen_backward", "prefix_flash_varlen_bwd", supports=native_backward_supports)
if "cpp" in kernels("prefix_attention_varlen"):
    torch.library.register_fake("peft_kernels::prefix_flash_varlen_fwd", _fake_forward)
    torch.library.register_fake("peft_kernels::prefix_flash_varlen_bwd", fake_contiguous_grads)


def prefix_attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    *,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    prefix_index: Optional[Tensor] = None,
    prefix_lens: Optional[Tensor] = None,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
    validate: bool = True,
):
    """Fused attention over [the sequence's prefix keys ; the sequence's own keys] for packed sequences.

    Shapes: q [Nq, Hq, D]; k, v [Nk, Hkv, D] with Hq % Hkv == 0; prefix_k, prefix_v [T, Hkv, P, D];
    cu_seqlens_q, cu_seqlens_k [S + 1] int32 (0, non-decreasing, ending at Nq / Nk; a sequence may be
    empty); max_seqlen_q / max_seqlen_k Python ints >= every sequence's query / key count;
    prefix_index [S] int32/int64 or None (T == 1 shared, or T == S); prefix_lens [T] (<= P) or None.
    q, k, v may have any token and head strides (e.g. ``x[0].transpose(0, 1)`` of a [1, H, N, D]
    tensor) and are read through them; a tensor whose last stride is not 1 is copied first.
    Returns out [Nq, Hq, D] in q's dtype (contiguous), and lse [Hq, Nq] fp32 if ``return_lse``.

    Semantics: query i of sequence s sees prefix slot p iff p < prefix_lens[t] (t = the sequence's
    entry; none if -1) and key j of s iff not causal or j <= i + Lk_s - Lq_s (bottom-right aligned per
    sequence: decode with Lq_s = 1 sees every key); nothing crosses sequences. Scale defaults to
    D**-0.5; softmax in fp32 (fp64 for fp64); a query with no visible key gets 0 (lse -inf).
    Backward gives dq, dk, dv, dprefix_k, dprefix_v (prefix grads summed over every sequence and query
    head that used the entry, deterministically); lse is not differentiable. ``validate=False``
    trusts the caller completely (no checks, no host reads: what model code does per layer).
    """
    if validate:
        _check(q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, prefix_index,
               prefix_lens)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    scale = float(q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale)
    args = (q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, _launch_size(max_seqlen_q),
            _launch_size(max_seqlen_k), prefix_index, prefix_lens, bool(causal), scale)
    out, lse = call("prefix_attention_varlen", _varlen_op, args, q.device, (q, k, v, prefix_k, prefix_v))
    return (out, lse) if return_lse else out


def _launch_size(n):
    # A SymInt stays symbolic under torch.compile (no recompile per decode step's max_seqlen_k).
    return n if isinstance(n, torch.SymInt) else int(n)


def _check(q, k, v, prefix_k, prefix_v, cu_q, cu_k, max_q, max_k, prefix_index, prefix_lens) -> None:
    check_operands(q, k, v, prefix_k, prefix_v, 3, "[Nq, Hq, D]", "[Nk, Hkv, D]")
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        C.tensor(name, cu, 1, (torch.int32,), "[S + 1]")
    for name, t in (("prefix_index", prefix_index), ("prefix_lens", prefix_lens)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    Nq, Hq, D = q.shape
    Nk, Hkv = k.shape[0], k.shape[1]
    check_heads_and_bank(q, k, v, prefix_k, prefix_v, Hq, Hkv, D, k.shape[2] == D and v.shape == k.shape,
                         f"[Nk, Hkv, D={D}]")
    C.same_device("q", q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                  prefix_index=prefix_index, prefix_lens=prefix_lens)
    if cu_q.shape[0] == 0 or cu_k.shape != cu_q.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must both be [S + 1] (S >= 0), got "
                         f"{C.shape_of(cu_q)} and {C.shape_of(cu_k)}")
    S = cu_q.shape[0] - 1
    _seqlens("q", cu_q, Nq, max_q)
    _seqlens("k", cu_k, Nk, max_k)
    check_bank_args(prefix_index, prefix_lens, prefix_k, S)


def _seqlens(side: str, cu: Tensor, total: int, max_len) -> None:
    """Check cu_seqlens_<side> against the packed tensor's ``total`` rows and max_seqlen_<side>."""
    name, max_name = f"cu_seqlens_{side}", f"max_seqlen_{side}"
    if isinstance(max_len, bool) or not isinstance(max_len, (int, torch.SymInt)):
        raise TypeError(f"{max_name} must be a Python int, got {type(max_len).__name__}")
    if not C.host_checks_enabled(True):
        return
    if max_len < 0:
        raise ValueError(f"{max_name} must be >= 0, got {max_len}")
    values = cu.tolist()
    lens = [b - a for a, b in zip(values, values[1:])]
    if values[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {values[0]} ({name} shape {C.shape_of(cu)})")
    if any(n < 0 for n in lens):
        s = next(i for i, n in enumerate(lens) if n < 0)
        raise ValueError(f"{name} must be non-decreasing, but {name}[{s + 1}] = {values[s + 1]} < "
                         f"{name}[{s}] = {values[s]}")
    if values[-1] != total:
        raise ValueError(f"{name}[-1] = {values[-1]} must equal the packed {side}'s rows {total} "
                         f"({name} shape {C.shape_of(cu)})")
    longest = max(lens, default=0)
    if longest > max_len:
        raise ValueError(f"{max_name} = {max_len} is below the longest sequence's length {longest} ({name})")
