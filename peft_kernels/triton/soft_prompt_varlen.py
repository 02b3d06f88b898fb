"""Triton kernels for the packed (varlen) soft-prompt ops (jit kernels + launchers only).

Registered as the ``triton`` backend of ``soft_prompt_embed_varlen``, ``soft_prompt_concat_varlen``
and their backward ops; every launcher takes exactly the reference function's positional
arguments and returns what it returns (see ``peft_kernels.reference``).

Kernels:

* ``_fwd_kernel``: one program per (block of output rows, H block). Each row finds its sequence by
  a binary search of ``cu_seqlens_out`` (in the kernel: no index tensor is built), then copies its
  prompt slot (the first rows of the sequence) or its token (``embeds[i]`` or
  ``weight[input_ids[i]]``) once. A sequence's prompt length is read off the two boundary arrays,
  so ``prompt_lens`` is not needed here.
* ``_token_rows_kernel``: the output row of every token (binary search of ``cu_seqlens``), and for
  concat the gather ``dembeds[i] = grad_out[row(i)]``.
* ``_segment_sum_kernel``: one program per (segment, slot, H block) sums, in fp32 (fp64 for fp64)
  and in order, ``grad_out[base[key] + slot]`` over the keys of the segment. dprompts: segment =
  bank entry, keys = its sequences ascending (a stable ``torch.sort`` of the index and
  ``torch.searchsorted`` starts), base = ``cu_seqlens_out``; dweight: segment = token id, keys = its
  tokens in order, base = the token rows, one slot. Every row is written once (zeros for slots past
  ``prompt_lens`` and unused segments): no memset, no atomics, deterministic, no host sync.

Ids and indices may be int32 or int64; row offsets are int64. The last dim must be contiguous (the
launchers make it so; row strides are passed through).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ops._dispatch import register
from ._common import INTERPRET, MODE_EXPLICIT, MODE_SHARED, index_mode, on_tensor_device, sort_segments
from .soft_prompt import _acc_zeros, _blocking, _rows_last_contig, _segment_range, _split_for_parallelism

__all__ = [
    "soft_prompt_embed_varlen",
    "soft_prompt_concat_varlen",
    "soft_prompt_embed_varlen_backward",
    "soft_prompt_concat_varlen_backward",
]

# --------------------------------------------------------------------------- jit kernels


@triton.jit
def _sequence_of(bounds_ptr, rows, S, steps):
    """The largest s in [0, S) with bounds[s] <= rows (elementwise): the sequence holding each row.

    ``steps`` >= ceil(log2(S)) halvings; empty sequences (equal bounds) are skipped because the
    search keeps the last sequence starting at or before the row.
    """
    lo = rows * 0
    hi = lo + (S - 1)
    for _ in range(steps):
        mid = (lo + hi + 1) // 2
        go = tl.load(bounds_ptr + mid) <= rows
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid - 1)
    return lo


@triton.jit
def _fwd_kernel(
    out_ptr, src_ptr, ids_ptr, prompts_ptr, index_ptr, cu_ptr, cu_out_ptr,
    total, S, H, steps,
    stride_o, stride_s, stride_pt, stride_pp,
    FROM_IDS: tl.constexpr, MODE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """out[rows, cols] for one block of output rows and one block of H.

    FROM_IDS: src is the table ``weight [V, H]`` and token i's row is ``input_ids[i]``; else src is
    ``embeds [N, H]``. Both read with row stride ``stride_s``.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < total
    s = _sequence_of(cu_out_ptr, rows, S, steps)
    o0 = tl.load(cu_out_ptr + s).to(tl.int64)
    o1 = tl.load(cu_out_ptr + s + 1).to(tl.int64)
    c0 = tl.load(cu_ptr + s).to(tl.int64)
    c1 = tl.load(cu_ptr + s + 1).to(tl.int64)
    plen = (o1 - o0) - (c1 - c0)
    off = rows - o0
    is_prompt = off < plen
    if MODE == MODE_EXPLICIT:
        t = tl.maximum(tl.load(index_ptr + s, mask=rmask, other=0).to(tl.int64), 0)
    elif MODE == MODE_SHARED:
        t = s * 0
    else:
        t = s
    tok = tl.where(is_prompt, 0, c0 + off - plen)
    if FROM_IDS:
        tok = tl.load(ids_ptr + tok, mask=rmask & ~is_prompt, other=0).to(tl.int64)
    # One source row per output row (prompts and src share the dtype): one load per element.
    row_src = tl.where(is_prompt, prompts_ptr + t * stride_pt + tl.where(is_prompt, off, 0) * stride_pp,
                       src_ptr + tok * stride_s)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = rmask[:, None] & (cols < H)[None, :]
    vals = tl.load(row_src[:, None] + cols[None, :], mask=mask)
    tl.store(out_ptr + (rows * stride_o)[:, None] + cols[None, :], vals.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _token_rows_kernel(
    rows_ptr, de_ptr, g_ptr, cu_ptr, cu_out_ptr,
    N, S, H, steps,
    stride_d, stride_g,
    WRITE_ROWS: tl.constexpr, GATHER: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """row(i) = i + cu_out[s + 1] - cu[s + 1] for the tokens i of one block (s = i's sequence);
    WRITE_ROWS stores it (H block 0 only), GATHER writes dembeds[i, cols] = grad_out[row(i), cols]."""
    toks = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    tmask = toks < N
    s = _sequence_of(cu_ptr, toks, S, steps)
    row = toks + tl.load(cu_out_ptr + s + 1).to(tl.int64) - tl.load(cu_ptr + s + 1).to(tl.int64)
    if WRITE_ROWS:
        tl.store(rows_ptr + toks, row, mask=tmask & (tl.program_id(1) == 0))
    if GATHER:
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = tmask[:, None] & (cols < H)[None, :]
        vals = tl.load(g_ptr + (row * stride_g)[:, None] + cols[None, :], mask=mask)
        tl.store(de_ptr + (toks * stride_d)[:, None] + cols[None, :], vals, mask=mask)


@triton.jit
def _segment_sum_kernel(
    dst_ptr, g_ptr, order_ptr, starts_ptr, base_ptr, lens_ptr,
    count, H, P,
    stride_g, stride_dt, stride_dp,
    MODE: tl.constexpr, HAS_LENS: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """dst[seg, p, cols] = sum over the keys k of segment seg (in order) of grad_out[base[k] + p, cols].

    MODE_EXPLICIT: keys order[starts[seg]:starts[seg + 1]]; MODE_SHARED: keys 0..count-1 (one
    segment); MODE_PER_ROW: key seg alone. Slots p >= lens[seg] get zero.
    """
    pid = tl.program_id(0)
    seg = pid // P
    p = pid - seg * P
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = cols < H
    start, end = _segment_range(starts_ptr, lens_ptr, seg, p, count, MODE, HAS_LENS)
    acc = _acc_zeros(BLOCK_H, ACC_FP64)
    for i in range(start, end):
        if MODE == MODE_EXPLICIT:
            key = tl.load(order_ptr + i)
        else:
            key = i
        row = tl.load(base_ptr + key).to(tl.int64) + p
        acc += tl.load(g_ptr + row * stride_g + cols, mask=hmask, other=0.0).to(acc.dtype)
    dst = dst_ptr + seg.to(tl.int64) * stride_dt + p.to(tl.int64) * stride_dp + cols
    tl.store(dst, acc.to(dst_ptr.dtype.element_ty), mask=hmask)


# --------------------------------------------------------------------------- launch helpers


def _steps(S: int) -> int:
    """Binary-search halvings that find a row's sequence among S."""
    return max(S - 1, 0).bit_length()


def _row_tile(block_h: int, elem_size: int, device: torch.device) -> tuple[int, int]:
    """(rows per program, num_warps) of the row-copy kernels: ~8 KiB tiles, ~32 bytes per thread on a
    GPU; 64 rows under the interpreter (few programs)."""
    if INTERPRET and device.type != "cuda":
        return 64, 1
    row_bytes = block_h * elem_size
    rows = min(32, triton.next_power_of_2(max(1, 8192 // row_bytes)))
    return rows, max(1, min(8, rows * row_bytes // 1024))


def _forward(src: Tensor, ids: Optional[Tensor], prompts: Tensor, cu_seqlens: Tensor, cu_seqlens_out: Tensor,
             total_out: int, prompt_index: Optional[Tensor]) -> Tensor:
    """[total_out, H] in src's dtype: each sequence's prompt rows, then its token rows of src
    (``embeds [N, H]``, or ``weight [V, H]`` gathered by ``ids [N]``)."""
    src = _rows_last_contig(src)
    out = torch.empty(total_out, src.shape[1], dtype=src.dtype, device=src.device)
    total, H = out.shape
    if out.numel() == 0:
        return out
    prompts = _rows_last_contig(prompts)
    S = cu_seqlens.shape[0] - 1
    index = prompt_index.contiguous() if prompt_index is not None else cu_seqlens
    block, _ = _blocking(H, out.element_size(), out.device)
    rows, warps = _row_tile(block, out.element_size(), out.device)
    grid = (triton.cdiv(total, rows), triton.cdiv(H, block))
    _fwd_kernel[grid](
        out, src, ids if ids is not None else src, prompts, index, cu_seqlens.contiguous(), cu_seqlens_out.contiguous(),
        total, S, H, _steps(S),
        out.stride(0), src.stride(0), prompts.stride(0), prompts.stride(1),
        FROM_IDS=ids is not None, MODE=index_mode(prompt_index, prompts.shape[0]),
        BLOCK_R=rows, BLOCK_H=block, num_warps=warps,
    )
    return out


def _token_rows(grad_out: Tensor, cu_seqlens: Tensor, cu_seqlens_out: Tensor, num_tokens: int,
                rows: Optional[Tensor], dembeds: Optional[Tensor]) -> None:
    """Fill ``rows`` [N] int64 (the output row of each token) and/or ``dembeds`` [N, H] (their grads)."""
    N, H = num_tokens, grad_out.shape[1]
    if N == 0 or (rows is None and (dembeds is None or H == 0)):
        return
    S = cu_seqlens.shape[0] - 1
    block, _ = _blocking(H, grad_out.element_size(), grad_out.device)
    per, warps = _row_tile(block, grad_out.element_size(), grad_out.device)
    h_blocks = triton.cdiv(H, block) if dembeds is not None else 1
    _token_rows_kernel[(triton.cdiv(N, per), max(h_blocks, 1))](
        rows if rows is not None else cu_seqlens, dembeds if dembeds is not None else grad_out, grad_out,
        cu_seqlens.contiguous(), cu_seqlens_out.contiguous(),
        N, S, H, _steps(S),
        dembeds.stride(0) if dembeds is not None else 0, grad_out.stride(0),
        WRITE_ROWS=rows is not None, GATHER=dembeds is not None, BLOCK_R=per, BLOCK_H=block, num_warps=warps,
    )


def _segment_sums(dst: Tensor, grad_out: Tensor, order: Tensor, starts: Tensor, base: Tensor,
                  lens: Optional[Tensor], count: int, mode: int) -> Tensor:
    """dst [segments, P, H] from grad_out [total, H] (see ``_segment_sum_kernel``)."""
    segments, P, H = dst.shape
    if dst.numel() == 0:
        return dst
    block, _ = _blocking(H, grad_out.element_size(), grad_out.device)
    block, warps = _split_for_parallelism(block, segments * P, H, grad_out.element_size(), grad_out.device)
    _segment_sum_kernel[(segments * P, triton.cdiv(H, block))](
        dst, grad_out, order, starts, base, lens if lens is not None else base,
        count, H, P,
        grad_out.stride(0), dst.stride(0), dst.stride(1),
        MODE=mode, HAS_LENS=lens is not None, ACC_FP64=grad_out.dtype == torch.float64,
        BLOCK_H=block, num_warps=warps,
    )
    return dst


def _prompt_grads(grad_out: Tensor, cu_seqlens: Tensor, cu_seqlens_out: Tensor, num_prompts: int, prompt_len: int,
                  prompt_index: Optional[Tensor], prompt_lens: Optional[Tensor]) -> Tensor:
    S = cu_seqlens.shape[0] - 1
    dprompts = torch.empty(num_prompts, prompt_len, grad_out.shape[1], dtype=grad_out.dtype, device=grad_out.device)
    mode = index_mode(prompt_index, num_prompts)
    if mode == MODE_EXPLICIT.value:
        order, starts = sort_segments(prompt_index, num_prompts)
    else:
        order = starts = cu_seqlens  # unused
    lens = prompt_lens.to(grad_out.device).contiguous() if prompt_lens is not None else None
    return _segment_sums(dprompts, grad_out, order, starts, cu_seqlens_out.contiguous(), lens, S, mode)


# --------------------------------------------------------------------------- launchers


@on_tensor_device
def soft_prompt_concat_varlen(
    embeds: Tensor,
    prompts: Tensor,
    cu_seqlens: Tensor,
    cu_seqlens_out: Tensor,
    total_out: int,
    prompt_index: Optional[Tensor] = None,
    prompt_lens: Optional[Tensor] = None,
) -> Tensor:
    """Triton ``reference.soft_prompt_concat_varlen``: [total_out, H] (prompt lengths read off the bounds)."""
    return _forward(embeds, None, prompts, cu_seqlens, cu_seqlens_out, total_out, prompt_index)


@on_tensor_device
def soft_prompt_embed_varlen(
    input_ids: Tensor,
    weight: Tensor,
    prompts: Tensor,
    cu_seqlens: Tensor,
    cu_seqlens_out: Tensor,
    total_out: int,
    prompt_index: Optional[Tensor] = None,
    prompt_lens: Optional[Tensor] = None,
) -> Tensor:
    """Triton ``reference.soft_prompt_embed_varlen``: token rows gathered from ``weight``, prompts in front."""
    return _forward(weight, input_ids.contiguous(), prompts, cu_seqlens, cu_seqlens_out, total_out, prompt_index)


@on_tensor_device
def soft_prompt_concat_varlen_backward(
    grad_out: Tensor,
    cu_seqlens: Tensor,
    cu_seqlens_out: Tensor,
    num_tokens: int,
    num_prompts: int,
    prompt_len: int,
    prompt_index: Optional[Tensor] = None,
    prompt_lens: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Triton ``reference.soft_prompt_concat_varlen_backward``: (dembeds, dprompts) in grad_out's dtype."""
    grad_out = _rows_last_contig(grad_out)
    dembeds = torch.empty(num_tokens, grad_out.shape[1], dtype=grad_out.dtype, device=grad_out.device)
    _token_rows(grad_out, cu_seqlens, cu_seqlens_out, num_tokens, None, dembeds)
    dprompts = _prompt_grads(grad_out, cu_seqlens, cu_seqlens_out, num_prompts, prompt_len, prompt_index, prompt_lens)
    return dembeds, dprompts


@on_tensor_device
def soft_prompt_embed_varlen_backward(
    grad_out: Tensor,
    input_ids: Tensor,
    cu_seqlens: Tensor,
    cu_seqlens_out: Tensor,
    vocab_size: int,
    num_prompts: int,
    prompt_len: int,
    prompt_index: Optional[Tensor] = None,
    prompt_lens: Optional[Tensor] = None,
    need_dweight: bool = True,
) -> tuple[Tensor, Tensor]:
    """Triton ``reference.soft_prompt_embed_varlen_backward``: (dweight [V, H] or [0, H], dprompts)."""
    grad_out = _rows_last_contig(grad_out)
    H = grad_out.shape[1]
    dprompts = _prompt_grads(grad_out, cu_seqlens, cu_seqlens_out, num_prompts, prompt_len, prompt_index, prompt_lens)
    if not need_dweight:
        return grad_out.new_zeros(0, H), dprompts
    dweight = torch.empty(vocab_size, 1, H, dtype=grad_out.dtype, device=grad_out.device)
    N = input_ids.shape[0]
    if N == 0:
        return dweight.zero_().view(vocab_size, H), dprompts
    rows = torch.empty(N, dtype=torch.int64, device=grad_out.device)
    _token_rows(grad_out, cu_seqlens, cu_seqlens_out, N, rows, None)
    order, starts = sort_segments(input_ids, vocab_size)
    _segment_sums(dweight, grad_out, order, starts, rows, None, N, MODE_EXPLICIT.value)
    return dweight.view(vocab_size, H), dprompts


for _op, _fn in (
    ("soft_prompt_embed_varlen", soft_prompt_embed_varlen),
    ("soft_prompt_concat_varlen", soft_prompt_concat_varlen),
    ("soft_prompt_embed_varlen_backward", soft_prompt_embed_varlen_backward),
    ("soft_prompt_concat_varlen_backward", soft_prompt_concat_varlen_backward),
):
    register(_op, "triton", _fn)
