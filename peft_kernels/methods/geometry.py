"""The shape facts of a transformers model that adapters are sized from (one place for all)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Geometry:
    """hidden size, layer count, query heads, key/value heads and head dimension of a model."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def kv_width(self) -> int:
        """Per-layer key (or value) width: kv_heads * head_dim (PEFT's ``token_dim`` of a prefix)."""
        return self.kv_heads * self.head_dim


def model_geometry(config) -> Geometry:
    """:class:`Geometry` of a transformers config (``num_key_value_heads`` / ``head_dim`` when it has them)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Geometry(config.hidden_size, config.num_hidden_layers, heads, kv_heads, head_dim)


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
