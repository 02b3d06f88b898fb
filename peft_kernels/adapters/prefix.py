"""Prefix tuning and P-tuning v2 adapters in a MultiAdapterModel: per-layer K/V read by the attention kernel."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor, nn

from .. import attention as attn
from ..methods.geometry import model_geometry
from ..methods.prefix_tuning import PrefixEncoder, select_prefixes
from .base import Batch, PeftConfig, TableKind


@dataclass
class PrefixTuningConfig(PeftConfig):
    """Prefix tuning (Li & Liang 2021): trained per-layer key/value prefixes, via ``prefix_attention``.

    ``num_virtual_tokens`` prefix slots per layer, reparameterised by an MLP (embedding ->
    Linear(encoder_hidden_size) -> tanh -> Linear) for stable training; the MLP can be folded away
    for inference. ``encoder_hidden_size=None`` uses the per-layer K/V width.
    """

    peft_type = "PREFIX_TUNING"
    num_virtual_tokens: int = 20
    encoder_hidden_size: Optional[int] = None
    prefix_projection: bool = True


@dataclass
class PTuningV2Config(PeftConfig):
    """P-tuning v2 (Liu et al. 2022): prefix tuning without the reparameterisation MLP.

    The per-layer key/value prefixes (``num_virtual_tokens`` slots) are trained directly, via
    ``prefix_attention``.
    """

    peft_type = "PREFIX_TUNING"
    num_virtual_tokens: int = 20

    def to_peft_dict(self) -> dict:
        return {**super().to_peft_dict(), "prefix_projection": False}


def _positive(config: dict, key: str, default: int) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{config.get('peft_type')} config has {key}={value!r}: must be an int >= 1")
    return value


class PrefixKind(TableKind):
    """Prefix adapters: one :class:`PrefixEncoder` each; per call, the rows' prefixes are stacked
    into one bank per layer and read by the ``"peft_prefix"`` attention (never the KV cache)."""

    peft_type = "PREFIX_TUNING"
    key = "prefix"
    config_class = PrefixTuningConfig

    def __init__(self, host: nn.Module):
        super().__init__(host)
        self.state = attn.PrefixState()
        object.__setattr__(self, "attachment", None)

    def _geometry_config(self, P: int) -> dict:
        g = model_geometry(self.model.config)
        return dict(num_virtual_tokens=P, num_layers=g.layers, num_attention_heads=g.kv_heads, token_dim=g.kv_width,
                    num_transformer_submodules=1)

    def _add(self, name: str, encoder: PrefixEncoder) -> None:
        if self.attachment is None:
            object.__setattr__(self, "attachment", attn.attach(self.model, self.state))
        self._add_table(name, encoder)

    def create(self, name: str, config: dict) -> dict:
        P = _positive(config, "num_virtual_tokens", PrefixTuningConfig.num_virtual_tokens)
        projection = bool(config.get("prefix_projection", False))
        g = model_geometry(self.model.config)
        encoder = PrefixEncoder(P, g.layers, g.kv_heads, g.head_dim, projection=projection,
                                encoder_hidden_size=config.get("encoder_hidden_size"))
        stored = {**config, "prefix_projection": projection, **self._geometry_config(P)}
        self._add(name, encoder)
        return stored

    def load(self, name: str, config: dict, state: dict[str, Tensor]) -> dict:
        table = state.get("prompt_embeddings")
        if table is None:
            raise ValueError(f"no 'prompt_embeddings' tensor (keys: {sorted(state)})")
        g = model_geometry(self.model.config)
        P = int(config.get("num_virtual_tokens", table.shape[0]))
        width = g.layers * 2 * g.kv_width
        if tuple(table.shape) != (P, width):
            raise ValueError(f"prompt_embeddings is {list(table.shape)} but this base model needs [{P}, {width}] "
                             f"for PREFIX_TUNING: wrong base model?")
        heads = config.get("num_attention_heads", g.kv_heads)
        if heads != g.kv_heads or config.get("num_layers", g.layers) != g.layers:
            raise ValueError(f"the adapter was made for {config.get('num_layers')} layers x {heads} KV heads, "
                             f"this base model has {g.layers} x {g.kv_heads} (head_dim {g.head_dim}): wrong base model?")
        encoder = PrefixEncoder(P, g.layers, g.kv_heads, g.head_dim)
        encoder.embedding.weight.data.copy_(table)
        self._add(name, encoder)
        return config

    def route(self, batch: Batch) -> None:
        rows = batch.rows_of(self)
        if any(n is not None for n in rows):
            batch.enter(self.state.use(select_prefixes(self.tables, rows, batch.device)))
