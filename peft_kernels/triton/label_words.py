"""Triton forward of ``label_word_logits`` (KPT verbalizer head): streaming vocabulary normaliser.

Two kernels. ``_vocab_lse_kernel`` computes each row's logsumexp over the vocabulary in tiles of
BLOCK_V head rows (tl.dot over BLOCK_H chunks of the hidden size, an online max/sum across
tiles); the vocabulary is split across SPLITS programs per row block and their partial
logsumexps are combined afterwards, so no ``[N, V]`` logits exist. ``_class_kernel`` then reads
each class's label-word rows of the head (gathered by token id), forms the calibrated, weighted
log-probabilities and reduces them per class with a running logsumexp.

fp32 operands use ``tl.dot`` in IEEE precision (no TF32 rounding); fp16/bf16 use native dots with
fp32 accumulation. fp64 is refused (``supports``), so the dispatcher falls back to the next
backend. The backward has no Triton kernel: it runs on the next backend (``cpp`` for CPU
tensors, the streaming ``reference`` for CUDA tensors), which never materialises ``[N, V]`` either.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import reference
from ..ops._dispatch import register
from ._common import INTERPRET, on_tensor_device, sm_count


@triton.jit
def _vocab_lse_kernel(
    h_ptr, w_ptr, b_ptr, part_ptr,
    N, V, H, tiles_per_split,
    stride_hn, stride_wv,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    v_start = split * tiles_per_split * BLOCK_V
    v_stop = tl.minimum(V, v_start + tiles_per_split * BLOCK_V)
    for v0 in range(v_start, v_stop, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < v_stop
        z = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for k0 in range(0, H, BLOCK_H):
            offs_k = k0 + tl.arange(0, BLOCK_H)
            k_ok = offs_k < H
            h = tl.load(h_ptr + offs_n[:, None] * stride_hn + offs_k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)
            w = tl.load(w_ptr + offs_v[:, None] * stride_wv + offs_k[None, :], mask=v_ok[:, None] & k_ok[None, :],
                        other=0.0)
            if IEEE:
                z = tl.dot(h, tl.trans(w), z, input_precision="ieee")
            else:
                z = tl.dot(h, tl.trans(w), z)
        if HAS_BIAS:
            z += tl.load(b_ptr + offs_v, mask=v_ok, other=0.0).to(tl.float32)[None, :]
        z = tl.where(v_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift[:, None]), axis=1)
        m = m_new
    lse = tl.where(s > 0, tl.log(s) + m, float("-inf"))
    tl.store(part_ptr + split * N + offs_n, lse, mask=row_ok)


@triton.jit
def _class_kernel(
    h_ptr, w_ptr, b_ptr, ids_ptr, offsets_ptr, mix_ptr, lse_ptr, y_ptr,
    N, H, C,
    stride_hn, stride_wv,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_n = tl.program_id(0)
    c = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    lse = tl.load(lse_ptr + offs_n, mask=row_ok, other=0.0)
    start = tl.load(offsets_ptr + c).to(tl.int32)
    stop = tl.load(offsets_ptr + c + 1).to(tl.int32)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    for w in range(start, stop):
        tok = tl.load(ids_ptr + w).to(tl.int64)
        z = tl.zeros([BLOCK_N], tl.float32)
        for k0 in range(0, H, BLOCK_H):
            offs_k = k0 + tl.arange(0, BLOCK_H)
            k_ok = offs_k < H
            h = tl.load(h_ptr + offs_n[:, None] * stride_hn + offs_k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0).to(tl.float32)
            row = tl.load(w_ptr + tok * stride_wv + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            z += tl.sum(h * row[None, :], axis=1)
        if HAS_BIAS:
            z += tl.load(b_ptr + tok).to(tl.float32)
        logit = z - lse + tl.load(mix_ptr + w)
        m_new = tl.maximum(m, logit)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.exp(logit - shift)
        m = m_new
    y = tl.where(s > 0, tl.log(s) + m, float("-inf"))
    tl.store(y_ptr + offs_n * C + c, y.to(y_ptr.dtype.element_ty), mask=row_ok)


def _blocks(N: int, H: int) -> tuple[int, int, int]:
    block_n = 16 if INTERPRET else max(16, min(64, triton.next_power_of_2(max(N, 1))))
    block_v = 32 if INTERPRET else 128
    block_h = max(16, min(64, triton.next_power_of_2(H)))
    return block_n, block_v, block_h


@on_tensor_device
def label_word_logits(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], word_ids: Tensor,
                      class_offsets: Tensor, word_weights: Optional[Tensor],
                      calibration: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Triton launcher of the op (same arguments and results as ``reference.label_word_logits``).

    Shapes: hidden [N, H]; weight [V, H]; bias [V] or None; word_ids [W]; class_offsets [C+1];
    word_weights, calibration [W] or None. Returns (y [N, C] in hidden's dtype, lse [N] fp32).
    Semantics: the reference's; the normaliser is streamed over vocabulary tiles.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    C = class_offsets.shape[0] - 1
    hidden = hidden.contiguous()
    weight = weight.contiguous()
    block_n, block_v, block_h = _blocks(N, H)
    tiles = triton.cdiv(V, block_v)
    row_blocks = triton.cdiv(max(N, 1), block_n)
    splits = 2 if INTERPRET else max(1, min(tiles, (4 * sm_count(hidden.device)) // row_blocks))
    tiles_per_split = triton.cdiv(tiles, splits)
    splits = triton.cdiv(tiles, tiles_per_split)
    partial = torch.empty(splits, N, dtype=torch.float32, device=hidden.device)
    y = torch.empty(N, C, dtype=hidden.dtype, device=hidden.device)
    if N == 0:
        return y, partial.new_empty(0)
    b = bias if bias is not None else weight
    _vocab_lse_kernel[(row_blocks, splits)](
        hidden, weight, b, partial, N, V, H, tiles_per_split, hidden.stride(0), weight.stride(0),
        HAS_BIAS=bias is not None, IEEE=hidden.dtype == torch.float32,
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h,
    )
    lse = torch.logsumexp(partial, dim=0)
    classes = reference._word_classes(class_offsets, word_ids.shape[0])
    mix, _ = reference._word_log_mix(classes, class_offsets, word_weights, calibration, torch.float32)
    _class_kernel[(row_blocks, C)](
        hidden, weight, b, word_ids.contiguous(), class_offsets.contiguous(), mix.contiguous(), lse, y, N, H, C,
        hidden.stride(0), weight.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_H=block_h,
    )
    return y, lse


def _supports(hidden, weight, *args) -> Optional[str]:
    if hidden.dtype == torch.float64:
        return "fp64: tl.dot has no fp64 path here; the next backend runs it"
    return None


register("label_word_logits", "triton", label_word_logits, supports=_supports)
