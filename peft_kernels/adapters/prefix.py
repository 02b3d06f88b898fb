"""Prefix tuning and P-tuning v2 adapters in a MultiAdapterModel: per-layer K/V read by the attention kernel."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from .. import attention as attn
from ..methods.geometry import model_geometry
from ..methods.prefix_tuning import PrefixEncoder, local_kv_heads, select_prefixes
from ..methods.seq2seq_prefix import LAYOUT_KEY, PAPER_LAYOUT, Seq2SeqPrefix, seq2seq_geometry
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
    into one bank per layer and read by the ``"peft_prefix"`` attention (never the KV cache).
    On an encoder-decoder model each is a :class:`Seq2SeqPrefix` (banks per stack and layer)."""

    peft_type = "PREFIX_TUNING"
    key = "prefix"
    config_class = PrefixTuningConfig

    @property
    def state(self) -> attn.PrefixState:
        return self.host.prefix_state

    def _geometry_config(self, P: int) -> dict:
        g = model_geometry(self.model.config)
        return dict(num_virtual_tokens=P, num_layers=g.layers, num_attention_heads=g.kv_heads, token_dim=g.kv_width,
                    num_transformer_submodules=1)

    def _add(self, name: str, encoder: PrefixEncoder) -> None:
        self.host.attention()
        self._add_table(name, encoder)

    def create(self, name: str, config: dict) -> dict:
        P = _positive(config, "num_virtual_tokens", PrefixTuningConfig.num_virtual_tokens)
        projection = bool(config.get("prefix_projection", False))
        if self.host.encoder_decoder:
            return self._create_seq2seq(name, config, P, projection)
        g = model_geometry(self.model.config)
        encoder = PrefixEncoder(P, g.layers, g.kv_heads, g.head_dim, projection=projection,
                                encoder_hidden_size=config.get("encoder_hidden_size"))
        stored = {**config, "prefix_projection": projection, **self._geometry_config(P)}
        self._add(name, encoder)
        return stored

    def _create_seq2seq(self, name: str, config: dict, P: int, projection: bool) -> dict:
        """An encoder-decoder prefix with the paper's three prefixes per layer (``PAPER_LAYOUT``)."""
        g = seq2seq_geometry(self.model.config)
        table = PrefixEncoder(P, g.virtual_layers, g.kv_heads, g.head_dim, projection=projection,
                              encoder_hidden_size=config.get("encoder_hidden_size"))
        stored = {**config, "prefix_projection": projection, "task_type": "SEQ_2_SEQ_LM", "num_virtual_tokens": P,
                  "num_layers": g.decoder_layers, "encoder_layers": g.encoder_layers,
                  "num_attention_heads": g.kv_heads, "token_dim": g.kv_width, "num_transformer_submodules": 2,
                  LAYOUT_KEY: PAPER_LAYOUT}
        self._add(name, Seq2SeqPrefix(table, g, PAPER_LAYOUT))
        return stored

    def _load_seq2seq(self, name: str, config: dict, table: Tensor) -> dict:
        """A PEFT ``SEQ_2_SEQ_LM`` prefix (run as PEFT runs it) or one of ours (``PAPER_LAYOUT``)."""
        g = seq2seq_geometry(self.model.config)
        layout = config.get(LAYOUT_KEY, "peft")
        if layout not in (PAPER_LAYOUT, "peft"):
            raise ValueError(f"{LAYOUT_KEY}={layout!r}: must be {PAPER_LAYOUT!r} (or absent: PEFT's layout)")
        P = int(config.get("num_virtual_tokens", table.shape[0]))
        layers = g.virtual_layers if layout == PAPER_LAYOUT else g.decoder_layers
        if tuple(table.shape) != (P, layers * 2 * g.kv_width):
            raise ValueError(f"prompt_embeddings is {list(table.shape)} but this encoder-decoder model needs "
                             f"[{P}, {layers * 2 * g.kv_width}] for a {layout} prefix ({layers} layers x {g.kv_heads} "
                             f"heads x {g.head_dim}): wrong base model?")
        found = (config.get("num_layers", g.decoder_layers), config.get("num_attention_heads", g.kv_heads),
                 config.get("encoder_layers", g.encoder_layers))
        if found != (g.decoder_layers, g.kv_heads, g.encoder_layers):
            raise ValueError(f"the adapter was made for {found[0]} decoder layers x {found[1]} heads ({found[2]} "
                             f"encoder layers), this base model has {g.decoder_layers} x {g.kv_heads} "
                             f"({g.encoder_layers}): wrong base model?")
        encoder = PrefixEncoder(P, layers, g.kv_heads, g.head_dim)
        encoder.embedding.weight.data.copy_(table)
        self._add(name, Seq2SeqPrefix(encoder, g, layout))
        return config

    def load(self, name: str, config: dict, state: dict[str, Tensor]) -> dict:
        table = state.get("prompt_embeddings")
        if table is None:
            raise ValueError(f"no 'prompt_embeddings' tensor (keys: {sorted(state)})")
        if self.host.encoder_decoder:
            return self._load_seq2seq(name, config, table)
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

    def position_offset(self, name: str) -> int:
        return self.tables[name].num_virtual_tokens  # PEFT's positions: real tokens after the prefix slots

    def route(self, batch: Batch) -> None:
        rows = batch.rows_of(self)
        if any(n is not None for n in rows):
            selection = select_prefixes(self.tables, rows, batch.device, local_kv_heads(self.model),
                                        batch.memo)
            batch.position_offset = selection.position_offset
            batch.enter(self.state.use(selection))
