"""Pure-torch implementations of every op: the CPU fallback and the test oracle.

Each function implements exactly the op contract (the public ops' docstrings), vectorised
(no Python loop over batch rows or adapters; the packed attention reference is the one exception:
it runs each sequence alone through the padded one), with float32 (or float64) softmax and
accumulation. Inputs are assumed validated (see ``peft_kernels.ops._checks``).

Bank/index convention shared by all ops: a bank holds ``T`` entries; ``index[b]`` picks one
for row ``b``, ``-1`` means none; ``index=None`` means ``T == 1`` (shared) or ``T == B``
(row ``b`` uses entry ``b``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "resolve_index",
    "prefix_attention",
    "prefix_attention_backward",
    "prefix_attention_varlen",
    "prefix_attention_varlen_backward",
    "multi_lora",
    "multi_lora_backward",
    "lora_shrink",
    "lora_shrink_backward",
    "lora_expand",
    "lora_expand_backward",
    "soft_prompt_embed",
    "soft_prompt_embed_backward",
    "soft_prompt_concat",
    "soft_prompt_concat_backward",
    "soft_prompt_mask",
    "soft_prompt_embed_varlen",
    "soft_prompt_embed_varlen_backward",
    "soft_prompt_concat_varlen",
    "soft_prompt_concat_varlen_backward",
]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def resolve_index(index: Optional[Tensor], num_entries: int, rows: int, device) -> Tensor:
    """Per-row bank index as int64 ``[rows]`` (``-1`` = none).

    Semantics: ``None`` means every row uses entry 0 when ``num_entries == 1``, else row ``b``
    uses entry ``b`` (``num_entries == rows``, checked by the op's validation).
    """
    if index is not None:
        return index.to(device=device, dtype=torch.long)
    if num_entries == 1:
        return torch.zeros(rows, dtype=torch.long, device=device)
    return torch.arange(rows, dtype=torch.long, device=device)


def _slot_valid(idx: Tensor, lens: Optional[Tensor], slots: int) -> Tensor:
    """``[rows, slots]`` bool: slot ``p`` of the row's entry is real (entry >= 0, p < lens[entry])."""
    slot = torch.arange(slots, device=idx.device)
    has = idx >= 0
    if lens is None:
        return has[:, None].expand(-1, slots)
    row_len = lens.to(device=idx.device, dtype=torch.long)[idx.clamp(min=0)]
    return has[:, None] & (slot[None, :] < row_len[:, None])


# --------------------------------------------------------------------------- prefix_attention


def _gathered_bank(bank: Tensor, idx: Tensor, dtype: torch.dtype) -> Tensor:
    """``[B, Hkv, P, D]``: each row's prefix (entry 0 stands in for -1 rows, which are masked)."""
    return bank[idx.clamp(min=0)].to(dtype)


def _real_keys_only(keys: Tensor, idx: Tensor, prefix_lens: Optional[Tensor], key_padding_mask: Optional[Tensor],
                    P: int) -> Tensor:
    """``keys`` [B, Hkv, P + Lk, D] with every masked slot (-1 row's prefix, slot past prefix_lens,
    padded key) selected to 0, so NaN/Inf stored there never reaches a product."""
    real = _slot_valid(idx, prefix_lens, P)
    if key_padding_mask is not None:
        real = torch.cat([real, key_padding_mask.to(torch.bool)], dim=1)
    else:
        real = torch.cat([real, real.new_ones(real.shape[0], keys.shape[2] - P)], dim=1)
    return torch.where(real[:, None, :, None], keys, keys.new_zeros(()))


def _prefix_attention_probs(q, k, prefix_k, idx, prefix_lens, key_padding_mask, causal, scale):
    """Probabilities and lse over [prefix keys ; sequence keys], grouped by KV head.

    Shapes: q [B, Hkv, G, Lq, D] (acc dtype); k [B, Hkv, Lk, D]. Returns probs
    [B, Hkv, G, Lq, P + Lk], lse [B, Hkv, G, Lq] and the keys [B, Hkv, P + Lk, D].
    """
    B, Hkv, G, Lq, _ = q.shape
    P = prefix_k.shape[2]
    Lk = k.shape[2]
    keys = torch.cat([_gathered_bank(prefix_k, idx, q.dtype), k.to(q.dtype)], dim=2)
    keys = _real_keys_only(keys, idx, prefix_lens, key_padding_mask, P)
    scores = torch.einsum("bhgqd,bhkd->bhgqk", q, keys) * scale

    prefix_ok = _slot_valid(idx, prefix_lens, P)[:, None, :].expand(B, Lq, P)
    seq_ok = torch.ones(B, Lq, Lk, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        seq_ok = seq_ok & key_padding_mask.to(torch.bool)[:, None, :]
    if causal:
        i = torch.arange(Lq, device=q.device)[:, None]
        j = torch.arange(Lk, device=q.device)[None, :]
        seq_ok = seq_ok & (j <= i + (Lk - Lq))[None]
    visible = torch.cat([prefix_ok, seq_ok], dim=2)[:, None, None]  # [B, 1, 1, Lq, P + Lk]

    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.nan_to_num(neginf=0.0)[..., None]).masked_fill(~visible, 0.0)
    return probs, lse, keys


def _attention_setup(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, key_padding_mask, causal, softmax_scale):
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    acc = _acc_dtype(q.dtype)
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    idx = resolve_index(prefix_index, prefix_k.shape[0], B, q.device)
    qg = q.to(acc).reshape(B, Hkv, Hq // Hkv, Lq, D)
    probs, lse, keys = _prefix_attention_probs(qg, k, prefix_k, idx, prefix_lens, key_padding_mask, causal, scale)
    values = torch.cat([_gathered_bank(prefix_v, idx, acc), v.to(acc)], dim=2)
    values = _real_keys_only(values, idx, prefix_lens, key_padding_mask, prefix_k.shape[2])
    return qg, probs, lse, keys, values, idx, scale


def prefix_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    prefix_index: Optional[Tensor] = None,
    prefix_lens: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
) -> tuple[Tensor, Tensor]:
    """Attention over a per-row prefix bank followed by the row's own keys.

    Shapes: q [B, Hq, Lq, D]; k, v [B, Hkv, Lk, D]; prefix_k, prefix_v [T, Hkv, P, D];
    prefix_index [B] or None; prefix_lens [T] or None; key_padding_mask [B, Lk] bool or None.
    Returns (out [B, Hq, Lq, D] in q's dtype, lse [B, Hq, Lq] float32).

    Semantics: query i of row b sees prefix key p iff p < prefix_lens[t] (t = the row's prefix,
    none if -1) and sequence key j iff key_padding_mask[b, j] and (not causal or
    j <= i + Lk - Lq); softmax in fp32; a query that sees nothing gets 0 and lse -inf.
    """
    B, Hq, Lq, D = q.shape
    _, probs, lse, _, values, _, _ = _attention_setup(
        q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, key_padding_mask, causal, softmax_scale
    )
    out = torch.einsum("bhgqk,bhkd->bhgqd", probs, values)
    return out.reshape(B, Hq, Lq, D).to(q.dtype), lse.reshape(B, Hq, Lq).float()


def prefix_attention_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    prefix_index: Optional[Tensor] = None,
    prefix_lens: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``prefix_attention``'s output w.r.t. q, k, v, prefix_k, prefix_v.

    Shapes: grad_out [B, Hq, Lq, D]; returns tensors shaped like q, k, v, prefix_k, prefix_v.
    Semantics: the softmax backward dS = P * (dO V^T - rowsum(dO * O)), recomputed in the
    accumulation dtype; the prefix grads sum over every row and query head of the group that
    used each prefix (index_add: deterministic on the CPU).
    """
    B, Hq, Lq, D = q.shape
    Hkv, T, P = k.shape[1], prefix_k.shape[0], prefix_k.shape[2]
    qg, probs, _, keys, values, idx, scale = _attention_setup(
        q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, key_padding_mask, causal, softmax_scale
    )
    dout = grad_out.to(qg.dtype).reshape(qg.shape)
    out = torch.einsum("bhgqk,bhkd->bhgqd", probs, values)
    dvalues = torch.einsum("bhgqk,bhgqd->bhkd", probs, dout)
    dprobs = torch.einsum("bhgqd,bhkd->bhgqk", dout, values)
    dscores = probs * (dprobs - (dout * out).sum(-1, keepdim=True))
    dq = torch.einsum("bhgqk,bhkd->bhgqd", dscores, keys) * scale
    dkeys = torch.einsum("bhgqk,bhgqd->bhkd", dscores, qg) * scale

    rows = (idx >= 0).nonzero().squeeze(1)

    def bank_grad(d_all: Tensor, bank: Tensor) -> Tensor:
        grad = torch.zeros(T, Hkv, P, D, dtype=d_all.dtype, device=d_all.device)
        grad.index_add_(0, idx[rows], d_all[rows, :, :P])
        return grad.to(bank.dtype)

    return (
        dq.reshape(B, Hq, Lq, D).to(q.dtype),
        dkeys[:, :, P:].to(k.dtype).contiguous(),
        dvalues[:, :, P:].to(v.dtype).contiguous(),
        bank_grad(dkeys, prefix_k),
        bank_grad(dvalues, prefix_v),
    )


def _varlen_sequences(q: Tensor, k: Tensor, prefix_k: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                      prefix_index: Optional[Tensor]):
    """Yield (s, q0, q1, k0, k1, entry [1] int64) for every sequence with at least one query."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    S = len(cq) - 1
    idx = resolve_index(prefix_index, prefix_k.shape[0], S, q.device)
    for s in range(S):
        if cq[s + 1] > cq[s]:
            yield s, cq[s], cq[s + 1], ck[s], ck[s + 1], idx[s : s + 1]


def _varlen_setup(q: Tensor, prefix_k: Tensor, prefix_v: Tensor, softmax_scale: Optional[float]):
    """(accumulation dtype, prefix_k and prefix_v in it, softmax scale) of a packed attention call."""
    acc = _acc_dtype(q.dtype)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    return acc, prefix_k.to(acc), prefix_v.to(acc), scale


def _as_padded(x: Tensor, acc: torch.dtype) -> Tensor:
    """``[L, H, D]`` -> ``[1, H, L, D]`` in the accumulation dtype."""
    return x.transpose(0, 1).unsqueeze(0).to(acc)


def prefix_attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    prefix_index: Optional[Tensor] = None,
    prefix_lens: Optional[Tensor] = None,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
) -> tuple[Tensor, Tensor]:
    """``prefix_attention`` over packed sequences, one sequence at a time.

    Shapes: q [Nq, Hq, D]; k, v [Nk, Hkv, D]; prefix_k, prefix_v [T, Hkv, P, D]; cu_seqlens_q,
    cu_seqlens_k [S + 1] int32; prefix_index [S] or None; prefix_lens [T] or None.
    Returns (out [Nq, Hq, D] in q's dtype, lse [Hq, Nq] float32).

    Semantics: sequence s (queries cu_seqlens_q[s]..cu_seqlens_q[s+1], keys
    cu_seqlens_k[s]..cu_seqlens_k[s+1]) is ``prefix_attention`` of that sequence alone as a
    batch of one, under its own bank entry; nothing crosses sequences. max_seqlen_q/k are unused.
    """
    Nq, Hq, D = q.shape
    acc, bank_k, bank_v, scale = _varlen_setup(q, prefix_k, prefix_v, softmax_scale)
    out = q.new_zeros(Nq, Hq, D)
    lse = torch.full((Hq, Nq), float("-inf"), dtype=torch.float32, device=q.device)
    for _, q0, q1, k0, k1, entry in _varlen_sequences(q, k, prefix_k, cu_seqlens_q, cu_seqlens_k, prefix_index):
        o, l = prefix_attention(
            _as_padded(q[q0:q1], acc), _as_padded(k[k0:k1], acc), _as_padded(v[k0:k1], acc), bank_k, bank_v,
            entry, prefix_lens, None, causal, scale,
        )
        out[q0:q1] = o[0].transpose(0, 1).to(q.dtype)
        lse[:, q0:q1] = l[0]
    return out, lse


