"""Prefix tuning as done today: copy each row's prefix in front of its K/V, then SDPA with a mask.

This is the op-level path of PEFT prefix tuning on Hugging Face models: the prefix sits in the
KV cache (one copy per batch row), the GQA heads are expanded with ``repeat_interleave`` (HF's
``repeat_kv``), and SDPA gets an explicit boolean mask over [prefix ; sequence] with the
bottom-right aligned causal part. Differentiable (autograd through gather, cat and SDPA).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def row_prefix_index(prefix_index: Optional[Tensor], T: int, B: int, device) -> Tensor:
    """Per-row bank index as int64 (``None``: entry 0 for all rows when T == 1, else row b -> b)."""
    if prefix_index is not None:
        return prefix_index.to(device=device, dtype=torch.long)
    if T == 1:
        return torch.zeros(B, dtype=torch.long, device=device)
    return torch.arange(B, dtype=torch.long, device=device)


def visibility_mask(idx: Tensor, P: int, Lq: int, Lk: int, prefix_lens: Optional[Tensor] = None,
                    key_padding_mask: Optional[Tensor] = None, causal: bool = True) -> Tensor:
    """``[B, 1, Lq, P + Lk]`` bool, True = query may attend the key (the op's contract)."""
    device = idx.device
    B = idx.shape[0]
    slot = torch.arange(P, device=device)
    prefix_ok = (idx >= 0)[:, None].expand(B, P)
    if prefix_lens is not None:
        prefix_ok = prefix_ok & (slot[None, :] < prefix_lens.to(device=device, dtype=torch.long)[idx.clamp(min=0)][:, None])
    seq_ok = torch.ones(B, Lq, Lk, dtype=torch.bool, device=device)
    if causal:
        i = torch.arange(Lq, device=device)[:, None]
        j = torch.arange(Lk, device=device)[None, :]
        seq_ok = seq_ok & (j <= i + (Lk - Lq))[None]  # bottom-right aligned
    if key_padding_mask is not None:
        seq_ok = seq_ok & key_padding_mask.to(torch.bool)[:, None, :]
    return torch.cat([prefix_ok[:, None, :].expand(B, Lq, P), seq_ok], dim=2)[:, None]


def prefix_cat_sdpa(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
                    prefix_index: Optional[Tensor] = None, prefix_lens: Optional[Tensor] = None,
                    key_padding_mask: Optional[Tensor] = None, causal: bool = True,
                    softmax_scale: Optional[float] = None, mask: Optional[Tensor] = None) -> Tensor:
    """Same contract as ``peft_kernels.prefix_attention`` (output only).

    ``mask`` may be passed in precomputed (models build it once per batch, not per layer);
    a query with no visible key gets NaN from SDPA where the op returns 0.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    T, _, P, _ = prefix_k.shape
    idx = row_prefix_index(prefix_index, T, B, q.device)
    rows = idx.clamp(min=0)
    k_all = torch.cat([prefix_k[rows], k], dim=2)  # [B, Hkv, P + Lk, D]: the per-row copy
    v_all = torch.cat([prefix_v[rows], v], dim=2)
    if Hq != Hkv:
        k_all = k_all.repeat_interleave(Hq // Hkv, dim=1)
        v_all = v_all.repeat_interleave(Hq // Hkv, dim=1)
    if mask is None:
        mask = visibility_mask(idx, P, Lq, Lk, prefix_lens, key_padding_mask, causal)
    return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, scale=softmax_scale)


def materialised_bytes(B: int, Hq: int, Hkv: int, Lq: int, Lk: int, P: int, D: int, es: int) -> int:
    """Intermediates by design: gathered prefixes, concatenated K/V, expanded heads, the mask."""
    gathered = 2 * B * Hkv * P * D * es
    cat = 2 * B * Hkv * (P + Lk) * D * es
    expanded = 2 * B * Hq * (P + Lk) * D * es if Hq != Hkv else 0
    return gathered + cat + expanded + B * Lq * (P + Lk)
