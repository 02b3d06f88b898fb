"""Prefix attention with FlexAttention: [prefix ; sequence] K/V and a block mask.

FlexAttention takes one K/V tensor per row, so the prefix is still gathered and concatenated
per row; what it saves over SDPA is the dense mask (a block-sparse ``BlockMask`` skips fully
masked tiles) and the GQA expansion (``enable_gqa=True``). On CUDA it runs compiled
(``torch.compile(flex_attention)``, one compile per shape, outside the timing); on CPU it runs
eagerly: torch's unfused reference path (the scores are materialised) and forward only (torch
raises for backward on CPU). Only where it runs: :func:`prepare` raises with the reason otherwise.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

_COMPILED: dict[str, Callable] = {}


def _flex(device: torch.device) -> tuple[Callable, str]:
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention, "eager (unfused reference path; torch.compile skipped on CPU)"
    if "cuda" not in _COMPILED:
        import torch._dynamo

        for knob in ("recompile_limit", "cache_size_limit"):  # one compile per benchmarked shape
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 512))
        _COMPILED["cuda"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["cuda"], "torch.compile(flex_attention), compiled once per shape before timing"


def prepare(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, idx: Tensor,
            prefix_lens: Optional[Tensor] = None, causal: bool = True) -> tuple[Callable[[], Tensor], str]:
    """``(forward, how)``: a closure computing the op's output with FlexAttention.

    The block mask is built here, once (a model builds it once per batch); the per-row prefix
    gather + concatenation is inside ``forward`` and timed.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    P = prefix_k.shape[2]
    device = q.device
    row_len = torch.full((B,), P, dtype=torch.long, device=device)
    if prefix_lens is not None:
        row_len = prefix_lens.to(device=device, dtype=torch.long)[idx.clamp(min=0)]
    row_len = torch.where(idx >= 0, row_len, torch.zeros_like(row_len))
    shift = Lk - Lq

    def mask_mod(b, h, q_idx, kv_idx):
        in_prefix = kv_idx < P
        prefix_ok = kv_idx < row_len[b]
        seq_ok = (kv_idx - P <= q_idx + shift) if causal else kv_idx >= P
        return (in_prefix & prefix_ok) | (~in_prefix & seq_ok)

    block_mask = create_block_mask(mask_mod, B, None, Lq, P + Lk, device=device)
    flex, how = _flex(device)
    rows = idx.clamp(min=0)

    def forward() -> Tensor:
        k_all = torch.cat([prefix_k[rows], k], dim=2)
        v_all = torch.cat([prefix_v[rows], v], dim=2)
        return flex(q, k_all, v_all, block_mask=block_mask, enable_gqa=Hq != Hkv)

    return forward, how


def materialised_bytes(B: int, Hkv: int, Lk: int, P: int, D: int, es: int) -> int:
    """Intermediates by design: gathered prefixes and concatenated K/V (no expanded heads, no dense mask)."""
    return 2 * B * Hkv * P * D * es + 2 * B * Hkv * (P + Lk) * D * es