def prefix_attention_varlen_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    prefix_index: Optional[Tensor] = None,
    prefix_lens: Optional[Tensor] = None,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``prefix_attention_varlen``'s output w.r.t. q, k, v, prefix_k, prefix_v.

    Shapes: grad_out [Nq, Hq, D]; returns tensors shaped like q, k, v, prefix_k, prefix_v.
    Semantics: each sequence's ``prefix_attention_backward`` alone; the prefix grads are summed over
    the sequences in ascending order in the accumulation dtype (deterministic); keys of a sequence
    without queries get 0.
    """
    acc, bank_k, bank_v, scale = _varlen_setup(q, prefix_k, prefix_v, softmax_scale)
    dq, dk, dv = q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    dpk, dpv = bank_k.new_zeros(bank_k.shape), bank_v.new_zeros(bank_v.shape)
    for _, q0, q1, k0, k1, entry in _varlen_sequences(q, k, prefix_k, cu_seqlens_q, cu_seqlens_k, prefix_index):
        g = prefix_attention_backward(
            _as_padded(grad_out[q0:q1], acc), _as_padded(q[q0:q1], acc), _as_padded(k[k0:k1], acc),
            _as_padded(v[k0:k1], acc), bank_k, bank_v, entry, prefix_lens, None, causal, scale,
        )
        dq[q0:q1] = g[0][0].transpose(0, 1).to(q.dtype)
        dk[k0:k1] = g[1][0].transpose(0, 1).to(k.dtype)
        dv[k0:k1] = g[2][0].transpose(0, 1).to(v.dtype)
        dpk += g[3]
        dpv += g[4]
    return dq, dk, dv, dpk.to(prefix_k.dtype), dpv.to(prefix_v.dtype)


# --------------------------------------------------------------------------- multi_lora
# Every row is computed from its own adapter's real rank slots only, selected by gathers and
# torch.where (never by multiplying with a 0/1 mask: 0 * NaN = NaN), so NaN/Inf in the rank padding,
# in an adapter no row uses, in another row's adapter or in a -1 row reach no other output or
# gradient. Memory: the gathered per-row weights, N * R * H elements per projection.


def _take(table: Tensor, rows: Tensor) -> Tensor:
    """``table[rows]``; zeros when the table is empty (T == 0: every row is -1)."""
    if table.shape[0] == 0:
        return table.new_zeros(rows.shape[0], *table.shape[1:])
    return table[rows]


def _row_slots(adapter_index: Optional[Tensor], ranks: Optional[Tensor], T: int, R: int, N: int, device):
    """(rows [N] int64, clamped to 0 for -1; real [N, R] bool: slot j is a real rank slot of the row's adapter)."""
    idx = resolve_index(adapter_index, T, N, device)
    rows = idx.clamp(min=0)
    real = (idx >= 0)[:, None].expand(N, R)
    if ranks is not None:
        real = real & (torch.arange(R, device=device)[None, :] < _take(ranks.to(device=device, dtype=torch.long), rows)[:, None])
    return rows, real


def _bank_slots(ranks: Optional[Tensor], T: int, R: int, device) -> Tensor:
    """[T, R] bool: the real rank slots of each adapter."""
    if ranks is None:
        return torch.ones(T, R, dtype=torch.bool, device=device)
    return torch.arange(R, device=device)[None, :] < ranks.to(device=device, dtype=torch.long)[:, None]


def _row_scale(scaling: Optional[Tensor], rows: Tensor, acc: torch.dtype) -> Optional[Tensor]:
    return None if scaling is None else _take(scaling.to(device=rows.device, dtype=acc), rows)[:, None]


def lora_shrink(
    x: Tensor,
    lora_a: Tensor,
    adapter_index: Optional[Tensor],
    ranks: Optional[Tensor] = None,
    scaling: Optional[Tensor] = None,
) -> Tensor:
    """Rank-space projection of every row through its own adapter's A.

    Shapes: x [N, H_in]; lora_a [T, R, H_in]; adapter_index [N] or None; ranks [T] or None;
    scaling [T] or None. Returns h [N, R] in fp32 (fp64 for fp64 x).

    Semantics: h[n, j] = scaling[t] * x[n] . lora_a[t, j] for j < ranks[t], t = adapter_index[n];
    exactly 0 for j >= ranks[t] and on -1 rows; scaling None means 1.
    """
    N, T, R = x.shape[0], lora_a.shape[0], lora_a.shape[1]
    acc = _acc_dtype(x.dtype)
    rows, real = _row_slots(adapter_index, ranks, T, R, N, x.device)
    h = torch.bmm(_take(lora_a.to(acc), rows), x.to(acc)[:, :, None]).squeeze(2)  # [N, R]
    scale = _row_scale(scaling, rows, acc)
    if scale is not None:
        h = h * scale
    return torch.where(real, h, 0.0)


def lora_shrink_backward(
    grad_h: Tensor,
    x: Tensor,
    lora_a: Tensor,
    adapter_index: Optional[Tensor],
    ranks: Optional[Tensor] = None,
    scaling: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`lora_shrink` w.r.t. x and lora_a.

    Shapes: grad_h [N, R]; returns dx [N, H_in] (x's dtype), dlora_a [T, R, H_in] (lora_a's dtype).
    Semantics: only real rank slots of grad_h are read; -1 rows get dx = 0 and add nothing;
    dlora_a[t] sums over adapter t's rows only and is 0 in the rank padding and for unused adapters.
    """
    N, T, R = x.shape[0], lora_a.shape[0], lora_a.shape[1]
    acc = _acc_dtype(x.dtype)
    rows, real = _row_slots(adapter_index, ranks, T, R, N, x.device)
    gh = grad_h.to(acc)
    scale = _row_scale(scaling, rows, acc)
    if scale is not None:
        gh = gh * scale
    gh = torch.where(real, gh, 0.0)
    a_rows = torch.where(real[:, :, None], _take(lora_a.to(acc), rows), 0.0)
    dx = torch.bmm(gh[:, None, :], a_rows).squeeze(1)
    xs = torch.where(real.any(1, keepdim=True), x.to(acc), 0.0)
    da = torch.zeros(T, R, x.shape[1], dtype=acc, device=x.device)
    if T:
        da.index_add_(0, rows, gh[:, :, None] * xs[:, None, :])
    da = torch.where(_bank_slots(ranks, T, R, x.device)[:, :, None], da, 0.0)
    return dx.to(x.dtype), da.to(lora_a.dtype)


def lora_expand(
    h: Tensor,
    lora_b: Tensor,
    adapter_index: Optional[Tensor],
    scaling: Tensor,
    ranks: Optional[Tensor] = None,
    base: Optional[Tensor] = None,
) -> Tensor:
    """Every row's rank-space vector through its own adapter's B, plus base.

    Shapes: h [N, R] (fp32, fp64 or lora_b's dtype); lora_b [T, H_out, R]; adapter_index [N] or None;
    scaling [T]; ranks [T] or None; base [N, H_out] or None. Returns y [N, H_out] in lora_b's dtype.

    Semantics: y[n] = base[n] + scaling[t] * sum_{j < ranks[t]} h[n, j] * lora_b[t, :, j] with
    t = adapter_index[n], summed in fp32; -1 rows get base[n] (0 without base); h[n, j >= ranks[t]]
    is never read.
    """
    N, T, R = h.shape[0], lora_b.shape[0], lora_b.shape[2]
    acc = _acc_dtype(lora_b.dtype)
    rows, real = _row_slots(adapter_index, ranks, T, R, N, h.device)
    hs = torch.where(real, h.to(acc) * _row_scale(scaling, rows, acc), 0.0)
    b_rows = torch.where(real[:, None, :], _take(lora_b.to(acc), rows), 0.0)  # [N, H_out, R]
    y = torch.bmm(b_rows, hs[:, :, None]).squeeze(2)
    if base is not None:
        y = y + base.to(acc)
    return y.to(lora_b.dtype)


def lora_expand_backward(
    grad_y: Tensor,
    h: Tensor,
    lora_b: Tensor,
    adapter_index: Optional[Tensor],
    scaling: Tensor,
    ranks: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`lora_expand` w.r.t. h and lora_b (dbase is grad_y itself).

    Shapes: grad_y [N, H_out]; returns dh [N, R] (h's dtype), dlora_b [T, H_out, R] (lora_b's dtype).
    Semantics: dh is 0 in the rank padding and on -1 rows; dlora_b[t] sums over adapter t's rows
    only and is 0 in the rank padding and for unused adapters.
    """
    N, T, R = h.shape[0], lora_b.shape[0], lora_b.shape[2]
    acc = _acc_dtype(lora_b.dtype)
    rows, real = _row_slots(adapter_index, ranks, T, R, N, h.device)
    scale = _row_scale(scaling, rows, acc)
    g = torch.where(real.any(1, keepdim=True), grad_y.to(acc) * scale, 0.0)  # [N, H_out]
    b_rows = torch.where(real[:, None, :], _take(lora_b.to(acc), rows), 0.0)
    dh = torch.where(real, torch.bmm(g[:, None, :], b_rows).squeeze(1), 0.0)
    hm = torch.where(real, h.to(acc), 0.0)
    db = torch.zeros(T, lora_b.shape[1], R, dtype=acc, device=h.device)
    if T:
        db.index_add_(0, rows, g[:, :, None] * hm[:, None, :])
    db = torch.where(_bank_slots(ranks, T, R, h.device)[:, None, :], db, 0.0)
    return dh.to(h.dtype), db.to(lora_b.dtype)


def multi_lora(
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    adapter_index: Optional[Tensor],
    scaling: Tensor,
    ranks: Optional[Tensor] = None,
    base: Optional[Tensor] = None,
) -> Tensor:
    """Rows of one batch, each through its own LoRA adapter.

    Shapes: x [N, H_in]; lora_a [T, R, H_in]; lora_b [T, H_out, R]; adapter_index [N] or None;
    scaling [T]; ranks [T] or None; base [N, H_out] or None. Returns y [N, H_out] in x's dtype.

    Semantics: y[n] = base[n] + scaling[t] * (x[n] @ lora_a[t, :r].T @ lora_b[t, :, :r].T) with
    t = adapter_index[n], r = ranks[t]; -1 rows get base[n] (0 without base); the rank-space
    intermediate and the sum are fp32: :func:`lora_expand` of :func:`lora_shrink`.
    """
    h = lora_shrink(x, lora_a, adapter_index, ranks)
    return lora_expand(h, lora_b, adapter_index, scaling, ranks, base)


def multi_lora_backward(
    grad_y: Tensor,
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    adapter_index: Optional[Tensor],
    scaling: Tensor,
    ranks: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``multi_lora`` w.r.t. x, lora_a, lora_b (dbase is grad_y itself).

    Shapes: grad_y [N, H_out]; returns dx [N, H_in], dlora_a [T, R, H_in], dlora_b [T, H_out, R].
    Semantics: each adapter's grads sum over its own rows only; padding rows/columns of
    smaller-rank adapters and unused adapters get zero grad; -1 rows contribute nothing.
    """
    h = lora_shrink(x, lora_a, adapter_index, ranks)
    dh, dlora_b = lora_expand_backward(grad_y, h, lora_b, adapter_index, scaling, ranks)
    dx, dlora_a = lora_shrink_backward(dh, x, lora_a, adapter_index, ranks)
    return dx, dlora_a, dlora_b


# --------------------------------------------------------------------------- soft prompts


def _prompt_block(prompts: Tensor, idx: Tensor, prompt_lens: Optional[Tensor]) -> Tensor:
    """``[B, P, H]``: each row's prompt, zeros on -1 rows and slots past prompt_lens.

    Semantics: a masked slot is selected away (``where``), never multiplied by 0, so NaN/Inf
    stored there cannot leak into the result.
    """
    valid = _slot_valid(idx, prompt_lens, prompts.shape[1])
    return torch.where(valid[:, :, None], prompts[idx.clamp(min=0)], prompts.new_zeros(()))


def soft_prompt_concat(
    embeds: Tensor,
    prompts: Tensor,
    prompt_index: Optional[Tensor] = None,
    prompt_lens: Optional[Tensor] = None,
    insert_at: int = 0,
    replace: bool = False,
) -> Tensor:
    """Insert (or overwrite with) each row's soft prompt at ``insert_at``.

    Shapes: embeds [B, L, H]; prompts [T, P, H]; prompt_index [B] or None; prompt_lens [T] or
    None. Returns [B, L + P, H] (insert) or [B, L, H] (replace), in embeds' dtype.

    Semantics: out[:, :insert_at] = embeds[:, :insert_at]; out[:, insert_at:insert_at + P] =
    the row's prompt (zeros for -1 rows and slots past prompt_lens); the rest is
    embeds[:, insert_at:] (insert) or embeds[:, insert_at + P:] (replace).
    """
    B = embeds.shape[0]
    T, P, _ = prompts.shape
    idx = resolve_index(prompt_index, T, B, embeds.device)
    block = _prompt_block(prompts.to(embeds.dtype), idx, prompt_lens)
    tail = embeds[:, insert_at + P :] if replace else embeds[:, insert_at:]
    return torch.cat([embeds[:, :insert_at], block, tail], dim=1)


def soft_prompt_concat_backward(
    grad_out: Tensor,
    num_prompts: int,
    prompt_len: int,
    prompt_index: Optional[Tensor] = None,
    prompt_lens: Optional[Tensor] = None,
    insert_at: int = 0,
    replace: bool = False,
) -> tuple[Tensor, Tensor]:
    """Gradients of ``soft_prompt_concat`` w.r.t. embeds and prompts.

    Shapes: grad_out [B, L + P, H] (or [B, L, H] with replace), P = prompt_len; returns
    dembeds [B, L, H] and dprompts [num_prompts, P, H] in grad_out's dtype.
    Semantics: dembeds is grad_out without the prompt slots (zeros there with replace);
    dprompts[t] is the fp32 sum of the prompt slots of the rows using t (zero past prompt_lens);
    grads of masked slots (-1 rows, past prompt_lens) are selected away, so NaN/Inf there is ignored.
    """
    B, _, H = grad_out.shape
    T, P = num_prompts, prompt_len
    acc = _acc_dtype(grad_out.dtype)
    idx = resolve_index(prompt_index, T, B, grad_out.device)
    g_prompt = grad_out[:, insert_at : insert_at + P].to(acc)
    g_prompt = torch.where(_slot_valid(idx, prompt_lens, P)[:, :, None], g_prompt, g_prompt.new_zeros(()))
    dprompts = torch.zeros(T, P, H, dtype=acc, device=grad_out.device)
    rows = (idx >= 0).nonzero().squeeze(1)
    dprompts.index_add_(0, idx[rows], g_prompt[rows])
    if replace:
        dembeds = grad_out.clone()
        dembeds[:, insert_at : insert_at + P] = 0
    else:
        dembeds = torch.cat([grad_out[:, :insert_at], grad_out[:, insert_at + P :]], dim=1)
    return dembeds, dprompts.to(grad_out.dtype)


def soft_prompt_embed(
    input_ids: Tensor,
    weight: Tensor,
    prompts: Tensor,
    prompt_index: Optional[Tensor] = None,
    prompt_lens: Optional[Tensor] = None,
    insert_at: int = 0,
) -> Tensor:
    """Token embedding lookup with each row's soft prompt inserted at ``insert_at``.

    Shapes: input_ids [B, L]; weight [V, H]; prompts [T, P, H]; prompt_index [B] or None;
    prompt_lens [T] or None. Returns [B, L + P, H] in weight's dtype.

    Semantics: equals ``soft_prompt_concat(weight[input_ids], prompts, ...)``.
    """
    return soft_prompt_concat(weight[input_ids.long()], prompts, prompt_index, prompt_lens, insert_at)


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
    """Gradients of ``soft_prompt_embed`` w.r.t. weight and prompts.

    Shapes: grad_out [B, L + P, H]; input_ids [B, L]; returns dweight [vocab_size, H] (or an
    empty [0, H] tensor when ``need_dweight`` is False) and dprompts [num_prompts, P, H].
    Semantics: dweight index-adds each token's grad into its row of the table (fp32 sums).
    """
    B, L = input_ids.shape
    H = grad_out.shape[2]
    P = grad_out.shape[1] - L
    dtokens, dprompts = soft_prompt_concat_backward(
        grad_out, num_prompts, P, prompt_index, prompt_lens, insert_at, False
    )
    if not need_dweight:
        return grad_out.new_zeros(0, H), dprompts
    acc = _acc_dtype(grad_out.dtype)
    dweight = torch.zeros(vocab_size, H, dtype=acc, device=grad_out.device)
    dweight.index_add_(0, input_ids.reshape(-1).long(), dtokens.reshape(B * L, H).to(acc))
    return dweight.to(grad_out.dtype), dprompts


def soft_prompt_mask(
    attention_mask: Tensor,
    prompt_len: int,
    num_prompts: int = 1,
    prompt_index: Optional[Tensor] = None,
    prompt_lens: Optional[Tensor] = None,
    insert_at: int = 0,
    replace: bool = False,
) -> Tensor:
    """Attention mask of the sequence a soft-prompt op produced.

    Shapes: attention_mask [B, L] (bool or integer, nonzero = real token); prompt_index [B] or
    None; prompt_lens [T] or None. Returns [B, L + P] (or [B, L] with replace) in
    attention_mask's dtype.

    Semantics: the prompt slots insert_at..insert_at+P are 1 where the row has a prompt
    (index != -1) and the slot is below prompt_lens, else 0; the token positions keep
    attention_mask (minus the overwritten ones with replace).
    """
    B = attention_mask.shape[0]
    idx = resolve_index(prompt_index, num_prompts, B, attention_mask.device)
    slots = _slot_valid(idx, prompt_lens, prompt_len).to(attention_mask.dtype)
    tail = attention_mask[:, insert_at + prompt_len :] if replace else attention_mask[:, insert_at:]
    return torch.cat([attention_mask[:, :insert_at], slots, tail], dim=1)


# --------------------------------------------------------------------------- packed (varlen) soft prompts
# Each output row is a gather from one table: the tokens [N, H] followed by the bank viewed as
# [T * P, H]. The backward of the gather is an index_add into that table (rows in ascending order).


def _varlen_sources(cu_seqlens: Tensor, cu_seqlens_out: Tensor, total_out: int, num_tokens: int, num_prompts: int,
                    prompt_len: int, prompt_index: Optional[Tensor], prompt_lens: Optional[Tensor]) -> Tensor:
    """``[total_out]`` int64: output row r's row in ``cat([tokens [N], prompts.view(T * P)])``.

    Semantics: output row r lies in sequence s with cu_seqlens_out[s] <= r < cu_seqlens_out[s + 1];
    its first prompt_lens[t] rows (t = s's entry; none for -1) are prompt slots 0.., the rest are
    tokens cu_seqlens[s].. in order.
    """
    device = cu_seqlens.device
    cu, co = cu_seqlens.long(), cu_seqlens_out.to(device=device, dtype=torch.long)
    S, T, P = cu.numel() - 1, num_prompts, prompt_len
    idx = resolve_index(prompt_index, T, S, device)
    lens = torch.full((T,), P, dtype=torch.long, device=device) if prompt_lens is None else prompt_lens.long()
    plen = torch.where(idx >= 0, lens[idx.clamp(min=0)] if T else idx.new_zeros(()), 0)
    rows = torch.arange(total_out, dtype=torch.long, device=device)
    seq = torch.searchsorted(co[1:], rows, right=True)
    off = rows - co[seq]
    token = cu[seq] + off - plen[seq]
    slot = num_tokens + idx[seq].clamp(min=0) * P + off
    return torch.where(off < plen[seq], slot, token)


def soft_prompt_concat_varlen(
    embeds: Tensor,
    prompts: Tensor,
    cu_seqlens: Tensor,
    cu_seqlens_out: Tensor,
    total_out: int,
    prompt_index: Optional[Tensor] = None,
    prompt_lens: Optional[Tensor] = None,
) -> Tensor:
    """Packed sequences with each sequence's soft prompt put in front of it (ragged, no padding).

    Shapes: embeds [N, H]; prompts [T, P, H]; cu_seqlens, cu_seqlens_out [S + 1] int32;
    prompt_index [S] or None; prompt_lens [T] or None. Returns [total_out, H] in embeds' dtype.

    Semantics: output sequence s (rows cu_seqlens_out[s]..cu_seqlens_out[s + 1]) is
    ``cat([prompts[t, :prompt_lens[t]], embeds[cu_seqlens[s]:cu_seqlens[s + 1]]])`` with t = s's
    entry; a sequence with -1 gets its tokens only.
    """
    N, H = embeds.shape
    T, P, _ = prompts.shape
    rows = _varlen_sources(cu_seqlens, cu_seqlens_out, total_out, N, T, P, prompt_index, prompt_lens)
    return torch.cat([embeds, prompts.reshape(T * P, H).to(embeds.dtype)])[rows]


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
    """Gradients of ``soft_prompt_concat_varlen`` w.r.t. embeds and prompts.

    Shapes: grad_out [total_out, H]; returns dembeds [num_tokens, H] and dprompts
    [num_prompts, prompt_len, H] in grad_out's dtype.
    Semantics: dembeds is grad_out at each token's output row; dprompts[t, p] is the sum (fp32, or
    fp64 for fp64, over the sequences using t in ascending order) of their slot-p grads; slots past
    prompt_lens and unused entries get 0.
    """
    total_out, H = grad_out.shape
    N, T, P = num_tokens, num_prompts, prompt_len
    acc = _acc_dtype(grad_out.dtype)
    rows = _varlen_sources(cu_seqlens, cu_seqlens_out, total_out, N, T, P, prompt_index, prompt_lens)
    table = torch.zeros(N + T * P, H, dtype=acc, device=grad_out.device).index_add_(0, rows, grad_out.to(acc))
    # copy=True: the two results must not be views of one table (custom ops may not alias their outputs)
    return table[:N].to(grad_out.dtype, copy=True), table[N:].reshape(T, P, H).to(grad_out.dtype, copy=True)


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
    """Token embedding of packed sequences with each sequence's soft prompt put in front of it.

    Shapes: input_ids [N]; weight [V, H]; the rest as ``soft_prompt_concat_varlen``.
    Returns [total_out, H] in weight's dtype.

    Semantics: equals ``soft_prompt_concat_varlen(weight[input_ids], prompts, ...)``.
    """
    return soft_prompt_concat_varlen(weight[input_ids.long()], prompts, cu_seqlens, cu_seqlens_out, total_out,
                                     prompt_index, prompt_lens)


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
    """Gradients of ``soft_prompt_embed_varlen`` w.r.t. weight and prompts.

    Shapes: grad_out [total_out, H]; input_ids [N]; returns dweight [vocab_size, H] (an empty
    [0, H] tensor when ``need_dweight`` is False) and dprompts [num_prompts, prompt_len, H].
    Semantics: dweight index-adds each token's grad into its row of the table (fp32 sums, in token
    order); dprompts as ``soft_prompt_concat_varlen_backward``.
    """
    H = grad_out.shape[1]
    dtokens, dprompts = soft_prompt_concat_varlen_backward(
        grad_out, cu_seqlens, cu_seqlens_out, input_ids.shape[0], num_prompts, prompt_len, prompt_index, prompt_lens
    )
    if not need_dweight:
        return grad_out.new_zeros(0, H), dprompts
    acc = _acc_dtype(grad_out.dtype)
    dweight = torch.zeros(vocab_size, H, dtype=acc, device=grad_out.device)
    dweight.index_add_(0, input_ids.long(), dtokens.to(acc))
    return dweight.to(grad_out.dtype), dprompts


# --------------------------------------------------------------------------- label_word_logits (KPT verbalizer)
# The vocabulary normaliser streams over tiles of the vocabulary, so no [N, V] tensor exists at
# once; the label-word part is a gather of W rows of the head and a per-class logsumexp.

_LABEL_WORD_VOCAB_TILE = 4096


def _word_classes(class_offsets: Tensor, num_words: int) -> Tensor:
    """``[W]`` int64: the class of each label word (word w belongs to class c iff offsets[c] <= w < offsets[c+1])."""
    counts = (class_offsets[1:] - class_offsets[:-1]).long()
    classes = torch.arange(counts.shape[0], device=class_offsets.device)
    return torch.repeat_interleave(classes, counts, output_size=num_words)


def _word_log_mix(word_classes: Tensor, class_offsets: Tensor, word_weights: Optional[Tensor],
                  calibration: Optional[Tensor], acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """(log alpha_w - log calibration_w, alpha_w), both ``[W]`` in ``acc``.

    Semantics: alpha is 1/|class| without word_weights, else softmax(word_weights) within each class.
    """
    C = class_offsets.shape[0] - 1
    if word_weights is None:
        counts = (class_offsets[1:] - class_offsets[:-1]).to(acc)
        log_alpha = -torch.log(counts)[word_classes]
    else:
        ww = word_weights.to(acc)
        log_alpha = ww - _segment_logsumexp(ww[None], word_classes, C)[0][word_classes]
    mix = log_alpha if calibration is None else log_alpha - torch.log(calibration.to(acc))
    return mix, log_alpha.exp()


def _segment_logsumexp(x: Tensor, word_classes: Tensor, num_classes: int) -> Tensor:
    """``[N, C]``: logsumexp of x ``[N, W]`` over each class's words (max-shifted, fp of x)."""
    N = x.shape[0]
    index = word_classes[None].expand(N, -1)
    m = x.new_full((N, num_classes), float("-inf")).scatter_reduce(1, index, x, "amax", include_self=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = x.new_zeros(N, num_classes).index_add_(1, word_classes, torch.exp(x - m[:, word_classes]))
    return torch.log(s) + m


def _vocab_tiles(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], acc: torch.dtype):
    """Yield (v0, v1, w, z): the tile w = weight[v0:v1] and z = hidden @ w.T + bias[v0:v1], both in ``acc``."""
    V = weight.shape[0]
    for v0 in range(0, V, _LABEL_WORD_VOCAB_TILE):
        v1 = min(V, v0 + _LABEL_WORD_VOCAB_TILE)
        w = weight[v0:v1].to(acc)
        z = hidden @ w.T
        if bias is not None:
            z = z + bias[v0:v1].to(acc)
        yield v0, v1, w, z


def _label_word_terms(hidden, weight, bias, word_ids, class_offsets, word_weights, calibration, lse):
    """(h, gathered rows, word classes, l [N, W], y [N, C], alpha [W], lse [N]) in acc, for forward and backward."""
    acc = _acc_dtype(hidden.dtype)
    h = hidden.to(acc)
    ids = word_ids.long()
    rows = weight[ids].to(acc)
    zw = h @ rows.T
    if bias is not None:
        zw = zw + bias[ids].to(acc)
    classes = _word_classes(class_offsets, ids.shape[0])
    mix, alpha = _word_log_mix(classes, class_offsets, word_weights, calibration, acc)
    if lse is None:
        lse = h.new_full((h.shape[0],), float("-inf"))
        for _, _, _, z in _vocab_tiles(h, weight, bias, acc):
            lse = torch.logaddexp(lse, torch.logsumexp(z, dim=1))
    logits = zw - lse[:, None] + mix
    y = _segment_logsumexp(logits, classes, class_offsets.shape[0] - 1)
    return h, rows, classes, logits, y, alpha, lse


def label_word_logits(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    word_ids: Tensor,
    class_offsets: Tensor,
    word_weights: Optional[Tensor],
    calibration: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    """KPT verbalizer: class log-scores from the label words' (calibrated) vocabulary probabilities.

    Shapes: hidden [N, H]; weight [V, H]; bias [V] or None; word_ids [W] int; class_offsets [C+1]
    int (class c owns words class_offsets[c]:class_offsets[c+1], none empty); word_weights [W] or
    None; calibration [W] (positive priors) or None. Returns (y [N, C] in hidden's dtype,
    lse [N] fp32 (fp64 for fp64)).

    Semantics: z[n, v] = hidden[n] . weight[v] + bias[v]; lse[n] = logsumexp_v z[n, v];
    log p[n, w] = z[n, word_ids[w]] - lse[n]; y[n, c] = log sum_{w in c} alpha_w p[n, w] / calibration[w]
    with alpha_w = 1/|c| (word_weights None: the mean) or softmax of word_weights within c.
    """
    _, _, _, _, y, _, lse = _label_word_terms(hidden, weight, bias, word_ids, class_offsets, word_weights,
                                              calibration, None)
    return y.to(hidden.dtype), lse


def label_word_logits_backward(
    grad_y: Tensor,
    grad_lse: Optional[Tensor],
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    word_ids: Tensor,
    class_offsets: Tensor,
    word_weights: Optional[Tensor],
    calibration: Optional[Tensor],
    lse: Tensor,
    need_dweight: bool,
    need_dbias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`label_word_logits` (y and lse) by hidden, weight, bias and word_weights.

    Shapes: grad_y [N, C]; grad_lse [N] or None; lse [N] (the forward's). Returns dhidden [N, H],
    dweight [V, H] ([0, H] unless need_dweight), dbias [V] ([0] unless need_dbias and bias is given),
    dword_weights [W] ([0] without word_weights), each in its input's dtype.

    Semantics: with r[n, w] the share of word w in its class's sum and G[n] = sum_c grad_y[n, c] -
    grad_lse[n]: dz[n, v] = sum_{w: word_ids[w] = v} grad_y[n, c(w)] r[n, w] - G[n] softmax(z[n])[v];
    dhidden = dz @ weight, dweight = dz^T @ hidden, dbias = dz summed over rows (all streamed over
    vocabulary tiles); dword_weights[w] = sum_n grad_y[n, c(w)] (r[n, w] - alpha_w). calibration is a constant.
    """
    h, rows, classes, logits, y, alpha, _ = _label_word_terms(
        hidden, weight, bias, word_ids, class_offsets, word_weights, calibration, lse)
    acc = h.dtype
    gy = grad_y.to(acc)
    dl = gy[:, classes] * torch.exp(logits - y[:, classes])
    G = gy.sum(1)
    if grad_lse is not None:
        G = G - grad_lse.to(acc)
    V, H = weight.shape
    dh = dl @ rows
    dweight = h.new_zeros(V, H) if need_dweight else weight.new_zeros(0, H)
    need_dbias = need_dbias and bias is not None
    dbias = h.new_zeros(V) if need_dbias else hidden.new_zeros(0)
    for v0, v1, w, z in _vocab_tiles(h, weight, bias, acc):
        gp = G[:, None] * torch.exp(z - lse.to(acc)[:, None])
        dh = dh - gp @ w
        if need_dweight:
            dweight[v0:v1] = -(gp.T @ h)
        if need_dbias:
            dbias[v0:v1] = -gp.sum(0)
    ids = word_ids.long()
    if need_dweight:
        dweight.index_add_(0, ids, dl.T @ h)
        dweight = dweight.to(weight.dtype)
    if need_dbias:
        dbias.index_add_(0, ids, dl.sum(0))
        dbias = dbias.to(bias.dtype)
    if word_weights is None:
        dww = hidden.new_zeros(0)
    else:
        dww = (dl.sum(0) - alpha * gy.sum(0)[classes]).to(word_weights.dtype)
    return dh.to(hidden.dtype), dweight, dbias, dww
