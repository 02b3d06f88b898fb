"""Triton kernels for ``multi_lora`` (jit kernels + launchers only): segmented, rank-bounded LoRA.

Registered as the ``triton`` backend of ``multi_lora`` and ``multi_lora_backward``; the
launchers take exactly the reference functions' positional arguments and return what they
return (see ``peft_kernels.reference``).

Segment pass (``_segments``)
    Rows are grouped by adapter with a stable ``torch.sort`` of the index and
    ``torch.searchsorted`` segment starts, all on the device (no host sync: CUDA-graph
    capturable). ``starts`` has ``T + 2`` entries: segment 0 holds the ``-1`` rows
    (``order[starts[0]:starts[1]]``), segment ``t + 1`` the rows of adapter ``t`` in their
    original order. For a row-block size ``BLOCK_M`` a *tile table* ``[G, 3]`` (adapter or
    -1, first sorted position, end of the segment) lists every row block of every segment;
    ``G = cdiv(N, BLOCK_M) + min(T + 1, N)`` bounds the number of blocks from the shapes alone,
    spare entries are empty (the program returns at once). ``index=None`` needs no sort
    (shared: one segment; per row: one row per segment).

    Cache: the metadata is reused across the layers of a forward (and by the backward): an LRU
    of ``_CACHE_SIZE`` entries keyed on ``(index.data_ptr(), index._version, shape, stride,
    dtype, device, N, T)`` whose entry also holds a weak reference to the index tensor (a
    dead tensor never hits, so a new tensor at a recycled address is not mistaken for it).
    An in-place change of the index bumps ``_version`` and misses. The cache is bypassed
    during CUDA-graph capture (metadata computed by captured kernels must be recomputed on
    every replay, so it is part of the graph) and for inference-mode tensors (they have no
    version counter). Writes that bypass the version counter (``.data``, DLPack/numpy aliases,
    custom kernels) are not seen: call ``clear_segment_cache()`` after those.

Kernels (fp32 accumulation everywhere; ``rank = min(ranks[t], R)`` bounds every rank loop and
mask, so the zero padding beyond an adapter's rank is never loaded and whole rank blocks past
it are skipped; the waste is at most one partially masked ``BLOCK_R`` block per tile):

* ``_shrink_kernel``: ``out[s, n, :rank] = (scale[t]) * x[n, Ks] @ W[t, :rank, Ks]^T`` into fp32
  rank space. Grid ``(tile, rank block, K split)``; programs of -1/empty tiles or rank blocks
  past the adapter's rank return before loading anything. Forward: ``h = x @ A^T``;
  backward: ``h`` (recomputed) and ``dh = scale * grad_y @ B``. Split-K over the reduction
  dim when the grid is too small for the GPU (decode): each split writes its own fp32 partial
  ``[S, N, R]``, the consumer sums them in a fixed order (deterministic, no atomics).
* ``_expand_kernel``: ``y[n] = base[n] + scale[t] * h[n, :rank] @ W[t, :, :rank]^T`` with
  fused base add and scaling; grid ``(tile, H_out block)``; every output row is written
  exactly once (-1 rows get base, or zeros). Forward: ``y``; backward: ``dx = dh @ A``.
* ``_segsum_kernel``: ``out[t, hd, r] = (scale[t]) * sum over the rows of adapter t (in order)
  of P[n, hd] * Q[n, r]``: one program per (adapter, hidden block, rank block) loops over the
  adapter's own rows: deterministic, no atomics; zeros on the rank padding and for unused
  adapters (every element written once). ``dB = scale * grad_y^T h``, ``dA = dh^T x``. When
  there are too few (adapter, tile) programs for the GPU (one adapter owning a long batch),
  each segment's rows are split into ``C`` fixed chunks whose fp32 partials are summed by
  ``torch.sum`` in a fixed order (still deterministic).

fp32 operands of ``tl.dot`` (the rank-space intermediate, or fp32 tensors) are split into a
TF32 ``hi`` part (low 13 mantissa bits cleared) and an fp32 remainder: two (or three, when
both operands are fp32) TF32 tensor-core products give ~fp32 accuracy with fp32 range
(16-bit operands are exact in TF32). Two 16-bit operands use the native 16-bit ``tl.dot``.
fp64 is not supported (``supports`` says so; the dispatcher falls back to the reference).

Configs (GPU only): small config lists per kernel keyed on the shapes, the host-chosen
``BLOCK_M`` and split counts, pruned to the GPU's shared memory; under ``TRITON_INTERPRET=1`` a
single small config. Decode-sized shrink/expand launches (N <= 64) take their config from the
committed table (``configs/decode.json``) and never autotune, so a decode step can be captured
in a CUDA graph; other launches autotune on the first call of each shape
(``PEFT_KERNELS_AUTOTUNE``: see ``_tuning``).
"""
from __future__ import annotations

import collections
import threading
import weakref
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ops._dispatch import register
from ._common import INTERPRET as _INTERPRET
from ._common import on_tensor_device, sm_count, sort_segments
from ._tuning import drop_spilling, launch, smem_limit, tuned

