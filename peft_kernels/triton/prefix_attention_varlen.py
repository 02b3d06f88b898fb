"""Triton kernels for ``prefix_attention_varlen``: packed sequences (FlashAttention's varlen layout).

The padded kernels' work layout (``peft_kernels.triton.prefix_attention``), per *sequence* instead of
per batch row: a program owns one KV head of one sequence and a block of ``BLOCK_M`` packed query
rows (row ``r`` = query ``r // G`` of head ``hkv * G + r % G``), reads the sequence's bounds from
``cu_seqlens_q`` / ``cu_seqlens_k`` and exits when its block lies past the sequence's queries (the
grid is sized by ``max_seqlen_q``). Keys come from two sources, the sequence's prefix slots in the
bank (none for -1) and then its own keys, with the padded kernels' inner loops; causality is
bottom-right aligned per sequence. Tensors are read and written through their token / head / dim
strides (a ``[1, H, N, D]`` tensor's ``[0].transpose(0, 1)`` view needs no copy).

* Decode (``max_seqlen_q <= 16``) with too few programs to fill the GPU: split-K over the virtual key
  axis ``[prefix slots 0..P) ++ [the sequence's keys 0..Lk_s)``. The split length is chosen from the
  total key count of the batch (a shape, not a host read), so ragged ``Lk_s`` cost what they hold:
  a long sequence gets many splits, a short one few, and the programs past a sequence's end exit at
  once. A combine kernel merges each sequence's partials with their lse.
* Backward (FA2): ``delta = rowsum(dO * O)``; one dk/dv program per key block (prefix blocks first)
  looping over the sequence's packed query rows; one dq program per query block. Prefix grads go to
  per-sequence fp32 scratch ``[S, Hkv, P, D]`` and are summed per bank entry in increasing sequence
  order by the padded kernels' reduce kernel: deterministic, no atomics.

Configs: the padded kernels' tiles and arch-aware pruners (the per-program work is the same); the
spill screen reads this file's entries. Decode launches take the pruner's first config and never
autotune (CUDA-graph capturable); the others autotune (``PEFT_KERNELS_AUTOTUNE``: see ``_tuning``).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..ops._dispatch import register
from ._common import INTERPRET, index_mode, interpreting, on_tensor_device, sm_count
from ._tuning import launch, tuned
from .prefix_attention import (
    _BWD_KV_CONFIGS, _BWD_Q_CONFIGS, _DECODE_MAX_LQ, _FLOAT_DTYPES, _FWD_CONFIGS, LOG2E, MAX_GRID_Y, MAX_HEAD_DIM,
    _bucket, _bwd_kv_prefix_block, _bwd_kv_seq_rows, _bwd_q_keys, _delta_kernel, _fwd_tile, _key_bounds,
    _load_tile, _merge_splits, _prefix_reduce_kernel, _prec, _pruner, _query_rows, _row_prefix, _store_partials,
    decode_bucket,
)

OP = "prefix_attention_varlen"  # the kernels' name in the spill list and the decode table


# --------------------------------------------------------------------------- jit helpers


@triton.jit
def _seq_bounds(CU_Q, CU_K, s):
    """(first query token int64, Lq, first key token int64, Lk) of sequence ``s``."""
    q0 = tl.load(CU_Q + s)
    q1 = tl.load(CU_Q + s + 1)
    k0 = tl.load(CU_K + s)
    k1 = tl.load(CU_K + s + 1)
    return q0.to(tl.int64), (q1 - q0).to(tl.int32), k0.to(tl.int64), (k1 - k0).to(tl.int32)


# --------------------------------------------------------------------------- forward


@triton.jit(do_not_specialize=["P", "M_MAX", "split_len"])  # lengths vary per batch: no recompiles
def _fwd_kernel(
    Q, K, V, PK, PV, IDX, LENS, CU_Q, CU_K, O, LSE, OP, LP,
    stride_qn, stride_qh, stride_qd,
    stride_kn, stride_kh, stride_kd,
    stride_vn, stride_vh, stride_vd,
    stride_pkt, stride_pkh, stride_pkp, stride_pkd,
    stride_pvt, stride_pvh, stride_pvp, stride_pvd,
    stride_on, stride_oh, stride_od,
    stride_lh, stride_ln,
    Hkv, P, M_MAX, split_len, qk_scale,
    M_BUCKET,  # autotune key only
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    IDX_MODE: tl.constexpr, HAS_LENS: tl.constexpr, CAUSAL: tl.constexpr, SPLIT: tl.constexpr,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (query blocks of max_seqlen_q * G, S, Hkv * splits); SPLIT writes fp32 partials
    OP [S, Hkv, splits, M_MAX, D] / LP [S, Hkv, splits, M_MAX] instead of O / LSE."""
    pid_m = tl.program_id(0)
    s = tl.program_id(1)
    pid_hs = tl.program_id(2)
    hkv = pid_hs % Hkv
    split = pid_hs // Hkv
    m_blk = tl.num_programs(0) - 1 - pid_m  # heaviest (latest, causal) tiles first
    q0, Lq, k0, Lk = _seq_bounds(CU_Q, CU_K, s)
    M_TOTAL = Lq * GROUP
    k_lo = split * split_len  # this program's share of the virtual key axis (SPLIT only)
    done = m_blk * BLOCK_M >= M_TOTAL
    if SPLIT:
        done = done | (k_lo >= P + Lk)  # past the sequence's keys: the combine does not read it
    if done:
        return
    h64 = hkv.to(tl.int64)
    EVEN_D: tl.constexpr = HEAD_DIM == D_PAD

    offs_r, row_ok, qi, qh = _query_rows(m_blk, h64, M_TOTAL, GROUP, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    q = _load_tile(Q + q0 * stride_qn + qi[:, None] * stride_qn + qh[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                   row_ok, d_ok, True, EVEN_D)

    row_limit = qi + (Lk - Lq)  # bottom-right causal: query i sees key j <= i + Lk - Lq
    full_end, seq_end = _key_bounds(m_blk, Lq, Lk, GROUP, BLOCK_M, CAUSAL)

    # the sequence's prefix read from the bank, then its own keys
    t, plen = _row_prefix(IDX, LENS, s, P, IDX_MODE, HAS_LENS)
    t64 = t.to(tl.int64)
    if SPLIT:
        p_lo = tl.minimum(k_lo, plen)
        p_hi = tl.minimum(k_lo + split_len, plen)
    else:
        p_lo = plen * 0
        p_hi = plen
    out, lse = _fwd_tile(
        q, row_limit, full_end, seq_end, PK + t64 * stride_pkt + h64 * stride_pkh,
        PV + t64 * stride_pvt + h64 * stride_pvh, stride_pkp, stride_pkd, stride_pvp, stride_pvd, p_lo, p_hi,
        K, V, K, k0, h64, stride_kn, stride_kh, stride_vn, stride_vh, 0,
        stride_kn, stride_kd, stride_vn, stride_vd, 0, k_lo, k_lo + split_len, P, qk_scale, offs_n, offs_d, d_ok,
        BLOCK_M, BLOCK_N, D_PAD, SPLIT, CAUSAL, False, EVEN_D, PREC,
    )
    if SPLIT:
        base = ((s.to(tl.int64) * Hkv + hkv) * (tl.num_programs(2) // Hkv) + split) * M_MAX
        _store_partials(OP, LP, base, out, lse, offs_r, row_ok, offs_d, d_ok, HEAD_DIM)
    else:
        tl.store(O + q0 * stride_on + qi[:, None] * stride_on + qh[:, None] * stride_oh + offs_d[None, :] * stride_od,
                 out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        tl.store(LSE + q0 * stride_ln + qh * stride_lh + qi * stride_ln, lse, mask=row_ok)


@triton.jit(do_not_specialize=["P", "M_MAX", "NUM_SPLITS", "split_len"])  # lengths vary per batch
def _combine_kernel(
    OP, LP, CU_Q, CU_K, O, LSE,
    stride_on, stride_oh, stride_od,
    stride_lh, stride_ln,
    Hkv, P, M_MAX, NUM_SPLITS, split_len,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Merge a sequence's split-K partials of BLOCK_R packed rows: out = sum_i exp(lse_i - lse) out_i
    over the splits that start inside the sequence's virtual key axis (the only ones written)."""
    pid_r = tl.program_id(0)
    s = tl.program_id(1)
    hkv = tl.program_id(2)
    q0, Lq, k0, Lk = _seq_bounds(CU_Q, CU_K, s)
    M_TOTAL = Lq * GROUP
    if pid_r * BLOCK_R >= M_TOTAL:
        return
    n_splits = tl.minimum(tl.cdiv(P + Lk, split_len), NUM_SPLITS)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = offs_r < M_TOTAL
    offs_d = tl.arange(0, D_PAD)
    mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    out, lse = _merge_splits(OP, LP, (s.to(tl.int64) * Hkv + hkv) * NUM_SPLITS, n_splits, M_MAX, offs_r, row_ok,
                             offs_d, mask, BLOCK_R, HEAD_DIM, D_PAD)
    qi = offs_r // GROUP
    qh = hkv.to(tl.int64) * GROUP + offs_r % GROUP
    tl.store(O + q0 * stride_on + qi[:, None] * stride_on + qh[:, None] * stride_oh + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=mask)
    tl.store(LSE + q0 * stride_ln + qh * stride_lh + qi * stride_ln, lse, mask=row_ok)


_fwd_tuned = tuned(_fwd_kernel, _FWD_CONFIGS, ["M_BUCKET", "GROUP", "HEAD_DIM", "CAUSAL", "SPLIT"],
                   _pruner("fwd", OP))


# --------------------------------------------------------------------------- backward


@triton.jit(do_not_specialize=["Nq", "P"])  # lengths vary per batch: no recompiles
def _bwd_kv_kernel(
    Q, K, V, PK, PV, IDX, LENS, CU_Q, CU_K, DO, LSE, DELTA, DK, DV, DPK, DPV,
    stride_qn, stride_qh, stride_qd,
    stride_kn, stride_kh, stride_kd,
    stride_vn, stride_vh, stride_vd,
    stride_pkt, stride_pkh, stride_pkp, stride_pkd,
    stride_pvt, stride_pvh, stride_pvp, stride_pvd,
    stride_gn, stride_gh, stride_gd,
    stride_lh, stride_ln,
    stride_dkn, stride_dkh, stride_dkd,
    stride_dvn, stride_dvh, stride_dvd,
    Hkv, Nq, P, qk_scale, sm_scale,
    M_BUCKET,  # autotune key only
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    IDX_MODE: tl.constexpr, HAS_LENS: tl.constexpr, CAUSAL: tl.constexpr,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dk, dv of one key block of one sequence (grid: prefix blocks then blocks of max_seqlen_k, S,
    Hkv): prefix blocks write the sequence's fp32 prefix grads DPK/DPV [S, Hkv, P, D] (zeros past its
    prefix length), sequence blocks dk, dv. DELTA is [Hq, Nq]; the group's heads are summed here."""
    pid_n = tl.program_id(0)
    s = tl.program_id(1)
    hkv = tl.program_id(2)
    q0, Lq, k0, Lk = _seq_bounds(CU_Q, CU_K, s)
    n_prefix_blocks = tl.cdiv(P, BLOCK_N)
    n0 = (pid_n - n_prefix_blocks) * BLOCK_N
    if (pid_n >= n_prefix_blocks) & (n0 >= Lk):
        return
    h64 = hkv.to(tl.int64)
    EVEN_D: tl.constexpr = HEAD_DIM == D_PAD
    M_TOTAL = Lq * GROUP
    shift = Lk - Lq
    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    Q_s = Q + q0 * stride_qn
    DO_s = DO + q0 * stride_gn
    LSE_s = LSE + q0 * stride_ln
    DELTA_s = DELTA + q0  # [Hq, Nq]: the inner loop's head stride is Nq
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    if pid_n < n_prefix_blocks:
        t, plen = _row_prefix(IDX, LENS, s, P, IDX_MODE, HAS_LENS)
        t64 = t.to(tl.int64)
        _bwd_kv_prefix_block(
            dk, dv, DPK, DPV, PK + t64 * stride_pkt + h64 * stride_pkh, PV + t64 * stride_pvt + h64 * stride_pvh,
            stride_pkp, stride_pkd, stride_pvp, stride_pvd, plen, s.to(tl.int64) * Hkv + hkv, P, pid_n,
            Q_s, DO_s, LSE_s, DELTA_s, stride_qh, stride_qn, stride_qd, stride_gh, stride_gn, stride_gd,
            stride_lh, stride_ln, h64, Nq, M_TOTAL, qk_scale, sm_scale, shift, offs_n, offs_m, offs_d, d_ok,
            HEAD_DIM, GROUP, BLOCK_M, BLOCK_N, EVEN_D, PREC,
        )
    else:
        cols = n0 + offs_n
        col_ok = cols < Lk
        k = _load_tile(K + k0 * stride_kn + h64 * stride_kh + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                       col_ok, d_ok, True, EVEN_D)
        v = _load_tile(V + k0 * stride_vn + h64 * stride_vh + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                       col_ok, d_ok, True, EVEN_D)
        dk, dv = _bwd_kv_seq_rows(
            dk, dv, k, v, col_ok, cols, Q_s, DO_s, LSE_s, DELTA_s,
            stride_qh, stride_qn, stride_qd, stride_gh, stride_gn, stride_gd, stride_lh, stride_ln,
            h64, Nq, M_TOTAL, qk_scale, n0, shift, offs_m, offs_d, d_ok,
            GROUP, BLOCK_M, BLOCK_N, CAUSAL, EVEN_D, PREC,
        )
        mask = col_ok[:, None] & d_ok[None, :]
        tl.store(DK + k0 * stride_dkn + h64 * stride_dkh + cols[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
                 (dk * sm_scale).to(DK.dtype.element_ty), mask=mask)
        tl.store(DV + k0 * stride_dvn + h64 * stride_dvh + cols[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
                 dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["Nq", "P"])  # lengths vary per batch: no recompiles
def _bwd_q_kernel(
    Q, K, V, PK, PV, IDX, LENS, CU_Q, CU_K, DO, LSE, DELTA, DQ,
    stride_qn, stride_qh, stride_qd,
    stride_kn, stride_kh, stride_kd,
    stride_vn, stride_vh, stride_vd,
    stride_pkt, stride_pkh, stride_pkp, stride_pkd,
    stride_pvt, stride_pvh, stride_pvp, stride_pvd,
    stride_gn, stride_gh, stride_gd,
    stride_lh, stride_ln,
    stride_dqn, stride_dqh, stride_dqd,
    Hkv, Nq, P, qk_scale, sm_scale,
    M_BUCKET,  # autotune key only
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    IDX_MODE: tl.constexpr, HAS_LENS: tl.constexpr, CAUSAL: tl.constexpr,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dq of one packed query block of one sequence (grid: blocks of max_seqlen_q * G, S, Hkv)."""
    pid_m = tl.program_id(0)
    s = tl.program_id(1)
    hkv = tl.program_id(2)
    m_blk = tl.num_programs(0) - 1 - pid_m
    q0, Lq, k0, Lk = _seq_bounds(CU_Q, CU_K, s)
    M_TOTAL = Lq * GROUP
    if m_blk * BLOCK_M >= M_TOTAL:
        return
    h64 = hkv.to(tl.int64)
    EVEN_D: tl.constexpr = HEAD_DIM == D_PAD

    offs_r, row_ok, qi, qh = _query_rows(m_blk, h64, M_TOTAL, GROUP, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    Q_s = Q + q0 * stride_qn
    DO_s = DO + q0 * stride_gn
    q = _load_tile(Q_s + qi[:, None] * stride_qn + qh[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                   row_ok, d_ok, True, EVEN_D)
    do = _load_tile(DO_s + qi[:, None] * stride_gn + qh[:, None] * stride_gh + offs_d[None, :] * stride_gd,
                    row_ok, d_ok, True, EVEN_D)
    lse = tl.load(LSE + q0 * stride_ln + qh * stride_lh + qi * stride_ln, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E  # rows that saw nothing: p = 0
    delta = tl.load(DELTA + q0 + qh * Nq + qi, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    row_limit = qi + (Lk - Lq)
    full_end, seq_end = _key_bounds(m_blk, Lq, Lk, GROUP, BLOCK_M, CAUSAL)

    t, plen = _row_prefix(IDX, LENS, s, P, IDX_MODE, HAS_LENS)
    t64 = t.to(tl.int64)
    dq = _bwd_q_keys(
        dq, q, do, lse, delta, PK + t64 * stride_pkt + h64 * stride_pkh, PV + t64 * stride_pvt + h64 * stride_pvh,
        stride_pkp, stride_pkd, stride_pvp, stride_pvd, plen,
        K, V, K, k0, h64, stride_kn, stride_kh, stride_vn, stride_vh, 0,
        stride_kn, stride_kd, stride_vn, stride_vd, 0, full_end, seq_end, row_limit, qk_scale, offs_n, offs_d, d_ok,
        BLOCK_N, CAUSAL, False, EVEN_D, PREC,
    )
    tl.store(DQ + q0 * stride_dqn + qi[:, None] * stride_dqn + qh[:, None] * stride_dqh + offs_d[None, :] * stride_dqd,
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


_BWD_KEY = ["M_BUCKET", "GROUP", "HEAD_DIM", "CAUSAL"]
_bwd_kv_tuned = tuned(_bwd_kv_kernel, _BWD_KV_CONFIGS, _BWD_KEY, _pruner("bwd_kv", OP))
_bwd_q_tuned = tuned(_bwd_q_kernel, _BWD_Q_CONFIGS, _BWD_KEY, _pruner("bwd_q", OP))


# --------------------------------------------------------------------------- launchers


def supports(q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=0, max_seqlen_k=0,
             prefix_index=None, prefix_lens=None, causal=True, softmax_scale=None, *rest) -> Optional[str]:
    """None when these kernels take the call, else why not (the dispatcher then falls back).

    Shapes: the custom op's arguments (q [Nq, Hq, D], k, v [Nk, Hkv, D], cu_seqlens [S + 1]).
    Semantics: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``; float16 / bfloat16 /
    float32 (the dispatcher keeps bf16 off the interpreter); head dim 1..256; S and Hkv <= 65535
    (grid dimensions). Any token / head / dim strides are read as they are.
    """
    if q.dtype not in _FLOAT_DTYPES:
        return f"dtype {q.dtype} not supported (float16, bfloat16, float32)"
    if any(t.dtype != q.dtype for t in (k, v, prefix_k, prefix_v)):
        return "q, k, v, prefix_k, prefix_v must share a dtype"
    if q.dim() != 3 or k.dim() != 3 or prefix_k.dim() != 4:
        return f"q, k must be [N, H, D] and prefix_k [T, Hkv, P, D], got {tuple(q.shape)}, {tuple(k.shape)}, " \
               f"{tuple(prefix_k.shape)}"
    D = q.shape[-1]
    if D == 0:
        return "head dim 0"
    if D > MAX_HEAD_DIM:
        return f"head dim {D} > {MAX_HEAD_DIM}"
    S, Hkv = cu_seqlens_q.numel() - 1, k.shape[1]
    if S > MAX_GRID_Y or Hkv > MAX_GRID_Y:
        return f"S = {S} sequences or Hkv = {Hkv} heads > {MAX_GRID_Y} (grid limit)"
    if q.device.type == "cpu" and not interpreting():
        return "CPU tensors need TRITON_INTERPRET=1"
    return None


def supports_bwd(grad_out, q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=0,
                 max_seqlen_k=0, prefix_index=None, prefix_lens=None, causal=True, softmax_scale=None,
                 out=None, lse=None) -> Optional[str]:
    """:func:`supports` for the backward op's arguments (grad_out in q's dtype)."""
    why = supports(q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                   prefix_index, prefix_lens, causal, softmax_scale)
    if why is None and grad_out.dtype != q.dtype:
        return f"grad_out dtype {grad_out.dtype} differs from q's {q.dtype}"
    return why


def num_splits(S: int, Hkv: int, G: int, P: int, max_seqlen_q: int, max_seqlen_k: int, Nk: int,
               device: torch.device) -> tuple[int, int]:
    """(splits, keys per split) of the virtual key axis for the decode path.

    Shapes: S sequences, Hkv KV heads, G query heads per KV head, P bank slots, Nk packed keys.
    Semantics: only short query blocks (``max_seqlen_q <= 16``; 2 in the interpreter, so tiny CPU
    tests reach it) whose (sequence, KV head, tile) programs cannot fill the device split. The split
    length spreads the batch's ``Nk + S * P`` keys over ~2 programs per SM (at least ``min_keys``
    each, aligned to the key block); the split count covers the longest sequence, whose splits then
    run side by side while short sequences' extra programs exit at once. Shapes only, no host read:
    a decode step stays CUDA-graph capturable.
    """
    n_keys = P + max_seqlen_k
    if max_seqlen_q > _DECODE_MAX_LQ or n_keys <= 0:
        return 1, max(n_keys, 1)
    if device.type == "cuda":
        slots, min_keys, align = 2 * sm_count(device), 256, 128
    else:  # interpreter: split small shapes too, so the CPU tests exercise this path
        slots, min_keys, align = 16, 4, _FWD_CONFIGS[0].kwargs["BLOCK_N"]
    tiles = triton.cdiv(max_seqlen_q * G, 16)
    if S * Hkv * tiles * 2 > slots:
        return 1, n_keys
    split_len = max(triton.cdiv(Hkv * tiles * (Nk + S * P), slots), min_keys)
    split_len = triton.cdiv(max(split_len, triton.cdiv(n_keys, 128)), align) * align
    splits = triton.cdiv(n_keys, split_len)
    return (splits, split_len) if splits > 1 else (1, n_keys)


def _common(q, k, prefix_k, cu_seqlens_q, prefix_index, prefix_lens, softmax_scale):
    Nq, Hq, D = q.shape
    Hkv = k.shape[1]
    T, P = prefix_k.shape[0], prefix_k.shape[2]
    S = cu_seqlens_q.numel() - 1
    scale = float(D**-0.5 if softmax_scale is None else softmax_scale)
    idx = prefix_index if prefix_index is not None else cu_seqlens_q  # dummies: never read
    lens = prefix_lens if prefix_lens is not None else cu_seqlens_q
    meta = dict(
        GROUP=Hq // Hkv, HEAD_DIM=D, D_PAD=max(16, triton.next_power_of_2(D)),
        IDX_MODE=index_mode(prefix_index, T), HAS_LENS=prefix_lens is not None, PREC=_prec(q.dtype),
    )
    return Nq, Hq, D, Hkv, T, P, S, scale, idx, lens, meta


@on_tensor_device
def prefix_attention_varlen_fwd(q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                prefix_index=None, prefix_lens=None, causal=True, softmax_scale=None):
    """Packed prefix attention forward on Triton.

    Shapes: q [Nq, Hq, D]; k, v [Nk, Hkv, D]; prefix_k, prefix_v [T, Hkv, P, D]; cu_seqlens_q/k
    int32 [S + 1]; prefix_index [S] or None; prefix_lens [T] or None. Returns (out [Nq, Hq, D] in q's
    dtype, contiguous; lse [Hq, Nq] fp32).
    Semantics: ``reference.prefix_attention_varlen``; inputs are read through their strides (no
    copies); max_seqlen_q/k size the grid and must bound every sequence's lengths.
    """
    Nq, Hq, D, Hkv, T, P, S, scale, idx, lens, meta = _common(
        q, k, prefix_k, cu_seqlens_q, prefix_index, prefix_lens, softmax_scale)
    out = torch.empty(Nq, Hq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(Hq, Nq, dtype=torch.float32, device=q.device)
    if out.numel() == 0 or S <= 0 or max_seqlen_q <= 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    G = meta["GROUP"]
    M_MAX = max_seqlen_q * G
    splits, split_len = num_splits(S, Hkv, G, P, max_seqlen_q, max_seqlen_k, k.shape[0], q.device)
    if splits > 1:
        o_part = torch.empty(S * Hkv * splits * M_MAX * D, dtype=torch.float32, device=q.device)
        l_part = torch.empty(S * Hkv * splits * M_MAX, dtype=torch.float32, device=q.device)
    else:
        o_part = l_part = lse  # unused
    grid = lambda m: (triton.cdiv(M_MAX, m["BLOCK_M"]), S, Hkv * splits)  # noqa: E731
    launch(
        _fwd_tuned, grid,
        (q, k, v, prefix_k, prefix_v, idx, lens, cu_seqlens_q, cu_seqlens_k, out, lse, o_part, l_part,
         *q.stride(), *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(), *out.stride(), *lse.stride(),
         Hkv, P, M_MAX, split_len, scale * LOG2E.value, _bucket(M_MAX)),
        dict(CAUSAL=bool(causal), SPLIT=splits > 1, **meta),
        kernel=f"{OP}.fwd", dtype=q.dtype, bucket=decode_bucket(max_seqlen_q, M_MAX, meta["D_PAD"], splits > 1),
    )
    if splits > 1:
        BLOCK_R = 16
        _combine_kernel[(triton.cdiv(M_MAX, BLOCK_R), S, Hkv)](
            o_part, l_part, cu_seqlens_q, cu_seqlens_k, out, lse, *out.stride(), *lse.stride(),
            Hkv, P, M_MAX, splits, split_len,
            GROUP=G, HEAD_DIM=D, D_PAD=meta["D_PAD"], BLOCK_R=BLOCK_R,
        )
    return out, lse


@on_tensor_device
def prefix_attention_varlen_bwd(grad_out, q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                max_seqlen_k, prefix_index, prefix_lens, causal, softmax_scale, out, lse):
    """Packed prefix attention backward on Triton.

    Shapes: grad_out, out [Nq, Hq, D]; lse [Hq, Nq] fp32 (the forward's); the rest as the forward.
    Returns (dq, dk, dv, dprefix_k, dprefix_v) shaped like q, k, v, prefix_k, prefix_v (contiguous).
    Semantics: ``reference.prefix_attention_varlen_backward``; prefix grads summed over the sequences
    (and query heads) using each bank entry in increasing sequence order: deterministic.
    """
    Nq, Hq, D, Hkv, T, P, S, scale, idx, lens, meta = _common(
        q, k, prefix_k, cu_seqlens_q, prefix_index, prefix_lens, softmax_scale)
    dev = q.device
    dq = torch.empty(q.shape, dtype=q.dtype, device=dev)
    dk = torch.empty(k.shape, dtype=k.dtype, device=dev)
    dv = torch.empty(v.shape, dtype=v.dtype, device=dev)
    dpk = torch.empty(prefix_k.shape, dtype=prefix_k.dtype, device=dev)
    dpv = torch.empty(prefix_v.shape, dtype=prefix_v.dtype, device=dev)
    if q.numel() == 0 or S <= 0 or max_seqlen_q <= 0:  # no queries: every grad is zero
        for t in (dq, dk, dv, dpk, dpv):
            t.zero_()
        return dq, dk, dv, dpk, dpv
    G = meta["GROUP"]
    M_MAX = max_seqlen_q * G
    D_PAD = meta["D_PAD"]

    # delta [Hq, Nq]: the padded kernel's, on the packed tensors seen as one row [1, Hq, Nq, D]
    delta = torch.empty(Hq, Nq, dtype=torch.float32, device=dev)
    BLOCK_L = 16
    _delta_kernel[(Hq, triton.cdiv(Nq, BLOCK_L))](
        out, grad_out, delta, 0, out.stride(1), out.stride(0), out.stride(2),
        0, grad_out.stride(1), grad_out.stride(0), grad_out.stride(2), Hq, Nq,
        HEAD_DIM=D, D_PAD=D_PAD, BLOCK=BLOCK_L,
    )

    seq_dpk = torch.empty(S, Hkv, P, D, dtype=torch.float32, device=dev)
    seq_dpv = torch.empty(S, Hkv, P, D, dtype=torch.float32, device=dev)
    common = (*q.stride(), *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(),
              *grad_out.stride(), *lse.stride())
    if P + max_seqlen_k > 0:  # every key token lies in a sequence: the kernel writes all of dk, dv
        kv_grid = lambda m: (triton.cdiv(P, m["BLOCK_N"]) + triton.cdiv(max_seqlen_k, m["BLOCK_N"]), S, Hkv)  # noqa
        launch(
            _bwd_kv_tuned, kv_grid,
            (q, k, v, prefix_k, prefix_v, idx, lens, cu_seqlens_q, cu_seqlens_k, grad_out, lse, delta,
             dk, dv, seq_dpk, seq_dpv, *common, *dk.stride(), *dv.stride(),
             Hkv, Nq, P, scale * LOG2E.value, scale, _bucket(M_MAX)),
            dict(CAUSAL=bool(causal), **meta), kernel=f"{OP}.bwd_kv", dtype=q.dtype,
        )
    else:
        dk.zero_()
        dv.zero_()
    q_grid = lambda m: (triton.cdiv(M_MAX, m["BLOCK_M"]), S, Hkv)  # noqa: E731
    launch(
        _bwd_q_tuned, q_grid,
        (q, k, v, prefix_k, prefix_v, idx, lens, cu_seqlens_q, cu_seqlens_k, grad_out, lse, delta, dq,
         *common, *dq.stride(), Hkv, Nq, P, scale * LOG2E.value, scale, _bucket(M_MAX)),
        dict(CAUSAL=bool(causal), **meta), kernel=f"{OP}.bwd_q", dtype=q.dtype,
    )

    N = Hkv * P * D
    if N > 0:
        BLOCK = 1024 if not INTERPRET else 256
        _prefix_reduce_kernel[(T, triton.cdiv(N, BLOCK))](
            seq_dpk, seq_dpv, idx, dpk, dpv, S, N, IDX_MODE=meta["IDX_MODE"], BLOCK=BLOCK,
        )
    else:
        dpk.zero_()
        dpv.zero_()
    return dq, dk, dv, dpk, dpv


register(OP, "triton", prefix_attention_varlen_fwd, supports)
register(f"{OP}_backward", "triton", prefix_attention_varlen_bwd, supports_bwd)
