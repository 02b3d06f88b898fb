"""Pure-torch implementations of every op: the CPU fallback and the test oracle.

Each function implements exactly the contract of DESIGN.md ("Op semantics"), vectorised
(no Python loop over batch rows or adapters), with float32 (or float64) softmax and
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
    "multi_lora",
    "multi_lora_backward",
    "soft_prompt_embed",
    "soft_prompt_embed_backward",
    "soft_prompt_concat",
    "soft_prompt_concat_backward",
    "soft_prompt_mask",
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


def _prefix_attention_probs(q, k, prefix_k, idx, prefix_lens, key_padding_mask, causal, scale):
    """Probabilities and lse over [prefix keys ; sequence keys], grouped by KV head.

    Shapes: q [B, Hkv, G, Lq, D] (acc dtype); k [B, Hkv, Lk, D]. Returns probs
    [B, Hkv, G, Lq, P + Lk], lse [B, Hkv, G, Lq] and the keys [B, Hkv, P + Lk, D].
    """
    B, Hkv, G, Lq, _ = q.shape
    P = prefix_k.shape[2]
    Lk = k.shape[2]
    keys = torch.cat([_gathered_bank(prefix_k, idx, q.dtype), k.to(q.dtype)], dim=2)
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


# --------------------------------------------------------------------------- multi_lora


def _rank_mask(ranks: Optional[Tensor], T: int, R: int, device) -> Optional[Tensor]:
    if ranks is None:
        return None
    slot = torch.arange(R, device=device)
    return slot[None, :] < ranks.to(device=device, dtype=torch.long)[:, None]  # [T, R]


def _lora_shrink(x, lora_a, idx, ranks):
    """fp32 rank-space activations ``h [N, R]`` (zero on -1 rows and rank padding) and one-hot rows."""
    N = x.shape[0]
    T, R, H_in = lora_a.shape
    acc = _acc_dtype(x.dtype)
    a = lora_a.to(acc)
    mask = _rank_mask(ranks, T, R, x.device)
    if mask is not None:
        a = a * mask[:, :, None]
    onehot = torch.zeros(N, T, dtype=acc, device=x.device)
    rows = (idx >= 0).nonzero().squeeze(1)
    onehot[rows, idx[rows]] = 1.0
    xa = (x.to(acc) @ a.reshape(T * R, H_in).T).reshape(N, T, R)  # every adapter, then select
    h = (xa * onehot[:, :, None]).sum(1)
    return h, onehot, a


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
    intermediate and the sum are fp32.
    """
    N = x.shape[0]
    T, R, _ = lora_a.shape
    H_out = lora_b.shape[1]
    acc = _acc_dtype(x.dtype)
    idx = resolve_index(adapter_index, T, N, x.device)
    h, onehot, _ = _lora_shrink(x, lora_a, idx, ranks)
    # Place h[n] in the row's own adapter slot of a [N, T * R] matrix, then one dense matmul.
    hs = onehot[:, :, None] * h[:, None, :] * scaling.to(device=x.device, dtype=acc)[None, :, None]
    b = lora_b.to(acc).permute(0, 2, 1).reshape(T * R, H_out)
    mask = _rank_mask(ranks, T, R, x.device)
    if mask is not None:
        b = b * mask.reshape(T * R, 1)
    y = hs.reshape(N, T * R) @ b
    if base is not None:
        y = y + base.to(acc)
    return y.to(x.dtype)


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
    smaller-rank adapters get zero grad; -1 rows contribute nothing.
    """
    N, H_in = x.shape
    T, R, _ = lora_a.shape
    H_out = lora_b.shape[1]
    acc = _acc_dtype(x.dtype)
    idx = resolve_index(adapter_index, T, N, x.device)
    h, onehot, a = _lora_shrink(x, lora_a, idx, ranks)  # h [N, R]
    scale_row = onehot @ scaling.to(device=x.device, dtype=acc)  # [N], 0 on -1 rows
    b = lora_b.to(acc)
    mask = _rank_mask(ranks, T, R, x.device)
    if mask is not None:
        b = b * mask[:, None, :]
    g = grad_y.to(acc) * scale_row[:, None]  # [N, H_out]
    # dh[n] = g[n] @ B[t]: all adapters then select the row's own (dense, no loop).
    dh_all = (g @ b.permute(1, 0, 2).reshape(H_out, T * R)).reshape(N, T, R)
    dh = (dh_all * onehot[:, :, None]).sum(1)  # [N, R]
    dx = (dh[:, None, :] * onehot[:, :, None]).reshape(N, T * R) @ a.reshape(T * R, H_in)
    # dB[t] = sum_{n in t} g[n]^T h[n];  dA[t] = sum_{n in t} dh[n]^T x[n]
    dlora_b = torch.einsum("nt,no,nr->tor", onehot, g, h)
    dlora_a = torch.einsum("nt,nr,ni->tri", onehot, dh, x.to(acc))
    if mask is not None:
        dlora_b = dlora_b * mask[:, None, :]
        dlora_a = dlora_a * mask[:, :, None]
    return dx.to(x.dtype), dlora_a.to(lora_a.dtype), dlora_b.to(lora_b.dtype)


# --------------------------------------------------------------------------- soft prompts


def _prompt_block(prompts: Tensor, idx: Tensor, prompt_lens: Optional[Tensor]) -> Tensor:
    """``[B, P, H]``: each row's prompt, zeros on -1 rows and slots past prompt_lens."""
    valid = _slot_valid(idx, prompt_lens, prompts.shape[1])
    return prompts[idx.clamp(min=0)] * valid[:, :, None].to(prompts.dtype)


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
    dprompts[t] is the fp32 sum of the prompt slots of the rows using t (zero past prompt_lens).
    """
    B, _, H = grad_out.shape
    T, P = num_prompts, prompt_len
    acc = _acc_dtype(grad_out.dtype)
    idx = resolve_index(prompt_index, T, B, grad_out.device)
    g_prompt = grad_out[:, insert_at : insert_at + P].to(acc)
    g_prompt = g_prompt * _slot_valid(idx, prompt_lens, P)[:, :, None].to(acc)
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
