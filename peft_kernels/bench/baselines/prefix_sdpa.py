"""Prefix tuning as done today: copy each row's prefix in front of its K/V, then SDPA with a mask.

This is the op-level path of PEFT prefix tuning on Hugging Face models: the prefix sits in the
KV cache (one copy per batch row), and SDPA (with ``enable_gqa``, the strongest form a user
has) gets an explicit boolean mask over [prefix ; sequence] with the
bottom-right aligned causal part. Differentiable (autograd through gather, cat and SDPA).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ...attention import cat_sdpa, prefix_slots_visible, row_index, sequence_mask


def visibility_mask(idx: Tensor, P: int, Lq: int, Lk: int, prefix_lens: Optional[Tensor] = None,
                    key_padding_mask: Optional[Tensor] = None, causal: bool = True) -> Tensor:
    """``[B, 1, Lq, P + Lk]`` bool, True = query may attend the key (the op's contract), built
    once per batch as models do."""
    B = idx.shape[0]
    prefix_ok = prefix_slots_visible(idx.long(), P, prefix_lens)
    seq_ok = sequence_mask(key_padding_mask, B, Lq, Lk, causal, idx.device)
    return torch.cat([prefix_ok[:, None, None, :].expand(B, 1, Lq, P), seq_ok], dim=-1)


def prefix_cat_sdpa(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
                    prefix_index: Optional[Tensor] = None, prefix_lens: Optional[Tensor] = None,
                    key_padding_mask: Optional[Tensor] = None, causal: bool = True,
                    softmax_scale: Optional[float] = None, mask: Optional[Tensor] = None) -> Tensor:
    """Same contract as ``peft_kernels.prefix_attention`` (output only), through
    :func:`peft_kernels.attention.cat_sdpa` (the one cat + SDPA path of the library).

    ``mask`` may be passed in precomputed (:func:`visibility_mask`; models build it once per
    batch, not per layer); a query with no visible key gets NaN from SDPA where the op returns 0.
    """
    B, _, Lq, _ = q.shape
    idx = row_index(prefix_index, prefix_k.shape[0], B, q.device)
    if mask is None:
        mask = visibility_mask(idx, prefix_k.shape[2], Lq, k.shape[2], prefix_lens, key_padding_mask, causal)
    return cat_sdpa(q, k, v, prefix_k, prefix_v, idx, prefix_lens, mask, scaling=softmax_scale)


def materialised_bytes(B: int, Hq: int, Hkv: int, Lq: int, Lk: int, P: int, D: int, es: int) -> int:
    """Intermediates by design: gathered prefixes, concatenated K/V, expanded heads, the mask."""
    gathered = 2 * B * Hkv * P * D * es
    cat = 2 * B * Hkv * (P + Lk) * D * es
    expanded = 2 * B * Hq * (P + Lk) * D * es if Hq != Hkv else 0
    return gathered + cat + expanded + B * Lq * (P + Lk)
