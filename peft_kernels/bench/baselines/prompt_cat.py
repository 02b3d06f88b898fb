"""Soft prompts as done today: embed the tokens, expand the prompt per row, ``torch.cat``.

Two full writes of the sequence (the embedding output, then the concatenation). Rows pick a
prompt with ``prompt_index`` (``None``: one shared prompt, expanded without a copy); this
baseline has no "no prompt" rows (-1) and no ``prompt_lens``: today's tools have neither.
Differentiable (autograd through the gather/expand and cat).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _row_prompts(prompts: Tensor, prompt_index: Optional[Tensor], B: int) -> Tensor:
    T = prompts.shape[0]
    if prompt_index is not None:
        return prompts[prompt_index.long()]
    if T == 1:
        return prompts.expand(B, -1, -1)
    return prompts  # T == B: row b uses prompt b


def prompt_embed_cat(input_ids: Tensor, weight: Tensor, prompts: Tensor,
                     prompt_index: Optional[Tensor] = None) -> Tensor:
    """``soft_prompt_embed`` with ``insert_at=0``: ``[B, P + L, H]``."""
    return torch.cat([_row_prompts(prompts, prompt_index, input_ids.shape[0]), F.embedding(input_ids, weight)], dim=1)


def prompt_concat_cat(embeds: Tensor, prompts: Tensor, prompt_index: Optional[Tensor] = None,
                      insert_at: int = 0, replace: bool = False) -> Tensor:
    """``soft_prompt_concat``: insert (or, with ``replace``, overwrite) the row's prompt at ``insert_at``."""
    P = prompts.shape[1]
    rows = _row_prompts(prompts, prompt_index, embeds.shape[0])
    tail = embeds[:, insert_at + P:] if replace else embeds[:, insert_at:]
    return torch.cat([embeds[:, :insert_at], rows, tail], dim=1)


def materialised_bytes(B: int, L: int, P: int, H: int, es: int, shared: bool, embed: bool = True) -> int:
    """The embedding output (embed only) and, for a per-row index, the gathered prompts."""
    return (B * L * H * es if embed else 0) + (0 if shared else B * P * H * es)
