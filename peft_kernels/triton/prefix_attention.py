"""Triton kernels for ``prefix_attention``: FlashAttention-2 style forward, split-K decode, backward.

Layout of the work (all kernels):

* GQA packing. One program owns one KV head of one batch row and a block of ``BLOCK_M`` *packed*
  query rows: row ``r`` of the packed axis (``0 <= r < Lq * G``, ``G = Hq // Hkv``) is query
  position ``i = r // G`` of query head ``hkv * G + r % G``. Every K/V tile is loaded once for the
  whole group (MQA decode with ``Lq = 1`` fills a 16-row tile from the group's heads instead of
  wasting 15 of 16 rows), and the group's heads are summed into dk/dv inside one program, so no
  atomics. Packing position-major keeps a block's query positions contiguous, so causal bounds are
  computed per block exactly as without packing.
* Two key sources. The key loop first walks the row's prefix straight from the bank
  ``prefix_k[t, hkv, :prefix_lens[t]]`` (``t = prefix_index[b]``; ``-1`` rows walk nothing), then
  the row's own keys. Sequence key blocks that every row of the tile may see run unmasked (only the
  key padding mask, if any, is applied); the remaining blocks up to the causal edge of the tile's
  last query run masked; blocks wholly above the diagonal are never visited.
* Decode (``Lq <= 16``) with too few programs to fill the GPU: the virtual key axis
  ``[prefix slots 0..P) ++ [sequence keys 0..Lk)`` is cut into ``S`` chunks, one program each
  (split-K / flash-decoding); a second kernel merges the partial outputs with their lse.
* Backward (FA2): ``delta = rowsum(dO * O)``; a dk/dv kernel with one program per key block (prefix
  blocks first, then sequence blocks) looping over the packed query rows; a dq kernel looping over
  keys. Prefix grads are written per row ``[B, Hkv, P, D]`` in fp32 and reduced per bank entry by a
  third kernel that adds rows in increasing ``b`` order: deterministic, no float atomics anywhere.

Softmax runs in base 2 (``exp2``) with the scale folded into the scores; all accumulation is fp32.
Head dims up to 256 are padded to a power of two (>= 16) inside the kernels with masks.

Configs (GPU): 16-bit and fp32 inputs have separate config lists, pruned per launch to the GPU
arch's shared memory and away from configs the compile check saw spill. Decode forward launches
(``Lq <= 16``) run the committed table's config (``configs/decode.json``) and never autotune, so
a decode step can be captured in a CUDA graph; the others autotune (``PEFT_KERNELS_AUTOTUNE``:
see ``_tuning``).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..ops._dispatch import register
from ._common import INTERPRET, MODE_PER_ROW, MODE_SHARED, index_mode, interpreting, on_tensor_device, sm_count
from ._tuning import drop_spilling, launch, smem_limit, tuned

LOG2E = tl.constexpr(1.4426950408889634)  # constexpr: readable inside @triton.jit
LN2 = tl.constexpr(0.6931471805599453)
MAX_HEAD_DIM = 256
MAX_GRID_Y = 65535  # CUDA limit on grid dims 1 and 2 (B * Hkv goes on dim 1)


# --------------------------------------------------------------------------- autotune configs


def _cfg(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# The GPU config lists of 16-bit inputs (first: the default), by kernel; the arch-aware pruners below
# screen them (shared memory, and the spills the compile check saw).
GPU_CONFIGS = {
    "fwd": [
        _cfg(128, 64, 8, 3),
        _cfg(128, 128, 8, 3),
        _cfg(64, 64, 4, 3),
        _cfg(64, 128, 4, 3),
        _cfg(64, 64, 8, 3),
        _cfg(128, 32, 8, 3),
        _cfg(64, 32, 4, 3),
        # decode-sized tiles (few packed query rows)
        _cfg(16, 64, 4, 3),
        _cfg(16, 128, 4, 3),
        _cfg(32, 64, 4, 2),
        # small enough for anything (fp32, D = 256)
        _cfg(32, 32, 4, 1),
    ],
    "bwd_kv": [  # BLOCK_N: the program's key block; BLOCK_M: the query-row step
        _cfg(32, 128, 8, 2),
        _cfg(32, 128, 4, 3),
        _cfg(64, 64, 4, 2),
        _cfg(32, 64, 4, 2),
        _cfg(32, 64, 8, 2),
        _cfg(16, 128, 8, 2),
        _cfg(16, 64, 4, 2),
        _cfg(16, 32, 4, 1),
    ],
    "bwd_q": [  # BLOCK_M: the program's query rows; BLOCK_N: the key step
        _cfg(128, 32, 8, 2),
        _cfg(128, 32, 4, 3),
        _cfg(64, 64, 4, 2),
        _cfg(64, 64, 8, 2),
        _cfg(64, 32, 4, 2),
        _cfg(32, 64, 4, 2),
        _cfg(16, 32, 4, 1),
    ],
}
# fp32 inputs take exact fp32 dots on the FMA units ("ieee"), whose register tiles are far larger:
# the 16-bit tiles make ptxas give up (32 registers and tens of KB of spills), so fp32 has its own.
FP32_CONFIGS = {
    "fwd": [_cfg(16, 64, 4, 2), _cfg(16, 64, 8, 2), _cfg(32, 32, 8, 1), _cfg(16, 32, 4, 1)],
    "bwd_kv": [_cfg(16, 32, 8, 1), _cfg(16, 32, 4, 1), _cfg(16, 16, 4, 1)],
    "bwd_q": [_cfg(16, 32, 8, 1), _cfg(16, 32, 4, 1), _cfg(16, 16, 4, 1)],
}
# Under the interpreter one small config: fast on the CPU, and tiny test shapes span several blocks.
_FWD_CONFIGS, _BWD_KV_CONFIGS, _BWD_Q_CONFIGS = (
    [_cfg(8, 4, 1, 1)] if INTERPRET else GPU_CONFIGS[k] + FP32_CONFIGS[k] for k in ("fwd", "bwd_kv", "bwd_q"))


# Shared-memory tile rows per kernel, as (resident, per pipeline stage) multiples of (BLOCK_M, BLOCK_N):
# the forward keeps its Q tile and streams K and V; the dk/dv kernel keeps K, V and streams Q, dO;
# the dq kernel keeps Q, dO and streams K, V.
_SMEM_ROWS = {"fwd": ((1, 0), (0, 2)), "bwd_kv": ((0, 2), (2, 0)), "bwd_q": ((2, 0), (0, 2))}


def smem_estimate(kernel: str, config, esize: int, d_pad: int) -> int:
    """Bytes of shared memory a config of ``kernel`` ("fwd", "bwd_kv", "bwd_q") needs at most.

    Semantics: (resident rows + num_stages * streamed rows) * D_PAD * element size, plus one
    BLOCK_M x BLOCK_N tile in the backward kernels (p and ds are transposed through shared memory)
    and 1 KiB of reduction scratch; the compile check (tools/compile_triton.py) holds it against
    what the compiler allocates for every kept config.
    """
    (rm, rn), (sm, sn) = _SMEM_ROWS[kernel]
    bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    rows = rm * bm + rn * bn + max(config.num_stages, 1) * (sm * bm + sn * bn)
    transposed = bm * bn * esize if kernel != "fwd" else 0
    return rows * d_pad * esize + transposed + 1024


def _family(kernel: str, esize: int) -> list:
    return FP32_CONFIGS[kernel] if esize == 4 else GPU_CONFIGS[kernel]


def _same_as_any(cfg, configs) -> bool:
    return any(cfg.kwargs == c.kwargs and (cfg.num_warps, cfg.num_stages) == (c.num_warps, c.num_stages)
               for c in configs)


def _pruner(kernel: str, op: str = "prefix_attention"):
    """The arch-aware pruner of ``kernel``'s configs; ``op`` names the kernel file in the spill list
    (the packed-sequence kernels reuse these tiles under their own name)."""

    def prune(configs, named, arch: int, screen_spills: bool = True) -> list:
        """Drop tiles much taller than the packed query axis (decode), tiles over the arch's shared
        memory and (``screen_spills``) configs the compile check saw spill, keeping at least one
        config (the last: the smallest)."""
        bucket = named["M_BUCKET"]
        esize = named["Q"].element_size()
        d_pad = named["D_PAD"]
        limit = smem_limit(arch)
        family = _family(kernel, esize)
        # the dtype's own list, in its order (a config on both lists is taken once)
        configs = [next(c for c in configs if _same_as_any(c, [f])) for f in family
                   if _same_as_any(f, configs)] or list(configs)
        kept = [c for c in configs
                if c.kwargs["BLOCK_M"] <= max(16, bucket) and smem_estimate(kernel, c, esize, d_pad) <= limit]
        kept = kept or list(configs[-1:])
        if screen_spills:
            kept = drop_spilling(f"{op}.{kernel}", kept, named["Q"].dtype, d_pad, arch)
        return kept

    return prune


def _bucket(n: int) -> int:
    """Autotune key for a length: its power-of-two ceiling, capped (long sequences share one tuning)."""
    return min(triton.next_power_of_2(max(int(n), 1)), 256)


def decode_bucket(Lq: int, m_total: int, d_pad: int, split: bool) -> Optional[str]:
    """The forward's row in the decode config table, or None when the launch is not a decode step.

    Semantics: decode is ``Lq <= 16`` (the split-K path's query lengths on a GPU); the bucket is the
    padded head dim, the packed query rows (Lq * group) rounded up to 16, 64 or 256, and whether
    the keys are split.
    """
    if Lq > 16:
        return None
    m = 16 if m_total <= 16 else 64 if m_total <= 64 else 256
    return f"d_pad={d_pad},m={m},split={int(split)}"


# Decode shapes the committed config table covers (one per bucket family; split as on a GPU with
# >= 64 SMs): single-token and 16-token (speculative) steps, one long row and a wide batch.
DECODE_SHAPES = (
    dict(B=1, Hq=8, Hkv=2, Lq=1, Lk=512, split=True),
    dict(B=64, Hq=8, Hkv=2, Lq=1, Lk=64, split=False),
    dict(B=1, Hq=8, Hkv=2, Lq=16, Lk=512, split=True),
    dict(B=64, Hq=8, Hkv=2, Lq=16, Lk=64, split=False),
)
DECODE_HEAD_DIMS = (64, 128)


# --------------------------------------------------------------------------- shared jit helpers


@triton.jit
def _row_prefix(IDX, LENS, b, P, IDX_MODE: tl.constexpr, HAS_LENS: tl.constexpr):
    """The row's bank entry (clamped to >= 0) and how many prefix slots it sees (0 for -1 rows)."""
    if IDX_MODE == MODE_SHARED:
        t = b * 0
    elif IDX_MODE == MODE_PER_ROW:
        t = b
    else:
        t = tl.load(IDX + b).to(tl.int32)
    if HAS_LENS:
        plen = tl.load(LENS + tl.maximum(t, 0)).to(tl.int32)
    else:
        plen = t * 0 + P
    plen = tl.where(t >= 0, plen, 0)
    return tl.maximum(t, 0), plen


@triton.jit
def _load_tile(ptrs, row_ok, d_ok, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    if MASK_ROWS:
        if EVEN_D:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    return x


@triton.jit
def _query_rows(m_blk, h64, M_TOTAL, GROUP: tl.constexpr, BLOCK_M: tl.constexpr):
    """(offs_r, row_ok, qi, qh) of packed query block ``m_blk``: row r is query r // G of head h * G + r % G."""
    offs_r = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
    return offs_r, offs_r < M_TOTAL, offs_r // GROUP, h64 * GROUP + offs_r % GROUP


@triton.jit
def _key_bounds(m_blk, Lq, Lk, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """(full_end, seq_end): every row of packed query block ``m_blk`` sees keys [0, full_end), some
    row sees [full_end, seq_end), none sees a key past seq_end (bottom-right causal)."""
    if CAUSAL:
        shift = Lk - Lq
        i_lo = (m_blk * BLOCK_M) // GROUP
        i_hi = tl.minimum((m_blk * BLOCK_M + BLOCK_M - 1) // GROUP, Lq - 1)
        seq_end = tl.minimum(tl.maximum(i_hi + shift + 1, 0), Lk)
        full_end = tl.minimum(tl.maximum(i_lo + shift + 1, 0), seq_end)
    else:
        seq_end = Lk
        full_end = Lk
    return full_end, seq_end


# --------------------------------------------------------------------------- forward


@triton.jit
def _fwd_inner(
    acc, m_i, l_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd, KPM, stride_ml,
    lo, hi, row_limit, qk_scale, offs_n, offs_d, d_ok,
    BLOCK_N: tl.constexpr, MASK_KEYS: tl.constexpr, CAUSAL_MASK: tl.constexpr, HAS_KPM: tl.constexpr,
    EVEN_D: tl.constexpr, PREC: tl.constexpr,
):
    """Online softmax over keys [lo, hi) of one source; ``row_limit[m]`` = last key row m sees."""
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < hi
        k = _load_tile(K + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, col_ok, d_ok, MASK_KEYS, EVEN_D)
        v = _load_tile(V + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, col_ok, d_ok, MASK_KEYS, EVEN_D)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        if MASK_KEYS:
            s = tl.where(col_ok[None, :], s, float("-inf"))
        if HAS_KPM:
            if MASK_KEYS:
                keep = tl.load(KPM + cols * stride_ml, mask=col_ok, other=0)
            else:
                keep = tl.load(KPM + cols * stride_ml)
            s = tl.where((keep != 0)[None, :], s, float("-inf"))
        if CAUSAL_MASK:
            s = tl.where(cols[None, :] <= row_limit[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_tile(
    q, row_limit, full_end, seq_end, PK, PV, stride_pkp, stride_pkd, stride_pvp, stride_pvd, p_lo, p_hi,
    K, V, KPM, row, h64, stride_krow, stride_kh, stride_vrow, stride_vh, stride_mrow,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_ml, k_lo, k_hi, P, qk_scale, offs_n, offs_d, d_ok,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
    SPLIT: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr,
):
    """(out, lse) of one packed query tile over its two key sources: the prefix slots [p_lo, p_hi)
    at PK / PV, then the keys of ``row`` (a batch row or, packed, the first key token) at
    K / V / KPM + row * stride_*row (+ KV head h64). ``row_limit[m]`` is the last key row m sees,
    ``full_end`` / ``seq_end`` bound the keys every / some row of the tile sees (``_key_bounds``).
    SPLIT takes only the share [k_lo, k_hi) of the virtual key axis; else the key blocks every row
    sees in full run unmasked, then the diagonal band and the ragged end masked. Rows that see no
    key get 0 and lse -inf."""
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    acc, m_i, l_i = _fwd_inner(
        acc, m_i, l_i, q, PK, PV, stride_pkp, stride_pkd, stride_pvp, stride_pvd, KPM, stride_ml,
        p_lo, p_hi, row_limit, qk_scale, offs_n, offs_d, d_ok,
        BLOCK_N, True, False, False, EVEN_D, PREC,
    )
    K = K + row * stride_krow + h64 * stride_kh
    V = V + row * stride_vrow + h64 * stride_vh
    KPM = KPM + row * stride_mrow
    if SPLIT:
        s_lo = tl.minimum(tl.maximum(k_lo - P, 0), seq_end)
        s_hi = tl.minimum(tl.maximum(k_hi - P, 0), seq_end)
        acc, m_i, l_i = _fwd_inner(
            acc, m_i, l_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd, KPM, stride_ml,
            s_lo, s_hi, row_limit, qk_scale, offs_n, offs_d, d_ok,
            BLOCK_N, True, CAUSAL, HAS_KPM, EVEN_D, PREC,
        )
    else:
        full_aligned = (full_end // BLOCK_N) * BLOCK_N
        acc, m_i, l_i = _fwd_inner(
            acc, m_i, l_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd, KPM, stride_ml,
            0, full_aligned, row_limit, qk_scale, offs_n, offs_d, d_ok,
            BLOCK_N, False, False, HAS_KPM, EVEN_D, PREC,
        )
        acc, m_i, l_i = _fwd_inner(
            acc, m_i, l_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd, KPM, stride_ml,
            full_aligned, seq_end, row_limit, qk_scale, offs_n, offs_d, d_ok,
            BLOCK_N, True, CAUSAL, HAS_KPM, EVEN_D, PREC,
        )
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
    return out, lse


@triton.jit
def _store_partials(OP, LP, base, out, lse, offs_r, row_ok, offs_d, d_ok, HEAD_DIM: tl.constexpr):
    """One split's fp32 partials: OP[base + r, :] = out, LP[base + r] = lse."""
    tl.store(OP + (base + offs_r)[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LP + base + offs_r, lse, mask=row_ok)


@triton.jit
def _merge_splits(OP, LP, first, n_splits, M_STRIDE, offs_r, row_ok, offs_d, mask,
                  BLOCK_R: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """(out, lse) of rows ``offs_r`` merged over the split-K partials ``first .. first + n_splits``
    (partial i at rows (first + i) * M_STRIDE of OP / LP): out = sum_i exp(lse_i - lse) out_i."""
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, D_PAD], tl.float32)
    for i in range(0, n_splits):
        base = (first + i) * M_STRIDE
        ls = tl.load(LP + base + offs_r, mask=row_ok, other=float("-inf"))
        o = tl.load(OP + (base + offs_r)[:, None] * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0)
        m_new = tl.maximum(m, ls)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        w = tl.exp(ls - m_safe)
        acc = acc * alpha[:, None] + o * w[:, None]
        l = l * alpha + w
        m = m_new
    seen = l > 0.0
    out = acc / tl.where(seen, l, 1.0)[:, None]
    lse = tl.where(seen, m + tl.log(tl.where(seen, l, 1.0)), float("-inf"))
    return out, lse


@triton.jit(do_not_specialize=["Lq", "Lk", "P", "M_TOTAL", "split_len"])  # lengths vary per batch: no recompiles
def _fwd_kernel(
    Q, K, V, PK, PV, IDX, LENS, KPM, O, LSE, OP, LP,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_pkt, stride_pkh, stride_pkp, stride_pkd,
    stride_pvt, stride_pvh, stride_pvp, stride_pvd,
    stride_mb, stride_ml,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_lb, stride_lh, stride_ll,
    Hkv, Lq, Lk, P, M_TOTAL, split_len, qk_scale,
    M_BUCKET,  # autotune key only
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    IDX_MODE: tl.constexpr, HAS_LENS: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
    SPLIT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    m_blk = tl.num_programs(0) - 1 - pid_m  # heaviest (latest, causal) tiles first
    b = pid_bh // Hkv
    hkv = pid_bh % Hkv
    b64 = b.to(tl.int64)
    h64 = hkv.to(tl.int64)
    EVEN_D: tl.constexpr = HEAD_DIM == D_PAD

    offs_r, row_ok, qi, qh = _query_rows(m_blk, h64, M_TOTAL, GROUP, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    q = _load_tile(Q + b64 * stride_qb + qh[:, None] * stride_qh + qi[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                   row_ok, d_ok, True, EVEN_D)

    row_limit = qi + (Lk - Lq)  # bottom-right causal: query i sees key j <= i + Lk - Lq
    full_end, seq_end = _key_bounds(m_blk, Lq, Lk, GROUP, BLOCK_M, CAUSAL)

    # this program's share of the virtual key axis [prefix slots 0..P) ++ [sequence keys 0..Lk):
    # the row's prefix read from the bank, then its own keys
    k_lo = pid_s * split_len
    k_hi = k_lo + split_len
    t, plen = _row_prefix(IDX, LENS, b, P, IDX_MODE, HAS_LENS)
    t64 = t.to(tl.int64)
    out, lse = _fwd_tile(
        q, row_limit, full_end, seq_end, PK + t64 * stride_pkt + h64 * stride_pkh,
        PV + t64 * stride_pvt + h64 * stride_pvh, stride_pkp, stride_pkd, stride_pvp, stride_pvd,
        tl.minimum(k_lo, plen), tl.minimum(k_hi, plen),
        K, V, KPM, b64, h64, stride_kb, stride_kh, stride_vb, stride_vh, stride_mb,
        stride_kl, stride_kd, stride_vl, stride_vd, stride_ml, k_lo, k_hi, P, qk_scale, offs_n, offs_d, d_ok,
        BLOCK_M, BLOCK_N, D_PAD, SPLIT, CAUSAL, HAS_KPM, EVEN_D, PREC,
    )
    if SPLIT:
        base = (pid_bh.to(tl.int64) * tl.num_programs(2) + pid_s) * M_TOTAL
        _store_partials(OP, LP, base, out, lse, offs_r, row_ok, offs_d, d_ok, HEAD_DIM)
    else:
        tl.store(O + b64 * stride_ob + qh[:, None] * stride_oh + qi[:, None] * stride_ol + offs_d[None, :] * stride_od,
                 out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        tl.store(LSE + b64 * stride_lb + qh * stride_lh + qi * stride_ll, lse, mask=row_ok)


@triton.jit(do_not_specialize=["M_TOTAL", "NUM_SPLITS"])  # lengths vary per batch: no recompiles
def _combine_kernel(
    OP, LP, O, LSE,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_lb, stride_lh, stride_ll,
    Hkv, M_TOTAL, NUM_SPLITS,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Merge the split-K partials of BLOCK_R packed rows: out = sum_s exp(lse_s - lse) out_s."""
    pid_r = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b64 = (pid_bh // Hkv).to(tl.int64)
    h64 = (pid_bh % Hkv).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = offs_r < M_TOTAL
    offs_d = tl.arange(0, D_PAD)
    mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    out, lse = _merge_splits(OP, LP, pid_bh.to(tl.int64) * NUM_SPLITS, NUM_SPLITS, M_TOTAL, offs_r, row_ok, offs_d,
                             mask, BLOCK_R, HEAD_DIM, D_PAD)
    qi = offs_r // GROUP
    qh = h64 * GROUP + offs_r % GROUP
    tl.store(O + b64 * stride_ob + qh[:, None] * stride_oh + qi[:, None] * stride_ol + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=mask)
    tl.store(LSE + b64 * stride_lb + qh * stride_lh + qi * stride_ll, lse, mask=row_ok)


_fwd_tuned = tuned(_fwd_kernel, _FWD_CONFIGS, ["M_BUCKET", "GROUP", "HEAD_DIM", "CAUSAL", "SPLIT", "HAS_KPM"],
                   _pruner("fwd"))


# --------------------------------------------------------------------------- backward


@triton.jit(do_not_specialize=["Lq"])  # lengths vary per batch: no recompiles
def _delta_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_gb, stride_gh, stride_gl, stride_gd,
    Hq, Lq,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    """delta[b, h, i] = sum_d dO * O (fp32), the softmax-backward row term."""
    pid_bh = tl.program_id(0)
    pid = tl.program_id(1)
    b64 = (pid_bh // Hq).to(tl.int64)
    h64 = (pid_bh % Hq).to(tl.int64)
    offs_l = pid * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D_PAD)
    mask = (offs_l < Lq)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b64 * stride_ob + h64 * stride_oh + offs_l[:, None] * stride_ol + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b64 * stride_gb + h64 * stride_gh + offs_l[:, None] * stride_gl + offs_d[None, :] * stride_gd,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * Lq + offs_l, tl.sum(o * do, 1), mask=offs_l < Lq)


@triton.jit
def _bwd_kv_inner(
    dk, dv, k, v, col_ok, cols, Q, DO, LSE, DELTA,
    stride_qh, stride_ql, stride_qd, stride_gh, stride_gl, stride_gd, stride_lh, stride_ll,
    h64, Lq, M_TOTAL, qk_scale, lo, hi, shift, offs_m, offs_d, d_ok,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL_MASK: tl.constexpr, EVEN_D: tl.constexpr,
    PREC: tl.constexpr,
):
    """Accumulate one key block's dk, dv over packed query rows [lo, hi) (Q, DO, LSE, DELTA: row b)."""
    for start in range(lo, hi, BLOCK_M):
        rows = start + offs_m
        row_ok = rows < M_TOTAL
        qi = rows // GROUP
        qh = h64 * GROUP + rows % GROUP
        q = _load_tile(Q + qh[:, None] * stride_qh + qi[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                       row_ok, d_ok, True, EVEN_D)
        do = _load_tile(DO + qh[:, None] * stride_gh + qi[:, None] * stride_gl + offs_d[None, :] * stride_gd,
                        row_ok, d_ok, True, EVEN_D)
        lse = tl.load(LSE + qh * stride_lh + qi * stride_ll, mask=row_ok, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E  # rows that saw nothing: p = 0
        delta = tl.load(DELTA + qh * Lq + qi, mask=row_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        p = tl.exp2(s - lse[:, None])
        valid = col_ok[None, :]
        if CAUSAL_MASK:
            valid = valid & (cols[None, :] <= (qi + shift)[:, None])
        p = tl.where(valid, p, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
    return dk, dv


@triton.jit
def _bwd_kv_prefix_block(
    dk, dv, DPK, DPV, PK, PV, stride_pkp, stride_pkd, stride_pvp, stride_pvd, plen, rh64, P, blk,
    Q, DO, LSE, DELTA, stride_qh, stride_ql, stride_qd, stride_gh, stride_gl, stride_gd, stride_lh, stride_ll,
    h64, Lq, M_TOTAL, qk_scale, sm_scale, shift, offs_n, offs_m, offs_d, d_ok,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_D: tl.constexpr, PREC: tl.constexpr,
):
    """Prefix key block ``blk`` of one (row, KV head) ``rh64``: PK / PV point at its bank entry's
    head, ``plen`` slots are real; writes its fp32 grads to DPK / DPV [rows * Hkv, P, D] (zeros
    past plen) and does no work past the row's prefix."""
    cols = blk * BLOCK_N + offs_n
    col_ok = cols < plen
    k = _load_tile(PK + cols[:, None] * stride_pkp + offs_d[None, :] * stride_pkd, col_ok, d_ok, True, EVEN_D)
    v = _load_tile(PV + cols[:, None] * stride_pvp + offs_d[None, :] * stride_pvd, col_ok, d_ok, True, EVEN_D)
    hi = tl.where(blk * BLOCK_N < plen, M_TOTAL, 0)
    dk, dv = _bwd_kv_inner(
        dk, dv, k, v, col_ok, cols, Q, DO, LSE, DELTA,
        stride_qh, stride_ql, stride_qd, stride_gh, stride_gl, stride_gd, stride_lh, stride_ll,
        h64, Lq, M_TOTAL, qk_scale, 0, hi, shift, offs_m, offs_d, d_ok,
        GROUP, BLOCK_M, False, EVEN_D, PREC,
    )
    base = (rh64 * P + cols) * HEAD_DIM
    mask = (cols < P)[:, None] & d_ok[None, :]
    tl.store(DPK + base[:, None] + offs_d[None, :], dk * sm_scale, mask=mask)
    tl.store(DPV + base[:, None] + offs_d[None, :], dv, mask=mask)


@triton.jit
def _bwd_kv_seq_rows(
    dk, dv, k, v, col_ok, cols, Q, DO, LSE, DELTA,
    stride_qh, stride_ql, stride_qd, stride_gh, stride_gl, stride_gd, stride_lh, stride_ll,
    h64, Lq, M_TOTAL, qk_scale, n0, shift, offs_m, offs_d, d_ok,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    EVEN_D: tl.constexpr, PREC: tl.constexpr,
):
    """dk, dv of the sequence key block starting at key ``n0`` over every packed query row that
    sees it: causal rows before r_lo see none of it and are skipped, rows [r_lo, r_full) run
    masked, rows from r_full on see all of it and run unmasked."""
    if CAUSAL:
        r_lo = (tl.maximum(n0 - shift, 0) * GROUP // BLOCK_M) * BLOCK_M
        r_lo = tl.minimum(r_lo, M_TOTAL)
        r_full = tl.minimum(tl.maximum(n0 + BLOCK_N - 1 - shift, 0) * GROUP, M_TOTAL)
        r_full = tl.maximum(tl.cdiv(r_full, BLOCK_M) * BLOCK_M, r_lo)
        dk, dv = _bwd_kv_inner(
            dk, dv, k, v, col_ok, cols, Q, DO, LSE, DELTA,
            stride_qh, stride_ql, stride_qd, stride_gh, stride_gl, stride_gd, stride_lh, stride_ll,
            h64, Lq, M_TOTAL, qk_scale, r_lo, r_full, shift, offs_m, offs_d, d_ok,
            GROUP, BLOCK_M, True, EVEN_D, PREC,
        )
        r_start = r_full
    else:
        r_start = 0
    dk, dv = _bwd_kv_inner(
        dk, dv, k, v, col_ok, cols, Q, DO, LSE, DELTA,
        stride_qh, stride_ql, stride_qd, stride_gh, stride_gl, stride_gd, stride_lh, stride_ll,
        h64, Lq, M_TOTAL, qk_scale, r_start, M_TOTAL, shift, offs_m, offs_d, d_ok,
        GROUP, BLOCK_M, False, EVEN_D, PREC,
    )
    return dk, dv


@triton.jit(do_not_specialize=["Lq", "Lk", "P", "M_TOTAL"])  # lengths vary per batch: no recompiles
def _bwd_kv_kernel(
    Q, K, V, PK, PV, IDX, LENS, KPM, DO, LSE, DELTA, DK, DV, DPK, DPV,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_pkt, stride_pkh, stride_pkp, stride_pkd,
    stride_pvt, stride_pvh, stride_pvp, stride_pvd,
    stride_mb, stride_ml,
    stride_gb, stride_gh, stride_gl, stride_gd,
    stride_lb, stride_lh, stride_ll,
    stride_dkb, stride_dkh, stride_dkl, stride_dkd,
    stride_dvb, stride_dvh, stride_dvl, stride_dvd,
    Hkv, Lq, Lk, P, M_TOTAL, qk_scale, sm_scale,
    M_BUCKET,  # autotune key only
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    IDX_MODE: tl.constexpr, HAS_LENS: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dk, dv of one key block: prefix blocks (program ids first) write per-row fp32 prefix grads
    DPK/DPV [B, Hkv, P, D]; sequence blocks write dk, dv. The group's query heads are summed here."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    hkv = pid_bh % Hkv
    b64 = b.to(tl.int64)
    h64 = hkv.to(tl.int64)
    EVEN_D: tl.constexpr = HEAD_DIM == D_PAD
    n_prefix_blocks = tl.cdiv(P, BLOCK_N)
    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    Q_b = Q + b64 * stride_qb
    DO_b = DO + b64 * stride_gb
    LSE_b = LSE + b64 * stride_lb
    DELTA_b = DELTA + b64 * (Hkv * GROUP) * Lq
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    shift = Lk - Lq
    if pid_n < n_prefix_blocks:
        t, plen = _row_prefix(IDX, LENS, b, P, IDX_MODE, HAS_LENS)
        t64 = t.to(tl.int64)
        _bwd_kv_prefix_block(
            dk, dv, DPK, DPV, PK + t64 * stride_pkt + h64 * stride_pkh, PV + t64 * stride_pvt + h64 * stride_pvh,
            stride_pkp, stride_pkd, stride_pvp, stride_pvd, plen, pid_bh.to(tl.int64), P, pid_n,
            Q_b, DO_b, LSE_b, DELTA_b, stride_qh, stride_ql, stride_qd, stride_gh, stride_gl, stride_gd,
            stride_lh, stride_ll, h64, Lq, M_TOTAL, qk_scale, sm_scale, shift, offs_n, offs_m, offs_d, d_ok,
            HEAD_DIM, GROUP, BLOCK_M, BLOCK_N, EVEN_D, PREC,
        )
    else:
        n0 = (pid_n - n_prefix_blocks) * BLOCK_N
        cols = n0 + offs_n
        col_ok = cols < Lk
        if HAS_KPM:
            keep = tl.load(KPM + b64 * stride_mb + cols * stride_ml, mask=col_ok, other=0)
            col_ok = col_ok & (keep != 0)
        k = _load_tile(K + b64 * stride_kb + h64 * stride_kh + cols[:, None] * stride_kl + offs_d[None, :] * stride_kd,
                       cols < Lk, d_ok, True, EVEN_D)
        v = _load_tile(V + b64 * stride_vb + h64 * stride_vh + cols[:, None] * stride_vl + offs_d[None, :] * stride_vd,
                       cols < Lk, d_ok, True, EVEN_D)
        dk, dv = _bwd_kv_seq_rows(
            dk, dv, k, v, col_ok, cols, Q_b, DO_b, LSE_b, DELTA_b,
            stride_qh, stride_ql, stride_qd, stride_gh, stride_gl, stride_gd, stride_lh, stride_ll,
            h64, Lq, M_TOTAL, qk_scale, n0, shift, offs_m, offs_d, d_ok,
            GROUP, BLOCK_M, BLOCK_N, CAUSAL, EVEN_D, PREC,
        )
        mask = (cols < Lk)[:, None] & d_ok[None, :]
        tl.store(DK + b64 * stride_dkb + h64 * stride_dkh + cols[:, None] * stride_dkl + offs_d[None, :] * stride_dkd,
                 (dk * sm_scale).to(DK.dtype.element_ty), mask=mask)
        tl.store(DV + b64 * stride_dvb + h64 * stride_dvh + cols[:, None] * stride_dvl + offs_d[None, :] * stride_dvd,
                 dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_q_inner(
    dq, q, do, lse, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd, KPM, stride_ml,
    lo, hi, row_limit, qk_scale, offs_n, offs_d, d_ok,
    BLOCK_N: tl.constexpr, MASK_KEYS: tl.constexpr, CAUSAL_MASK: tl.constexpr, HAS_KPM: tl.constexpr,
    EVEN_D: tl.constexpr, PREC: tl.constexpr,
):
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < hi
        k = _load_tile(K + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, col_ok, d_ok, MASK_KEYS, EVEN_D)
        v = _load_tile(V + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, col_ok, d_ok, MASK_KEYS, EVEN_D)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        p = tl.exp2(s - lse[:, None])
        if MASK_KEYS:
            p = tl.where(col_ok[None, :], p, 0.0)
        if HAS_KPM:
            if MASK_KEYS:
                keep = tl.load(KPM + cols * stride_ml, mask=col_ok, other=0)
            else:
                keep = tl.load(KPM + cols * stride_ml)
            p = tl.where((keep != 0)[None, :], p, 0.0)
        if CAUSAL_MASK:
            p = tl.where(cols[None, :] <= row_limit[:, None], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    return dq


@triton.jit
def _bwd_q_keys(
    dq, q, do, lse, delta, PK, PV, stride_pkp, stride_pkd, stride_pvp, stride_pvd, plen,
    K, V, KPM, row, h64, stride_krow, stride_kh, stride_vrow, stride_vh, stride_mrow,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_ml, full_end, seq_end, row_limit, qk_scale, offs_n, offs_d, d_ok,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr,
):
    """dq (unscaled, fp32) of one packed query tile over both key sources: the ``plen`` prefix
    slots at PK / PV, then the keys of ``row`` at K / V / KPM + row * stride_*row (+ KV head h64):
    the blocks every row sees in full unmasked, then the diagonal band and the ragged end masked."""
    dq = _bwd_q_inner(
        dq, q, do, lse, delta, PK, PV, stride_pkp, stride_pkd, stride_pvp, stride_pvd, KPM, stride_ml,
        0, plen, row_limit, qk_scale, offs_n, offs_d, d_ok,
        BLOCK_N, True, False, False, EVEN_D, PREC,
    )
    K = K + row * stride_krow + h64 * stride_kh
    V = V + row * stride_vrow + h64 * stride_vh
    KPM = KPM + row * stride_mrow
    full_aligned = (full_end // BLOCK_N) * BLOCK_N
    dq = _bwd_q_inner(
        dq, q, do, lse, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd, KPM, stride_ml,
        0, full_aligned, row_limit, qk_scale, offs_n, offs_d, d_ok,
        BLOCK_N, False, False, HAS_KPM, EVEN_D, PREC,
    )
    dq = _bwd_q_inner(
        dq, q, do, lse, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd, KPM, stride_ml,
        full_aligned, seq_end, row_limit, qk_scale, offs_n, offs_d, d_ok,
        BLOCK_N, True, CAUSAL, HAS_KPM, EVEN_D, PREC,
    )
    return dq


@triton.jit(do_not_specialize=["Lq", "Lk", "P", "M_TOTAL"])  # lengths vary per batch: no recompiles
def _bwd_q_kernel(
    Q, K, V, PK, PV, IDX, LENS, KPM, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_pkt, stride_pkh, stride_pkp, stride_pkd,
    stride_pvt, stride_pvh, stride_pvp, stride_pvd,
    stride_mb, stride_ml,
    stride_gb, stride_gh, stride_gl, stride_gd,
    stride_lb, stride_lh, stride_ll,
    stride_dqb, stride_dqh, stride_dql, stride_dqd,
    Hkv, Lq, Lk, P, M_TOTAL, qk_scale, sm_scale,
    M_BUCKET,  # autotune key only
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    IDX_MODE: tl.constexpr, HAS_LENS: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    m_blk = tl.num_programs(0) - 1 - pid_m
    b = pid_bh // Hkv
    hkv = pid_bh % Hkv
    b64 = b.to(tl.int64)
    h64 = hkv.to(tl.int64)
    EVEN_D: tl.constexpr = HEAD_DIM == D_PAD

    offs_r, row_ok, qi, qh = _query_rows(m_blk, h64, M_TOTAL, GROUP, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    q = _load_tile(Q + b64 * stride_qb + qh[:, None] * stride_qh + qi[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                   row_ok, d_ok, True, EVEN_D)
    do = _load_tile(DO + b64 * stride_gb + qh[:, None] * stride_gh + qi[:, None] * stride_gl + offs_d[None, :] * stride_gd,
                    row_ok, d_ok, True, EVEN_D)
    lse = tl.load(LSE + b64 * stride_lb + qh * stride_lh + qi * stride_ll, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E
    delta = tl.load(DELTA + (b64 * (Hkv * GROUP) + qh) * Lq + qi, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    row_limit = qi + (Lk - Lq)
    full_end, seq_end = _key_bounds(m_blk, Lq, Lk, GROUP, BLOCK_M, CAUSAL)

    t, plen = _row_prefix(IDX, LENS, b, P, IDX_MODE, HAS_LENS)
    t64 = t.to(tl.int64)
    dq = _bwd_q_keys(
        dq, q, do, lse, delta, PK + t64 * stride_pkt + h64 * stride_pkh, PV + t64 * stride_pvt + h64 * stride_pvh,
        stride_pkp, stride_pkd, stride_pvp, stride_pvd, plen,
        K, V, KPM, b64, h64, stride_kb, stride_kh, stride_vb, stride_vh, stride_mb,
        stride_kl, stride_kd, stride_vl, stride_vd, stride_ml, full_end, seq_end, row_limit, qk_scale, offs_n, offs_d,
        d_ok, BLOCK_N, CAUSAL, HAS_KPM, EVEN_D, PREC,
    )
    tl.store(DQ + b64 * stride_dqb + qh[:, None] * stride_dqh + qi[:, None] * stride_dql + offs_d[None, :] * stride_dqd,
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _prefix_reduce_kernel(
    RK, RV, IDX, OK, OV, B, N,
    IDX_MODE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Bank grads: OK[t] = sum over rows b using entry t of RK[b] (rows added in increasing b).

    RK, RV: per-row fp32 grads [B, N]; OK, OV: [T, N] in the bank's dtype.
    """
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    t64 = t.to(tl.int64)
    if IDX_MODE == MODE_PER_ROW:  # row b uses entry b: a cast
        gk = tl.load(RK + t64 * N + offs, mask=mask, other=0.0)
        gv = tl.load(RV + t64 * N + offs, mask=mask, other=0.0)
    else:
        gk = tl.zeros([BLOCK], tl.float32)
        gv = tl.zeros([BLOCK], tl.float32)
        rk = RK + offs
        rv = RV + offs
        for b in range(0, B):
            if IDX_MODE == MODE_SHARED:
                tb = 0
            else:
                tb = tl.load(IDX + b).to(tl.int32)
            if tb == t:
                gk += tl.load(rk, mask=mask, other=0.0)
                gv += tl.load(rv, mask=mask, other=0.0)
            rk += N  # pointer arithmetic: 64-bit, no int32 overflow for large B * N
            rv += N
    tl.store(OK + t64 * N + offs, gk.to(OK.dtype.element_ty), mask=mask)
    tl.store(OV + t64 * N + offs, gv.to(OV.dtype.element_ty), mask=mask)


_bwd_kv_tuned = tuned(_bwd_kv_kernel, _BWD_KV_CONFIGS, ["M_BUCKET", "GROUP", "HEAD_DIM", "CAUSAL", "HAS_KPM"],
                      _pruner("bwd_kv"))
_bwd_q_tuned = tuned(_bwd_q_kernel, _BWD_Q_CONFIGS, ["M_BUCKET", "GROUP", "HEAD_DIM", "CAUSAL", "HAS_KPM"],
                     _pruner("bwd_q"))


# --------------------------------------------------------------------------- launchers

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def supports(q, k, v, prefix_k, prefix_v, prefix_index=None, prefix_lens=None, key_padding_mask=None,
             causal=True, softmax_scale=None, *rest) -> Optional[str]:
    """None when these kernels take the call, else why not (the dispatcher then falls back)."""
    if q.dtype not in _FLOAT_DTYPES:
        return f"dtype {q.dtype} not supported (float16, bfloat16, float32)"
    if any(t.dtype != q.dtype for t in (k, v, prefix_k, prefix_v)):
        return "q, k, v, prefix_k, prefix_v must share a dtype"
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    if D == 0:
        return "head dim 0"
    if D > MAX_HEAD_DIM:
        return f"head dim {D} > {MAX_HEAD_DIM}"
    if B * Hkv > MAX_GRID_Y:
        return f"B * Hkv = {B * Hkv} > {MAX_GRID_Y} (grid limit)"
    if q.device.type == "cpu" and not interpreting():
        return "CPU tensors need TRITON_INTERPRET=1"
    return None


def _supports_backward(grad_out, q, k, v, prefix_k, prefix_v, prefix_index=None, prefix_lens=None,
                       key_padding_mask=None, causal=True, softmax_scale=None, out=None, lse=None) -> Optional[str]:
    why = supports(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, key_padding_mask, causal, softmax_scale)
    if why is None and grad_out.dtype != q.dtype:
        return f"grad_out dtype {grad_out.dtype} differs from q's {q.dtype}"
    return why


# Query lengths that take the split-K decode path when the grid is small. The interpreter uses 2
# so that the tiny CPU test shapes (Lq up to 9) also exercise the main path (tests force splits).
_DECODE_MAX_LQ = 2 if INTERPRET else 16


def _num_splits(B: int, Hkv: int, Lq: int, G: int, P: int, Lk: int, device: torch.device) -> tuple[int, int]:
    """(splits, keys per split) over the virtual key axis of length P + Lk for the decode path.

    Split only short query blocks (Lq <= 16) whose (row, kv head, tile) programs cannot fill the
    device: aim for ~2 programs per SM, at least ``min_keys`` keys per split. Depends on shapes
    only (no host reads), so decode stays CUDA-graph capturable.
    """
    n_keys = P + Lk
    if Lq > _DECODE_MAX_LQ or n_keys == 0:
        return 1, max(n_keys, 1)
    if device.type == "cuda":
        slots, min_keys, align = 2 * sm_count(device), 256, 128
    else:  # interpreter: split small shapes too, so the CPU tests exercise this path
        slots, min_keys, align = 16, 4, _FWD_CONFIGS[0].kwargs["BLOCK_N"]
    programs = B * Hkv * triton.cdiv(Lq * G, 16)
    if programs * 2 > slots:
        return 1, n_keys
    splits = min(triton.cdiv(slots, programs), n_keys // min_keys, 128)
    if splits <= 1:
        return 1, n_keys
    split_len = triton.cdiv(triton.cdiv(n_keys, splits), align) * align
    return triton.cdiv(n_keys, split_len), split_len


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs: exact fp32 dots, like the reference


def _common(q, k, prefix_k, prefix_index, prefix_lens, key_padding_mask, softmax_scale):
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    T, P = prefix_k.shape[0], prefix_k.shape[2]
    scale = float(D**-0.5 if softmax_scale is None else softmax_scale)
    dummy = q
    idx = prefix_index if prefix_index is not None else dummy
    lens = prefix_lens if prefix_lens is not None else dummy
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(torch.uint8) if key_padding_mask.dtype == torch.bool else key_padding_mask
        kpm_strides = (kpm.stride(0), kpm.stride(1))
    else:
        kpm, kpm_strides = dummy, (0, 0)
    meta = dict(
        GROUP=Hq // Hkv, HEAD_DIM=D, D_PAD=max(16, triton.next_power_of_2(D)),
        IDX_MODE=index_mode(prefix_index, T), HAS_LENS=prefix_lens is not None,
        HAS_KPM=key_padding_mask is not None, PREC=_prec(q.dtype),
    )
    return B, Hq, Lq, D, Hkv, Lk, T, P, scale, idx, lens, kpm, kpm_strides, meta


@on_tensor_device
def prefix_attention_fwd(q, k, v, prefix_k, prefix_v, prefix_index=None, prefix_lens=None, key_padding_mask=None,
                         causal=True, softmax_scale=None):
    """(out [B, Hq, Lq, D] in q's dtype, lse [B, Hq, Lq] fp32); arguments as the reference."""
    B, Hq, Lq, D, Hkv, Lk, T, P, scale, idx, lens, kpm, kpm_strides, meta = _common(
        q, k, prefix_k, prefix_index, prefix_lens, key_padding_mask, softmax_scale)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(B, Hq, Lq, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out, lse
    G = Hq // Hkv
    M_TOTAL = Lq * G
    splits, split_len = _num_splits(B, Hkv, Lq, G, P, Lk, q.device)
    if splits > 1:
        o_part = torch.empty(B * Hkv * splits * M_TOTAL * D, dtype=torch.float32, device=q.device)
        l_part = torch.empty(B * Hkv * splits * M_TOTAL, dtype=torch.float32, device=q.device)
    else:
        o_part = l_part = lse  # unused
    grid = lambda m: (triton.cdiv(M_TOTAL, m["BLOCK_M"]), B * Hkv, splits)  # noqa: E731
    launch(
        _fwd_tuned, grid,
        (q, k, v, prefix_k, prefix_v, idx, lens, kpm, out, lse, o_part, l_part,
         *q.stride(), *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(), *kpm_strides,
         *out.stride(), *lse.stride(),
         Hkv, Lq, Lk, P, M_TOTAL, split_len, scale * LOG2E.value, _bucket(M_TOTAL)),
        dict(CAUSAL=bool(causal), SPLIT=splits > 1, **meta),
        kernel="prefix_attention.fwd", dtype=q.dtype, bucket=decode_bucket(Lq, M_TOTAL, meta["D_PAD"], splits > 1),
    )
    if splits > 1:
        BLOCK_R = 16
        _combine_kernel[(triton.cdiv(M_TOTAL, BLOCK_R), B * Hkv)](
            o_part, l_part, out, lse, *out.stride(), *lse.stride(), Hkv, M_TOTAL, splits,
            GROUP=G, HEAD_DIM=D, D_PAD=meta["D_PAD"], BLOCK_R=BLOCK_R,
        )
    return out, lse


@on_tensor_device
def prefix_attention_bwd(grad_out, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, key_padding_mask,
                         causal, softmax_scale, out, lse):
    """(dq, dk, dv, dprefix_k, dprefix_v); ``out`` and ``lse`` are the forward's (the backward op's
    schema makes them required tensors)."""
    B, Hq, Lq, D, Hkv, Lk, T, P, scale, idx, lens, kpm, kpm_strides, meta = _common(
        q, k, prefix_k, prefix_index, prefix_lens, key_padding_mask, softmax_scale)
    dev = q.device
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    dpk = torch.empty_like(prefix_k, memory_format=torch.contiguous_format)
    dpv = torch.empty_like(prefix_v, memory_format=torch.contiguous_format)
    if q.numel() == 0:  # no queries: every grad is zero
        for t in (dq, dk, dv, dpk, dpv):
            t.zero_()
        return dq, dk, dv, dpk, dpv
    G = Hq // Hkv
    M_TOTAL = Lq * G
    D_PAD = meta["D_PAD"]

    delta = torch.empty(B, Hq, Lq, dtype=torch.float32, device=dev)
    BLOCK_L = 16
    _delta_kernel[(B * Hq, triton.cdiv(Lq, BLOCK_L))](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), Hq, Lq,
        HEAD_DIM=D, D_PAD=D_PAD, BLOCK=BLOCK_L,
    )

    row_dpk = torch.empty(B, Hkv, P, D, dtype=torch.float32, device=dev)
    row_dpv = torch.empty(B, Hkv, P, D, dtype=torch.float32, device=dev)
    common = (*q.stride(), *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(), *kpm_strides,
              *grad_out.stride(), *lse.stride())
    kv_grid = lambda m: (triton.cdiv(P, m["BLOCK_N"]) + triton.cdiv(Lk, m["BLOCK_N"]), B * Hkv)  # noqa: E731
    if P + Lk > 0:
        launch(
            _bwd_kv_tuned, kv_grid,
            (q, k, v, prefix_k, prefix_v, idx, lens, kpm, grad_out, lse, delta, dk, dv, row_dpk, row_dpv,
             *common, *dk.stride(), *dv.stride(),
             Hkv, Lq, Lk, P, M_TOTAL, scale * LOG2E.value, scale, _bucket(M_TOTAL)),
            dict(CAUSAL=bool(causal), **meta), kernel="prefix_attention.bwd_kv", dtype=q.dtype,
        )
    q_grid = lambda m: (triton.cdiv(M_TOTAL, m["BLOCK_M"]), B * Hkv)  # noqa: E731
    launch(
        _bwd_q_tuned, q_grid,
        (q, k, v, prefix_k, prefix_v, idx, lens, kpm, grad_out, lse, delta, dq,
         *common, *dq.stride(),
         Hkv, Lq, Lk, P, M_TOTAL, scale * LOG2E.value, scale, _bucket(M_TOTAL)),
        dict(CAUSAL=bool(causal), **meta), kernel="prefix_attention.bwd_q", dtype=q.dtype,
    )

    N = Hkv * P * D
    if N > 0:
        BLOCK = 1024 if not INTERPRET else 256
        _prefix_reduce_kernel[(T, triton.cdiv(N, BLOCK))](
            row_dpk, row_dpv, idx, dpk, dpv, B, N, IDX_MODE=meta["IDX_MODE"], BLOCK=BLOCK,
        )
    return dq, dk, dv, dpk, dpv


register("prefix_attention", "triton", prefix_attention_fwd, supports)
register("prefix_attention_backward", "triton", prefix_attention_bwd, _supports_backward)
