"""Triton kernels for the soft-prompt ops (jit kernels + launchers only).

Registered as the ``triton`` backend of ``soft_prompt_embed``, ``soft_prompt_concat`` and
their backward ops; every launcher takes exactly the reference function's positional
arguments and returns what it returns (see ``peft_kernels.reference``).

Kernels:

* ``_fwd_kernel``: one program per (output row, H block) writes that output row once: a
  prompt slot copies the row's prompt (zeros for ``-1`` rows and slots past ``prompt_lens``),
  a token slot copies ``embeds[b, j]`` (concat) or ``weight[input_ids[b, j]]`` (embed).
* ``_dembeds_kernel``: ``grad_out`` without the prompt slots (zeros there with ``replace``).
* ``_dprompts_kernel``: one program per (entry t, slot p, H block) sums, in fp32 and in row
  order, the prompt-slot grads of the rows using ``t``. With an explicit index the rows are
  found through a stable ``torch.sort`` of the index and ``torch.searchsorted`` segment starts
  (both on the device: no host sync, no float atomics: deterministic).
* ``_dweight_kernel``: one program per (vocab row v, H block) sums the grads of the tokens
  with id ``v`` (stable sort of the ids, segment starts per id) and writes every row of
  ``dweight`` exactly once (zeros for unused ids): no memset, no atomics, deterministic.

``prompt_index=None`` never materialises an index: a constexpr mode says "shared" (T == 1,
every row uses entry 0) or "per row" (T == B, row b uses entry b). Ids and indices may be
int32 or int64; row offsets are computed in int64. Accumulation is fp32 (fp64 for fp64).
Works for fp16, bf16, fp32 and fp64 tensors; the last dim must be contiguous (the launchers
make it so; other strides are passed through).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ops._dispatch import register
from ._common import INTERPRET, MODE_EXPLICIT, MODE_SHARED, index_mode, on_tensor_device, sort_segments

__all__ = [
    "soft_prompt_embed",
    "soft_prompt_concat",
    "soft_prompt_embed_backward",
    "soft_prompt_concat_backward",
]

# --------------------------------------------------------------------------- jit kernels


@triton.jit
def _segment_range(starts_ptr, lens_ptr, seg, p, count, MODE: tl.constexpr, HAS_LENS: tl.constexpr):
    """[start, end) of the keys summed into slot ``p`` of segment ``seg``: MODE_EXPLICIT
    starts[seg]..starts[seg + 1]; MODE_SHARED 0..count (one segment); MODE_PER_ROW key seg alone.
    HAS_LENS: empty for slots p >= lens[seg]."""
    if MODE == MODE_EXPLICIT:
        start = tl.load(starts_ptr + seg)
        end = tl.load(starts_ptr + seg + 1)
    elif MODE == MODE_SHARED:
        start = seg * 0
        end = start + count
    else:
        start = seg
        end = seg + 1
    if HAS_LENS:
        end = tl.where(p < tl.load(lens_ptr + seg), end, start)
    return start, end


@triton.jit
def _acc_zeros(BLOCK_H: tl.constexpr, ACC_FP64: tl.constexpr):
    """A [BLOCK_H] accumulator of zeros: fp64 (for fp64 inputs) or fp32."""
    if ACC_FP64:
        acc = tl.zeros([BLOCK_H], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    return acc


@triton.jit
def _fwd_kernel(
    out_ptr, src_ptr, ids_ptr, prompts_ptr, index_ptr, lens_ptr,
    S, H, P, insert_at,
    stride_ob, stride_os,
    stride_sb, stride_ss,
    stride_ib, stride_il,
    stride_pt, stride_pp,
    FROM_IDS: tl.constexpr, REPLACE: tl.constexpr, MODE: tl.constexpr, HAS_LENS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """out[b, s, cols] for one output row (b, s) and one block of H.

    FROM_IDS: src is the embedding table ``weight [V, H]`` (row stride ``stride_sb``) and the
    token row is ``input_ids[b, j]``; else src is ``embeds [B, L, H]``.
    """
    row = tl.program_id(0)
    b = row // S
    s = row - b * S
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = cols < H
    b64 = b.to(tl.int64)
    out_ptrs = out_ptr + b64 * stride_ob + s.to(tl.int64) * stride_os + cols
    p = s - insert_at
    if (p >= 0) & (p < P):
        if MODE == MODE_EXPLICIT:
            t = tl.load(index_ptr + b).to(tl.int64)
        elif MODE == MODE_SHARED:
            t = b64 * 0
        else:
            t = b64
        ok = t >= 0
        t = tl.maximum(t, 0)
        if HAS_LENS:
            ok = ok & (p < tl.load(lens_ptr + t))
        vals = tl.load(prompts_ptr + t * stride_pt + p.to(tl.int64) * stride_pp + cols, mask=hmask & ok, other=0.0)
        tl.store(out_ptrs, vals.to(out_ptr.dtype.element_ty), mask=hmask)
    else:
        if REPLACE:
            j = s
        else:
            j = tl.where(p < 0, s, s - P)
        if FROM_IDS:
            tok = tl.load(ids_ptr + b64 * stride_ib + j.to(tl.int64) * stride_il).to(tl.int64)
            src_ptrs = src_ptr + tok * stride_sb + cols
        else:
            src_ptrs = src_ptr + b64 * stride_sb + j.to(tl.int64) * stride_ss + cols
        vals = tl.load(src_ptrs, mask=hmask)
        tl.store(out_ptrs, vals.to(out_ptr.dtype.element_ty), mask=hmask)


@triton.jit
def _dembeds_kernel(
    dst_ptr, g_ptr,
    L, H, P, insert_at,
    stride_db, stride_dl,
    stride_gb, stride_gs,
    REPLACE: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """dembeds[b, j, cols]: the token slots of grad_out (zeros on the replaced slots)."""
    row = tl.program_id(0)
    b = row // L
    j = row - b * L
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = cols < H
    b64 = b.to(tl.int64)
    if REPLACE:
        s = j
        keep = (j < insert_at) | (j >= insert_at + P)
        vals = tl.load(g_ptr + b64 * stride_gb + s.to(tl.int64) * stride_gs + cols, mask=hmask & keep, other=0.0)
    else:
        s = tl.where(j < insert_at, j, j + P)
        vals = tl.load(g_ptr + b64 * stride_gb + s.to(tl.int64) * stride_gs + cols, mask=hmask)
    tl.store(dst_ptr + b64 * stride_db + j.to(tl.int64) * stride_dl + cols, vals.to(dst_ptr.dtype.element_ty), mask=hmask)


@triton.jit
def _dprompts_kernel(
    dp_ptr, g_ptr, order_ptr, starts_ptr, lens_ptr,
    B, H, P, insert_at,
    stride_gb, stride_gs,
    stride_dt, stride_dp,
    MODE: tl.constexpr, HAS_LENS: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """dprompts[t, p, cols] = sum over the rows b using t (in order) of grad_out[b, insert_at + p, cols].

    MODE_EXPLICIT: rows are order[starts[t]:starts[t + 1]] (stable sort of the index);
    MODE_SHARED: all rows (T == 1); MODE_PER_ROW: row t only (T == B). Slots p >= prompt_lens[t] get zero.
    """
    pid = tl.program_id(0)
    t = pid // P
    p = pid - t * P
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = cols < H
    start, end = _segment_range(starts_ptr, lens_ptr, t, p, B, MODE, HAS_LENS)
    acc = _acc_zeros(BLOCK_H, ACC_FP64)
    g_slot = g_ptr + (p + insert_at).to(tl.int64) * stride_gs + cols
    zero64 = t.to(tl.int64) * 0
    for i in range(start, end):
        if MODE == MODE_EXPLICIT:
            b = tl.load(order_ptr + i).to(tl.int64)
        else:
            b = i + zero64  # int64 row offsets (the loop variable is int32 or a Python int)
        acc += tl.load(g_slot + b * stride_gb, mask=hmask, other=0.0).to(acc.dtype)
    dst = dp_ptr + t.to(tl.int64) * stride_dt + p.to(tl.int64) * stride_dp + cols
    tl.store(dst, acc.to(dp_ptr.dtype.element_ty), mask=hmask)


@triton.jit
def _dweight_kernel(
    dw_ptr, g_ptr, order_ptr, starts_ptr,
    L, H, P, insert_at,
    stride_gb, stride_gs, stride_dv,
    ACC_FP64: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """dweight[v, cols] = sum (in token order) of the grads of the tokens whose id is v."""
    v = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = cols < H
    start = tl.load(starts_ptr + v)
    end = tl.load(starts_ptr + v + 1)
    acc = _acc_zeros(BLOCK_H, ACC_FP64)
    for i in range(start, end):
        pos = tl.load(order_ptr + i).to(tl.int64)  # flat token position b * L + j
        b = pos // L
        j = pos - b * L
        s = tl.where(j < insert_at, j, j + P)
        acc += tl.load(g_ptr + b * stride_gb + s * stride_gs + cols, mask=hmask, other=0.0).to(acc.dtype)
    tl.store(dw_ptr + v.to(tl.int64) * stride_dv + cols, acc.to(dw_ptr.dtype.element_ty), mask=hmask)


# --------------------------------------------------------------------------- launch helpers


def _blocking(H: int, elem_size: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_H, num_warps): ~4 KiB of the row per program on a GPU (16-byte vectors per thread);
    under the interpreter (CPU tensors) as few programs as possible."""
    h = triton.next_power_of_2(max(H, 1))
    if INTERPRET and device.type != "cuda":
        return min(h, 4096), 1
    block = min(h, max(128, 4096 // elem_size))
    warps = max(1, min(8, block * elem_size // 512))
    return block, warps


def _split_for_parallelism(block: int, rows: int, H: int, elem_size: int, device: torch.device) -> tuple[int, int]:
    """Halve BLOCK_H (down to 128) while a grid of ``rows`` x H-blocks has under ~1024 programs:
    the reduction kernels have few (entry, slot) rows when the bank is small."""
    if INTERPRET and device.type != "cuda":
        return block, 1
    while block > 128 and rows * triton.cdiv(H, block) < 1024:
        block //= 2
    return block, max(1, min(8, block * elem_size // 512))


def _rows_last_contig(t: Tensor) -> Tensor:
    """The tensor with a unit-stride last dim (other strides are passed to the kernels)."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _prompt_args(prompts: Tensor, prompt_index: Optional[Tensor], prompt_lens: Optional[Tensor]):
    """Prompts with unit last stride, the index / lens (contiguous; dummies when absent), mode flags."""
    prompts = _rows_last_contig(prompts)
    index = prompt_index.contiguous() if prompt_index is not None else prompts
    lens = prompt_lens.to(prompts.device).contiguous() if prompt_lens is not None else prompts
    return prompts, index, lens, index_mode(prompt_index, prompts.shape[0]), prompt_lens is not None


def _forward(out: Tensor, src: Tensor, ids: Optional[Tensor], prompts: Tensor, prompt_index, prompt_lens,
             insert_at: int, replace: bool) -> Tensor:
    B, S, H = out.shape
    if out.numel() == 0:
        return out
    prompts, index, lens, mode, has_lens = _prompt_args(prompts, prompt_index, prompt_lens)
    if ids is not None:
        stride_sb, stride_ss = src.stride(0), 0
        stride_ib, stride_il = ids.stride(0), ids.stride(1)
        ids_arg = ids
    else:
        stride_sb, stride_ss = src.stride(0), src.stride(1)
        stride_ib = stride_il = 0
        ids_arg = src
    block, warps = _blocking(H, out.element_size(), out.device)
    grid = (B * S, triton.cdiv(H, block))
    _fwd_kernel[grid](
        out, src, ids_arg, prompts, index, lens,
        S, H, prompts.shape[1], insert_at,
        out.stride(0), out.stride(1),
        stride_sb, stride_ss,
        stride_ib, stride_il,
        prompts.stride(0), prompts.stride(1),
        FROM_IDS=ids is not None, REPLACE=replace, MODE=mode, HAS_LENS=has_lens,
        BLOCK_H=block, num_warps=warps,
    )
    return out


def _prompt_grads(grad_out: Tensor, num_prompts: int, prompt_len: int, prompt_index, prompt_lens,
                  insert_at: int) -> Tensor:
    B, _, H = grad_out.shape
    T, P = num_prompts, prompt_len
    dprompts = torch.empty(T, P, H, dtype=grad_out.dtype, device=grad_out.device)
    if dprompts.numel() == 0:
        return dprompts
    if B == 0:
        return dprompts.zero_()
    mode = index_mode(prompt_index, T)
    if mode == MODE_EXPLICIT.value:
        order, starts = sort_segments(prompt_index, T)
    else:
        order = starts = grad_out  # unused
    lens = prompt_lens.to(grad_out.device).contiguous() if prompt_lens is not None else grad_out
    block, _ = _blocking(H, grad_out.element_size(), grad_out.device)
    block, warps = _split_for_parallelism(block, T * P, H, grad_out.element_size(), grad_out.device)
    grid = (T * P, triton.cdiv(H, block))
    _dprompts_kernel[grid](
        dprompts, grad_out, order, starts, lens,
        B, H, P, insert_at,
        grad_out.stride(0), grad_out.stride(1),
        dprompts.stride(0), dprompts.stride(1),
        MODE=mode, HAS_LENS=prompt_lens is not None, ACC_FP64=grad_out.dtype == torch.float64,
        BLOCK_H=block, num_warps=warps,
    )
    return dprompts


# --------------------------------------------------------------------------- launchers


@on_tensor_device
def soft_prompt_concat(
    embeds: Tensor,
    prompts: Tensor,
    prompt_index: Optional[Tensor] = None,
    prompt_lens: Optional[Tensor] = None,
    insert_at: int = 0,
    replace: bool = False,
) -> Tensor:
    """Triton ``reference.soft_prompt_concat``: [B, L + P, H] (or [B, L, H] with replace)."""
    B, L, H = embeds.shape
    P = prompts.shape[1]
    embeds = _rows_last_contig(embeds)
    out = torch.empty(B, L if replace else L + P, H, dtype=embeds.dtype, device=embeds.device)
    return _forward(out, embeds, None, prompts, prompt_index, prompt_lens, insert_at, replace)


@on_tensor_device
def soft_prompt_embed(
    input_ids: Tensor,
    weight: Tensor,
    prompts: Tensor,
    prompt_index: Optional[Tensor] = None,
    prompt_lens: Optional[Tensor] = None,
    insert_at: int = 0,
) -> Tensor:
    """Triton ``reference.soft_prompt_embed``: token rows gathered from ``weight``, prompts inserted."""
    B, L = input_ids.shape
    H = weight.shape[1]
    weight = _rows_last_contig(weight)
    out = torch.empty(B, L + prompts.shape[1], H, dtype=weight.dtype, device=weight.device)
    return _forward(out, weight, input_ids, prompts, prompt_index, prompt_lens, insert_at, False)


@on_tensor_device
def soft_prompt_concat_backward(
    grad_out: Tensor,
    num_prompts: int,
    prompt_len: int,
    prompt_index: Optional[Tensor] = None,
    prompt_lens: Optional[Tensor] = None,
    insert_at: int = 0,
    replace: bool = False,
) -> tuple[Tensor, Tensor]:
    """Triton ``reference.soft_prompt_concat_backward``: (dembeds, dprompts) in grad_out's dtype."""
    grad_out = _rows_last_contig(grad_out)
    B, S, H = grad_out.shape
    P = prompt_len
    L = S if replace else S - P
    dembeds = torch.empty(B, L, H, dtype=grad_out.dtype, device=grad_out.device)
    if dembeds.numel():
        block, warps = _blocking(H, grad_out.element_size(), grad_out.device)
        _dembeds_kernel[(B * L, triton.cdiv(H, block))](
            dembeds, grad_out,
            L, H, P, insert_at,
            dembeds.stride(0), dembeds.stride(1),
            grad_out.stride(0), grad_out.stride(1),
            REPLACE=replace, BLOCK_H=block, num_warps=warps,
        )
    dprompts = _prompt_grads(grad_out, num_prompts, P, prompt_index, prompt_lens, insert_at)
    return dembeds, dprompts


@on_tensor_device
def soft_prompt_embed_backward(
    grad_out: Tensor,
    input_ids: Tensor,
    vocab_size: int,
    num_prompts: int,
    prompt_index: Optional[Tensor] = None,
    prompt_lens: Optional[Tensor] = None,
    insert_at: int = 0,
    need_dweight: bool = True,
) -> tuple[Tensor, Tensor]:
    """Triton ``reference.soft_prompt_embed_backward``: (dweight [V, H] or [0, H], dprompts)."""
    grad_out = _rows_last_contig(grad_out)
    B, L = input_ids.shape
    _, S, H = grad_out.shape
    P = S - L
    dprompts = _prompt_grads(grad_out, num_prompts, P, prompt_index, prompt_lens, insert_at)
    if not need_dweight:
        return grad_out.new_zeros(0, H), dprompts
    dweight = torch.empty(vocab_size, H, dtype=grad_out.dtype, device=grad_out.device)
    if dweight.numel() == 0:
        return dweight, dprompts
    if B * L == 0:
        return dweight.zero_(), dprompts
    order, starts = sort_segments(input_ids.reshape(-1), vocab_size)
    block, warps = _blocking(H, grad_out.element_size(), grad_out.device)
    _dweight_kernel[(vocab_size, triton.cdiv(H, block))](
        dweight, grad_out, order, starts,
        L, H, P, insert_at,
        grad_out.stride(0), grad_out.stride(1), dweight.stride(0),
        ACC_FP64=grad_out.dtype == torch.float64, BLOCK_H=block, num_warps=warps,
    )
    return dweight, dprompts


for _op, _fn in (
    ("soft_prompt_embed", soft_prompt_embed),
    ("soft_prompt_concat", soft_prompt_concat),
    ("soft_prompt_embed_backward", soft_prompt_embed_backward),
    ("soft_prompt_concat_backward", soft_prompt_concat_backward),
):
    register(_op, "triton", _fn)