__all__ = ["multi_lora", "multi_lora_backward", "lora_shrink", "lora_shrink_backward", "lora_expand",
           "lora_expand_backward", "clear_segment_cache", "segment_metadata"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------- jit helpers


@triton.jit
def _tf32_split(a):
    """(hi, lo) with hi = a with the low 13 mantissa bits cleared (exact in TF32), lo = a - hi."""
    hi = (a.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
    return hi, a - hi


@triton.jit
def _mma(acc, a, b, A_F32: tl.constexpr, B_F32: tl.constexpr):
    """acc + a @ b with ~fp32 accuracy. ``X_F32``: that operand holds fp32 values (split into
    TF32 hi + lo); otherwise it is a 16-bit tensor (exact in TF32 / used natively)."""
    if A_F32:
        a_hi, a_lo = _tf32_split(a.to(tl.float32))
        if B_F32:
            b_hi, b_lo = _tf32_split(b.to(tl.float32))
            acc = tl.dot(a_lo, b_hi, acc, input_precision="tf32")
            acc = tl.dot(a_hi, b_lo, acc, input_precision="tf32")
            acc = tl.dot(a_hi, b_hi, acc, input_precision="tf32")
        else:
            bf = b.to(tl.float32)
            acc = tl.dot(a_lo, bf, acc, input_precision="tf32")
            acc = tl.dot(a_hi, bf, acc, input_precision="tf32")
    else:
        if B_F32:
            b_hi, b_lo = _tf32_split(b.to(tl.float32))
            af = a.to(tl.float32)
            acc = tl.dot(af, b_lo, acc, input_precision="tf32")
            acc = tl.dot(af, b_hi, acc, input_precision="tf32")
        else:
            acc = tl.dot(a, b, acc)
    return acc


# --------------------------------------------------------------------------- jit kernels


@triton.jit
def _shrink_kernel(
    out_ptr, x_ptr, w_ptr, scale_ptr, ranks_ptr, order_ptr, tiles_ptr,
    K, R, SPLIT,
    stride_xn, stride_xk,
    stride_wt, stride_wr, stride_wk,
    stride_os, stride_on,
    HAS_RANKS: tl.constexpr, HAS_SCALE: tl.constexpr, X_F32: tl.constexpr, W_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[s, n, r] = (scale[t]) * sum_{k in split s} x[n, k] * W[t, r, k] for r < rank (fp32).

    One program per (row tile of one adapter, rank block, K split). Rows are
    ``order[row0:row1]`` (original row ids). Nothing is stored for r >= rank or -1 rows.
    """
    tile = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    t = tl.load(tiles_ptr + tile * 3)
    row0 = tl.load(tiles_ptr + tile * 3 + 1)
    row1 = tl.load(tiles_ptr + tile * 3 + 2)
    if (t < 0) | (row0 >= row1):
        return
    if HAS_RANKS:
        rank = tl.minimum(tl.load(ranks_ptr + t).to(tl.int32), R)
    else:
        rank = R
    r0 = pid_r * BLOCK_R
    if r0 >= rank:
        return  # rank padding: no bytes, no FLOPs

    offs_m = row0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < row1
    rows = tl.load(order_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank

    k_per = tl.cdiv(tl.cdiv(K, SPLIT), BLOCK_K) * BLOCK_K
    k_lo = pid_s * k_per
    k_hi = tl.minimum(k_lo + k_per, K)
    x_rows = x_ptr + rows[:, None] * stride_xn
    w_cols = w_ptr + t.to(tl.int64) * stride_wt + offs_r[None, :].to(tl.int64) * stride_wr
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_hi
        xt = tl.load(x_rows + offs_k[None, :].to(tl.int64) * stride_xk,
                     mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        wt = tl.load(w_cols + offs_k[:, None].to(tl.int64) * stride_wk,
                     mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        acc = _mma(acc, xt, wt, X_F32, W_F32)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + t)
    dst = out_ptr + pid_s.to(tl.int64) * stride_os + rows[:, None] * stride_on + offs_r[None, :]
    tl.store(dst, acc, mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _expand_kernel(
    y_ptr, h_ptr, w_ptr, base_ptr, scale_ptr, ranks_ptr, order_ptr, tiles_ptr,
    NOUT, R, SPLIT,
    stride_hs, stride_hn,
    stride_wt, stride_wo, stride_wr,
    stride_yn, stride_bn,
    HAS_RANKS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BASE: tl.constexpr, W_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """y[n, o] = (base[n, o]) + (scale[t]) * sum_{r < rank} h[n, r] * W[t, o, r].

    ``h`` is fp32 ``[SPLIT, N, R]`` (split-K partials, summed here in order). One program per
    (row tile, output block); -1 tiles store base (or zeros). Each output row once.
    """
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    t = tl.load(tiles_ptr + tile * 3)
    row0 = tl.load(tiles_ptr + tile * 3 + 1)
    row1 = tl.load(tiles_ptr + tile * 3 + 2)
    if row0 >= row1:
        return
    offs_m = row0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < row1
    rows = tl.load(order_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < NOUT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if t >= 0:
        if HAS_RANKS:
            rank = tl.minimum(tl.load(ranks_ptr + t).to(tl.int32), R)
        else:
            rank = R
        h_rows = h_ptr + rows[:, None] * stride_hn
        w_cols = w_ptr + t.to(tl.int64) * stride_wt + offs_n[None, :].to(tl.int64) * stride_wo
        for r in range(0, rank, BLOCK_R):
            offs_r = r + tl.arange(0, BLOCK_R)
            r_mask = offs_r < rank
            hm = m_mask[:, None] & r_mask[None, :]
            h_s = h_rows + offs_r[None, :]
            ht = tl.load(h_s, mask=hm, other=0.0)
            for _s in range(1, SPLIT):  # split-K partials, summed in a fixed order
                h_s += stride_hs
                ht += tl.load(h_s, mask=hm, other=0.0)
            wt = tl.load(w_cols + offs_r[:, None].to(tl.int64) * stride_wr,
                         mask=r_mask[:, None] & n_mask[None, :], other=0.0)
            acc = _mma(acc, ht, wt, True, W_F32)
        if HAS_SCALE:
            acc = acc * tl.load(scale_ptr + t)
    if HAS_BASE:
        b = tl.load(base_ptr + rows[:, None] * stride_bn + offs_n[None, :],
                    mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        acc += b.to(tl.float32)
    tl.store(y_ptr + rows[:, None] * stride_yn + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _segsum_kernel(
    out_ptr, p_ptr, q_ptr, scale_ptr, ranks_ptr, order_ptr, starts_ptr,
    HD, R, CHUNKS, N_BUCKET,
    stride_pn, stride_qn,
    stride_oc, stride_ot, stride_oh, stride_or,
    HAS_RANKS: tl.constexpr, HAS_SCALE: tl.constexpr, P_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_HD: tl.constexpr, BLOCK_RK: tl.constexpr,
):
    """out[c, t, hd, r] = (scale[t]) * sum_{n in chunk c of adapter t's rows} P[n, hd] * Q[n, r].

    P is ``[N, HD]`` (x's dtype, or fp32 when ``P_F32``), Q fp32 ``[N, R]`` (rank space, valid for
    r < rank only: masked). One program per (adapter * CHUNKS + chunk, hd block, rank block)
    loops over the chunk's rows in order; r >= rank and unused adapters get zeros.
    ``N_BUCKET`` only feeds the autotuning key.
    """
    pid0 = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_r = tl.program_id(2)
    t = pid0 // CHUNKS
    c = pid0 - t * CHUNKS
    if HAS_RANKS:
        rank = tl.minimum(tl.load(ranks_ptr + t).to(tl.int32), R)
    else:
        rank = R
    seg0 = tl.load(starts_ptr + t + 1).to(tl.int32)
    seg1 = tl.load(starts_ptr + t + 2).to(tl.int32)
    per = tl.cdiv(tl.cdiv(seg1 - seg0, CHUNKS), BLOCK_M) * BLOCK_M
    lo = tl.minimum(seg0 + c * per, seg1)
    hi = tl.minimum(lo + per, seg1)
    hi = tl.where(pid_r * BLOCK_RK < rank, hi, lo)  # whole block in the rank padding: zeros

    offs_h = pid_h * BLOCK_HD + tl.arange(0, BLOCK_HD)
    h_mask = offs_h < HD
    offs_r = pid_r * BLOCK_RK + tl.arange(0, BLOCK_RK)
    r_ok = offs_r < rank
    acc = tl.zeros((BLOCK_HD, BLOCK_RK), dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_M):
        offs_n = n0 + tl.arange(0, BLOCK_M)
        n_mask = offs_n < hi
        rows = tl.load(order_ptr + offs_n, mask=n_mask, other=0).to(tl.int64)
        pt = tl.load(p_ptr + rows[None, :] * stride_pn + offs_h[:, None],
                     mask=h_mask[:, None] & n_mask[None, :], other=0.0)  # [BLOCK_HD, BLOCK_M]
        qt = tl.load(q_ptr + rows[:, None] * stride_qn + offs_r[None, :],
                     mask=n_mask[:, None] & r_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_RK]
        acc = _mma(acc, pt, qt, P_F32, True)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + t)
    dst = (out_ptr + c.to(tl.int64) * stride_oc + t.to(tl.int64) * stride_ot
           + offs_h[:, None].to(tl.int64) * stride_oh + offs_r[None, :].to(tl.int64) * stride_or)
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=h_mask[:, None] & (offs_r < R)[None, :])


# --------------------------------------------------------------------------- autotuning


def _configs(gpu: list[triton.Config], interp: triton.Config) -> list[triton.Config]:
    return [interp] if _INTERPRET else gpu


# Shared-memory operand tiles per pipeline stage, as (rows, cols, operand) over the config's block
# sizes; operand "a"/"b" has the element size of that kernel's first/second operand.
_SMEM_TILES = {
    "shrink": (("BLOCK_M", "BLOCK_K", "a"), ("BLOCK_K", "BLOCK_R", "b")),
    "expand": (("BLOCK_M", "BLOCK_R", "a"), ("BLOCK_R", "BLOCK_N", "b")),
    "segsum": (("BLOCK_HD", "BLOCK_M", "a"), ("BLOCK_M", "BLOCK_RK", "b")),
}


def smem_estimate(kernel: str, config, sizes: dict, esize_a: int, esize_b: int) -> int:
    """Bytes of shared memory a config of ``kernel`` ("shrink", "expand", "segsum") needs at most.

    Semantics: num_stages copies of both operand tiles; ``sizes`` supplies the block sizes the host
    picks (BLOCK_M of shrink and expand). With an fp32 operand both tiles count 8 bytes an element
    (fp32, split into TF32 hi + lo; the 16-bit operand is widened to meet it).
    """
    blocks = {**sizes, **config.kwargs}
    wide = 4 in (esize_a, esize_b)
    total = 0
    for rows, cols, which in _SMEM_TILES[kernel]:
        esize = 8 if wide else (esize_a if which == "a" else esize_b)
        total += blocks[rows] * blocks[cols] * esize
    return total * max(config.num_stages, 1)


# (first operand, second operand) of each kernel, as launch arguments; the argument whose dtype is the call's
_OPERANDS = {"shrink": ("x_ptr", "w_ptr"), "expand": ("h_ptr", "w_ptr"), "segsum": ("p_ptr", "q_ptr")}
_DTYPE_ARG = {"shrink": "w_ptr", "expand": "w_ptr", "segsum": "p_ptr"}


def _pruner(kernel: str):
    def prune(configs, named, arch: int, screen_spills: bool = True) -> list:
        """Drop configs over the arch's shared memory and (``screen_spills``) configs the compile
        check saw spill, keeping at least one (the smallest)."""
        a, b = (named[n].element_size() for n in _OPERANDS[kernel])
        limit = smem_limit(arch)
        kept = [c for c in configs if smem_estimate(kernel, c, named, a, b) <= limit]
        kept = kept or [min(configs, key=lambda c: smem_estimate(kernel, c, named, a, b))]
        if screen_spills:
            kept = drop_spilling(f"multi_lora.{kernel}", kept, named[_DTYPE_ARG[kernel]].dtype, "-", arch)
        return kept

    return prune


def _decode_bucket(N: int, block_m: int, R: int) -> Optional[str]:
    """The launch's row in the decode config table (N <= 64 rows), or None."""
    if N > 64:
        return None
    return f"block_m={block_m},r={min(triton.next_power_of_2(max(R, 1)), 256)}"


# Decode shapes the committed config table covers: each BLOCK_M the host picks for N <= 64, ranks 16 and 64.
DECODE_SHAPES = tuple(dict(N=N, T=T, R=R, H=256) for N, T in ((16, 4), (32, 1), (64, 1)) for R in (16, 64))


# The GPU config lists (first: the default), by kernel; the arch-aware pruners screen them.
GPU_CONFIGS = {
    "shrink": [
        triton.Config({"BLOCK_R": 32, "BLOCK_K": 128}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_R": 16, "BLOCK_K": 128}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_R": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_R": 32, "BLOCK_K": 256}, num_warps=8, num_stages=3),
    ],
    "expand": [
        triton.Config({"BLOCK_N": 128, "BLOCK_R": 16}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_N": 64, "BLOCK_R": 16}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_N": 128, "BLOCK_R": 32}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_N": 256, "BLOCK_R": 32}, num_warps=8, num_stages=2),
    ],
    "segsum": [
        triton.Config({"BLOCK_M": 32, "BLOCK_HD": 128, "BLOCK_RK": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 32, "BLOCK_HD": 64, "BLOCK_RK": 16}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_HD": 128, "BLOCK_RK": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_HD": 64, "BLOCK_RK": 32}, num_warps=4, num_stages=3),
    ],
}
# Under the interpreter one small config per kernel.
_INTERP_CONFIGS = {
    "shrink": triton.Config({"BLOCK_R": 16, "BLOCK_K": 64}, num_warps=1, num_stages=1),
    "expand": triton.Config({"BLOCK_N": 64, "BLOCK_R": 16}, num_warps=1, num_stages=1),
    "segsum": triton.Config({"BLOCK_M": 16, "BLOCK_HD": 64, "BLOCK_RK": 16}, num_warps=1, num_stages=1),
}

_shrink = tuned(_shrink_kernel, _configs(GPU_CONFIGS["shrink"], _INTERP_CONFIGS["shrink"]),
                ["K", "R", "SPLIT", "BLOCK_M", "HAS_SCALE"], _pruner("shrink"))
_expand = tuned(_expand_kernel, _configs(GPU_CONFIGS["expand"], _INTERP_CONFIGS["expand"]),
                ["NOUT", "R", "SPLIT", "BLOCK_M", "HAS_BASE"], _pruner("expand"))
_segsum = tuned(_segsum_kernel, _configs(GPU_CONFIGS["segsum"], _INTERP_CONFIGS["segsum"]),
                ["HD", "R", "CHUNKS", "N_BUCKET", "HAS_SCALE"], _pruner("segsum"))


# --------------------------------------------------------------------------- segment metadata


class SegmentMeta:
    """Rows grouped by adapter (all device tensors, built without a host sync).

    ``order`` int64 [N]: row ids, -1 rows first, then adapter 0's rows, ... (stable);
    ``starts`` int64 [T + 2]: segment s is ``order[starts[s]:starts[s + 1]]`` (s = 0: -1 rows,
    s = t + 1: adapter t). ``tiles(BLOCK_M)`` int32 [G, 3]: (adapter or -1, start, segment end)
    per row block, spare blocks empty; built once per block size.
    """

    def __init__(self, order: Tensor, starts: Tensor, N: int, T: int):
        self.order, self.starts, self.N, self.T = order, starts, N, T
        self._tiles: dict[int, Tensor] = {}

    def tiles(self, block_m: int) -> Tensor:
        tiles = self._tiles.get(block_m)
        if tiles is None:
            tiles = self._tiles[block_m] = _tile_table(self.starts, self.N, self.T, block_m)
        return tiles


def _tile_table(starts: Tensor, N: int, T: int, block_m: int) -> Tensor:
    device = starts.device
    lens = starts[1:] - starts[:-1]  # [T + 1]
    nblk = (lens + block_m - 1) // block_m
    cum = torch.cumsum(nblk, 0)
    G = triton.cdiv(N, block_m) + min(T + 1, N)
    b = torch.arange(G, dtype=cum.dtype, device=device)
    seg = torch.searchsorted(cum, b, right=True)  # [G] in [0, T + 1]; T + 1: spare block
    valid = seg <= T
    segc = seg.clamp(max=T)
    first = cum[segc] - nblk[segc]
    row0 = torch.where(valid, starts[segc] + (b - first) * block_m, 0)
    row1 = torch.where(valid, starts[segc + 1], 0)
    return torch.stack([segc - 1, row0, row1], dim=1).to(torch.int32).contiguous()


def _build_segments(adapter_index: Optional[Tensor], N: int, T: int, device: torch.device) -> SegmentMeta:
    if adapter_index is None:
        order = torch.arange(N, dtype=torch.int64, device=device)
        if T == 1:  # fill kernels, not a host->device copy (capturable)
            starts = torch.zeros(3, dtype=torch.int64, device=device)
            starts[2:].fill_(N)
        else:  # T == N: row n is adapter n's only row
            starts = torch.cat([torch.zeros(1, dtype=torch.int64, device=device),
                                torch.arange(N + 1, dtype=torch.int64, device=device)])
        return SegmentMeta(order, starts, N, T)
    order, inner = sort_segments(adapter_index.reshape(-1), T)
    # starts[0] = 0 and starts[T + 1] = N: out-of-range keys (only possible with validate=False)
    # fold into the -1 segment / the last adapter instead of leaving rows unwritten.
    starts = torch.cat([torch.zeros(1, dtype=torch.int64, device=device), inner[:T].to(torch.int64),
                        torch.full((1,), N, dtype=torch.int64, device=device)])
    return SegmentMeta(order.to(torch.int64), starts, N, T)


_CACHE_SIZE = 16
_CACHE: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
_CACHE_LOCK = threading.Lock()
CACHE_STATS = {"hits": 0, "misses": 0}


def clear_segment_cache() -> None:
    """Drop every cached segment table (after an index write the version counter cannot see)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def segment_metadata(adapter_index: Optional[Tensor], N: int, T: int, device: torch.device) -> SegmentMeta:
    """The (cached) segment metadata of ``adapter_index`` for N rows and a bank of T adapters."""
    if _capturing(device):
        return _build_segments(adapter_index, N, T, device)
    if adapter_index is None:
        key = ("none", N, T, str(device))
        ref = None
    else:
        try:
            version = adapter_index._version
        except RuntimeError:  # inference tensor: no version counter, cannot tell if it changed
            return _build_segments(adapter_index, N, T, device)
        key = (adapter_index.data_ptr(), version, tuple(adapter_index.shape), tuple(adapter_index.stride()),
               adapter_index.dtype, str(device), N, T)
        ref = adapter_index
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None and (hit[0] is None or hit[0]() is not None):
            _CACHE.move_to_end(key)
            CACHE_STATS["hits"] += 1
            return hit[1]
    meta = _build_segments(adapter_index, N, T, device)
    with _CACHE_LOCK:
        CACHE_STATS["misses"] += 1
        _CACHE[key] = (None if ref is None else weakref.ref(ref), meta)
        _CACHE.move_to_end(key)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return meta


# --------------------------------------------------------------------------- launch helpers


def _pow2_floor(v: int) -> int:
    return 1 << (max(1, v).bit_length() - 1)


def _block_m(N: int, T: int) -> int:
    """Rows per tile: from the mean rows per adapter (a host-side guess; no sync)."""
    return 16 if _INTERPRET else gpu_block_m(N, T)


def gpu_block_m(N: int, T: int) -> int:
    """The rows per tile a GPU launch uses for N rows over T adapters (16, 32 or 64)."""
    mean = triton.cdiv(N, max(1, min(T, N)))
    return 16 if mean <= 16 else 32 if mean <= 48 else 64


def _split_k(N: int, T: int, R: int, K: int, block_m: int, device: torch.device) -> int:
    """K splits of the shrink: >1 only when its grid would leave the GPU mostly idle (decode)."""
    if _INTERPRET:  # exercise the split path on long reductions of tiny batches
        return triton.cdiv(K, 1024) if (N <= 8 and K >= 2048) else 1
    if K < 1024:
        return 1
    sms = sm_count(device)
    programs = (triton.cdiv(N, block_m) + min(T, N)) * max(1, triton.cdiv(R, 32))
    if programs >= sms:
        return 1
    return _pow2_floor(min(K // 256, 16, (2 * sms) // programs))


def _row_chunks(N: int, T: int, R: int, HD: int, device: torch.device) -> int:
    """Row chunks per adapter in the dA / dB reductions: >1 when (adapter, tile) programs are few."""
    if _INTERPRET:
        return 2 if (N >= 32 and T == 1) else 1
    if N < 1024:
        return 1
    sms = sm_count(device)
    programs = min(T, N) * triton.cdiv(HD, 128) * max(1, triton.cdiv(R, 32))
    if programs >= sms:
        return 1
    return _pow2_floor(min(triton.cdiv(2 * sms, programs), N // 256, 16))


def _n_bucket(N: int) -> int:
    return min(_pow2_floor(N), 4096)


def _shrink_impl(x: Tensor, w: Tensor, w_strides: tuple[int, int, int], scaling: Tensor, ranks: Optional[Tensor],
                 meta: SegmentMeta, block_m: int, split: int, scale: bool, R: int) -> Tensor:
    """fp32 partials ``[split, N, R]`` of ``(scale[t]) * x @ W[t]^T`` (rank-bounded; only rows of
    adapters and r < rank are written)."""
    N, K = x.shape
    out = torch.empty(split, N, R, dtype=torch.float32, device=x.device)
    if N == 0 or R == 0:
        return out
    tiles = meta.tiles(block_m)
    G = tiles.shape[0]
    grid = lambda META: (G, triton.cdiv(R, META["BLOCK_R"]), split)  # noqa: E731
    launch(
        _shrink, grid,
        (out, x, w, scaling, ranks if ranks is not None else scaling, meta.order, tiles,
         K, R, split,
         x.stride(0), x.stride(1),
         w_strides[0], w_strides[1], w_strides[2],
         out.stride(0), out.stride(1)),
        dict(HAS_RANKS=ranks is not None, HAS_SCALE=scale,
             X_F32=x.dtype == torch.float32, W_F32=w.dtype == torch.float32,
             BLOCK_M=block_m),
        kernel="multi_lora.shrink", dtype=x.dtype, bucket=_decode_bucket(N, block_m, R),
    )
    return out


def _expand_impl(y: Tensor, h: Tensor, w: Tensor, w_strides: tuple[int, int, int], R: int, base: Optional[Tensor],
                 scaling: Tensor, ranks: Optional[Tensor], meta: SegmentMeta, block_m: int, scale: bool) -> Tensor:
    N, NOUT = y.shape
    if N == 0 or NOUT == 0:
        return y
    tiles = meta.tiles(block_m)
    G = tiles.shape[0]
    grid = lambda META: (G, triton.cdiv(NOUT, META["BLOCK_N"]))  # noqa: E731
    launch(
        _expand, grid,
        (y, h, w, base if base is not None else y, scaling, ranks if ranks is not None else scaling,
         meta.order, tiles,
         NOUT, R, h.shape[0],
         h.stride(0), h.stride(1),
         w_strides[0], w_strides[1], w_strides[2],
         y.stride(0), base.stride(0) if base is not None else 0),
        dict(HAS_RANKS=ranks is not None, HAS_SCALE=scale, HAS_BASE=base is not None,
             W_F32=w.dtype == torch.float32,
             BLOCK_M=block_m),
        kernel="multi_lora.expand", dtype=y.dtype, bucket=_decode_bucket(N, block_m, R),
    )
    return y


def _segsum_impl(out_shape: tuple[int, int, int], out_dtype: torch.dtype, hd_last: bool, p: Tensor, q: Tensor,
                 scaling: Tensor, ranks: Optional[Tensor], meta: SegmentMeta, scale: bool) -> Tensor:
    """``[T, HD, R]`` (hd_last=False, like lora_b) or ``[T, R, HD]`` (hd_last=True, like lora_a)
    of ``(scale[t]) * sum over adapter t's rows of P[n, :, None] * Q[n, None, :]``."""
    T = meta.T
    N, HD = p.shape
    R = q.shape[1]
    chunks = _row_chunks(N, T, R, HD, p.device)
    if chunks == 1:
        out = torch.empty(out_shape, dtype=out_dtype, device=p.device)
        buf = out.unsqueeze(0)
    else:
        buf = torch.empty((chunks, *out_shape), dtype=torch.float32, device=p.device)
    if hd_last:
        stride_oh, stride_or = buf.stride(3), buf.stride(2)
    else:
        stride_oh, stride_or = buf.stride(2), buf.stride(3)
    grid = lambda META: (T * chunks, triton.cdiv(HD, META["BLOCK_HD"]), triton.cdiv(R, META["BLOCK_RK"]))  # noqa: E731
    launch(
        _segsum, grid,
        (buf, p, q, scaling, ranks if ranks is not None else scaling, meta.order, meta.starts,
         HD, R, chunks, _n_bucket(N),
         p.stride(0), q.stride(0),
         buf.stride(0), buf.stride(1), stride_oh, stride_or),
        dict(HAS_RANKS=ranks is not None, HAS_SCALE=scale, P_F32=p.dtype == torch.float32),
        kernel="multi_lora.segsum", dtype=p.dtype,
    )
    if chunks == 1:
        return out
    return buf.sum(0).to(out_dtype)  # fixed-order reduction of the chunk partials: deterministic


def _unit_last(t: Tensor) -> Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _prep(scaling: Tensor, ranks: Optional[Tensor], device: torch.device):
    scaling = scaling.to(device=device, dtype=torch.float32).contiguous()
    if ranks is not None:
        ranks = ranks.to(device=device).contiguous()
    return scaling, ranks


# --------------------------------------------------------------------------- launchers


@on_tensor_device
def multi_lora(
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    adapter_index: Optional[Tensor],
    scaling: Tensor,
    ranks: Optional[Tensor] = None,
    base: Optional[Tensor] = None,
) -> Tensor:
    """Triton ``reference.multi_lora``: y [N, H_out] in x's dtype (segmented shrink + expand)."""
    N, H_in = x.shape
    T, R, _ = lora_a.shape
    H_out = lora_b.shape[1]
    device = x.device
    y = torch.empty(N, H_out, dtype=x.dtype, device=device)
    if N == 0 or H_out == 0:
        return y
    if T == 0 or R == 0 or H_in == 0:  # no adapter contributes anything
        return y.copy_(base) if base is not None else y.zero_()
    x = _unit_last(x)
    base = None if base is None else _unit_last(base)
    scaling, ranks = _prep(scaling, ranks, device)
    meta = segment_metadata(adapter_index, N, T, device)
    block_m = _block_m(N, T)
    split = _split_k(N, T, R, H_in, block_m, device)
    # h = x @ A^T: W[t, r, k] = lora_a[t, r, k]
    h = _shrink_impl(x, lora_a, (lora_a.stride(0), lora_a.stride(1), lora_a.stride(2)), scaling, ranks,
                     meta, block_m, split, False, R)
    # y = base + scale * h @ B^T: W[t, o, r] = lora_b[t, o, r]
    return _expand_impl(y, h, lora_b, (lora_b.stride(0), lora_b.stride(1), lora_b.stride(2)), R, base,
                        scaling, ranks, meta, block_m, True)


@on_tensor_device
def multi_lora_backward(
    grad_y: Tensor,
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    adapter_index: Optional[Tensor],
    scaling: Tensor,
    ranks: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton ``reference.multi_lora_backward``: (dx, dlora_a, dlora_b), deterministic."""
    N, H_in = x.shape
    T, R, _ = lora_a.shape
    H_out = lora_b.shape[1]
    device = x.device
    if min(N, T, R, H_in, H_out) == 0:
        return (torch.zeros(N, H_in, dtype=x.dtype, device=device),
                torch.zeros(T, R, H_in, dtype=lora_a.dtype, device=device),
                torch.zeros(T, H_out, R, dtype=lora_b.dtype, device=device))
    x = _unit_last(x)
    grad_y = _unit_last(grad_y)
    scaling, ranks = _prep(scaling, ranks, device)
    meta = segment_metadata(adapter_index, N, T, device)
    block_m = _block_m(N, T)

    def rank_space(inp: Tensor, w: Tensor, strides, scale: bool) -> Tensor:
        split = _split_k(N, T, R, inp.shape[1], block_m, device)
        part = _shrink_impl(inp, w, strides, scaling, ranks, meta, block_m, split, scale, R)
        return part[0] if split == 1 else part.sum(0)  # fixed-order sum of the K splits

    # h = x @ A^T (recomputed); dh = scale * grad_y @ B: W[t, r, k] = lora_b[t, k, r]
    h = rank_space(x, lora_a, (lora_a.stride(0), lora_a.stride(1), lora_a.stride(2)), False)
    dh = rank_space(grad_y, lora_b, (lora_b.stride(0), lora_b.stride(2), lora_b.stride(1)), True)
    # dx = dh @ A: W[t, o, r] = lora_a[t, r, o]; -1 rows get zeros
    dx = torch.empty(N, H_in, dtype=x.dtype, device=device)
    _expand_impl(dx, dh.unsqueeze(0), lora_a, (lora_a.stride(0), lora_a.stride(2), lora_a.stride(1)), R, None,
                 scaling, ranks, meta, block_m, False)
    # dB[t] = scale[t] * sum_n grad_y[n]^T h[n]  ([T, H_out, R]); dA[t] = sum_n dh[n]^T x[n]  ([T, R, H_in])
    dB = _segsum_impl((T, H_out, R), lora_b.dtype, False, grad_y, h, scaling, ranks, meta, True)
    dA = _segsum_impl((T, R, H_in), lora_a.dtype, True, x, dh, scaling, ranks, meta, False)
    return dx, dA, dB


# --------------------------------------------------------------------------- lora_shrink / lora_expand launchers


def _real_slots(adapter_index: Optional[Tensor], ranks: Optional[Tensor], N: int, T: int, R: int,
                device: torch.device) -> Tensor:
    """[N, R] bool on the device: slot j is a real rank slot of row n's adapter (no host sync)."""
    if adapter_index is None:
        idx = torch.zeros(N, dtype=torch.long, device=device) if T == 1 else torch.arange(N, device=device)
    else:
        idx = adapter_index.to(device=device, dtype=torch.long)
    real = (idx >= 0)[:, None].expand(N, R)
    if ranks is not None:
        real = real & (torch.arange(R, device=device)[None, :] < ranks.to(device=device, dtype=torch.long)[idx.clamp(min=0)][:, None])
    return real


def _rank_space(x: Tensor, w: Tensor, w_strides: tuple[int, int, int], scaling: Optional[Tensor],
                ranks: Optional[Tensor], adapter_index: Optional[Tensor], R: int) -> Tensor:
    """fp32 ``[N, R]`` of ``(scaling[t]) * x @ W[t]^T``: exactly 0 in the rank padding and on -1 rows."""
    N, K = x.shape
    T = w.shape[0]
    device = x.device
    if min(N, T, R, K) == 0:
        return torch.zeros(N, R, dtype=torch.float32, device=device)
    x = _unit_last(x)
    scale = scaling is not None
    scaling, ranks = _prep(scaling if scale else torch.ones(T, device=device), ranks, device)
    meta = segment_metadata(adapter_index, N, T, device)
    block_m = _block_m(N, T)
    split = _split_k(N, T, R, K, block_m, device)
    part = _shrink_impl(x, w, w_strides, scaling, ranks, meta, block_m, split, scale, R)
    h = part[0] if split == 1 else part.sum(0)  # fixed-order sum of the K splits
    # The kernel writes real slots only; where() (not a product) clears the rest, whatever it holds.
    return torch.where(_real_slots(adapter_index, ranks, N, T, R, device), h, 0.0)


@on_tensor_device
def lora_shrink(x: Tensor, lora_a: Tensor, adapter_index: Optional[Tensor], ranks: Optional[Tensor] = None,
                scaling: Optional[Tensor] = None) -> Tensor:
    """Triton ``reference.lora_shrink``: h [N, R] fp32 (segmented shrink kernel)."""
    return _rank_space(x, lora_a, (lora_a.stride(0), lora_a.stride(1), lora_a.stride(2)), scaling, ranks,
                       adapter_index, lora_a.shape[1])


@on_tensor_device
def lora_shrink_backward(grad_h: Tensor, x: Tensor, lora_a: Tensor, adapter_index: Optional[Tensor],
                         ranks: Optional[Tensor] = None, scaling: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Triton ``reference.lora_shrink_backward``: (dx, dlora_a), deterministic."""
    N, H_in = x.shape
    T, R, _ = lora_a.shape
    device = x.device
    if min(N, T, R, H_in) == 0:
        return (torch.zeros(N, H_in, dtype=x.dtype, device=device),
                torch.zeros(T, R, H_in, dtype=lora_a.dtype, device=device))
    x = _unit_last(x)
    gh = grad_h.to(torch.float32).contiguous()
    scale = scaling is not None
    scaling, ranks = _prep(scaling if scale else torch.ones(T, device=device), ranks, device)
    meta = segment_metadata(adapter_index, N, T, device)
    block_m = _block_m(N, T)
    # dx = (scale) * grad_h @ A: W[t, o, r] = lora_a[t, r, o]; -1 rows get zeros
    dx = torch.empty(N, H_in, dtype=x.dtype, device=device)
    _expand_impl(dx, gh.unsqueeze(0), lora_a, (lora_a.stride(0), lora_a.stride(2), lora_a.stride(1)), R, None,
                 scaling, ranks, meta, block_m, scale)
    # dA[t] = (scale[t]) * sum_n grad_h[n]^T x[n]  ([T, R, H_in])
    dA = _segsum_impl((T, R, H_in), lora_a.dtype, True, x, gh, scaling, ranks, meta, scale)
    return dx, dA


@on_tensor_device
def lora_expand(h: Tensor, lora_b: Tensor, adapter_index: Optional[Tensor], scaling: Tensor,
                ranks: Optional[Tensor] = None, base: Optional[Tensor] = None) -> Tensor:
    """Triton ``reference.lora_expand``: y [N, H_out] in lora_b's dtype (segmented expand kernel)."""
    N = h.shape[0]
    T, H_out, R = lora_b.shape
    device = h.device
    y = torch.empty(N, H_out, dtype=lora_b.dtype, device=device)
    if N == 0 or H_out == 0:
        return y
    if T == 0 or R == 0:
        return y.copy_(base) if base is not None else y.zero_()
    base = None if base is None else _unit_last(base)
    scaling, ranks = _prep(scaling, ranks, device)
    meta = segment_metadata(adapter_index, N, T, device)
    hf = h.to(torch.float32).contiguous()
    return _expand_impl(y, hf.unsqueeze(0), lora_b, (lora_b.stride(0), lora_b.stride(1), lora_b.stride(2)), R, base,
                        scaling, ranks, meta, _block_m(N, T), True)


@on_tensor_device
def lora_expand_backward(grad_y: Tensor, h: Tensor, lora_b: Tensor, adapter_index: Optional[Tensor], scaling: Tensor,
                         ranks: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Triton ``reference.lora_expand_backward``: (dh in h's dtype, dlora_b), deterministic."""
    N = h.shape[0]
    T, H_out, R = lora_b.shape
    device = h.device
    if min(N, T, R, H_out) == 0:
        return (torch.zeros(N, R, dtype=h.dtype, device=device),
                torch.zeros(T, H_out, R, dtype=lora_b.dtype, device=device))
    grad_y = _unit_last(grad_y)
    # dh = scale * grad_y @ B: W[t, r, k] = lora_b[t, k, r]
    dh = _rank_space(grad_y, lora_b, (lora_b.stride(0), lora_b.stride(2), lora_b.stride(1)), scaling, ranks,
                     adapter_index, R)
    scaling, ranks = _prep(scaling, ranks, device)
    meta = segment_metadata(adapter_index, N, T, device)
    # dB[t] = scale[t] * sum_n grad_y[n]^T h[n]  ([T, H_out, R]); h's rank padding is never loaded
    dB = _segsum_impl((T, H_out, R), lora_b.dtype, False, grad_y, h.to(torch.float32).contiguous(), scaling, ranks,
                      meta, True)
    return dh.to(h.dtype), dB


def _supports_split(*tensors) -> Optional[str]:
    for t in tensors:
        if t.dtype == torch.float64:
            return "triton lora_shrink / lora_expand kernels take fp16/bf16/fp32 tensors, not float64 (reference)"
    return None


register("lora_shrink", "triton", lora_shrink, supports=lambda x, a, *_: _supports_split(x, a))
register("lora_shrink_backward", "triton", lora_shrink_backward, supports=lambda g, x, a, *_: _supports_split(x, a))
register("lora_expand", "triton", lora_expand, supports=lambda h, b, *_: _supports_split(h, b))
register("lora_expand_backward", "triton", lora_expand_backward, supports=lambda g, h, b, *_: _supports_split(h, b))


def _supports_fwd(x, lora_a, lora_b, adapter_index, scaling, ranks=None, base=None) -> Optional[str]:
    if x.dtype not in _DTYPES:
        return f"triton multi_lora kernels take fp16/bf16/fp32 tensors, not {x.dtype} (fp64: reference)"
    return None


def _supports_bwd(grad_y, x, lora_a, lora_b, adapter_index, scaling, ranks=None) -> Optional[str]:
    if x.dtype not in _DTYPES or grad_y.dtype not in _DTYPES:
        return f"triton multi_lora kernels take fp16/bf16/fp32 tensors, not {x.dtype} (fp64: reference)"
    return None


register("multi_lora", "triton", multi_lora, supports=_supports_fwd)
register("multi_lora_backward", "triton", multi_lora_backward, supports=_supports_bwd)
