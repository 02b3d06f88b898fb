"""Prefix tuning of encoder-decoder models (BART, T5): which bank each attention stack reads.

Prefix tuning (Li & Liang 2021) gives an encoder-decoder model three prefixes per layer: one for
the encoder's self-attention (non-causal), one for the decoder's self-attention (causal) and one
for the decoder's cross-attention (prepended to the keys computed from the encoder output). They
are keyed ``(stack, layer)`` in a :class:`~peft_kernels.attention.PrefixSelection`.

Two table layouts are read here:

- ``PAPER_LAYOUT`` (ours): a :class:`PrefixEncoder` over ``L_enc + 2 * L_dec`` virtual layers:
  encoder layers, then decoder self-attention layers, then cross-attention layers.
- PEFT's ``SEQ_2_SEQ_LM`` table ``[P, L * 2 * token_dim]`` (``num_transformer_submodules=2``),
  as PEFT's forward really uses it: doubled along the layer axis, decoder layer i's
  self-attention reads slots 4i, 4i + 1 of the doubled table; the cross-attention pair PEFT
  builds (4i + 2, 4i + 3) is dropped with the cache it sits in, and the encoder gets nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from .. import attention as attn
from .prefix_tuning import PrefixEncoder, layer_prefixes

PAPER_LAYOUT = "encoder+decoder+cross"
LAYOUT_KEY = "prefix_layout"  # our adapter_config.json key; absent in PEFT's directories


@dataclass(frozen=True)
class Seq2SeqGeometry:
    """Encoder layers, decoder layers, key/value heads and head dimension of an encoder-decoder model.

    Semantics: a ``PAPER_LAYOUT`` table has :attr:`virtual_layers` layers of ``2 * kv_width`` columns.
    """

    encoder_layers: int
    decoder_layers: int
    kv_heads: int
    head_dim: int

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def virtual_layers(self) -> int:
        """Layers of a ``PAPER_LAYOUT`` table: encoder + decoder self + cross."""
        return self.encoder_layers + 2 * self.decoder_layers


def seq2seq_geometry(config) -> Seq2SeqGeometry:
    """:class:`Seq2SeqGeometry` of a BART- or T5-style transformers config.

    Semantics: layer counts from ``encoder_layers`` / ``decoder_layers`` (BART) or ``num_layers`` /
    ``num_decoder_layers`` (T5); the head dimension is T5's ``d_kv`` where set, else
    ``d_model / heads``; ValueError if the encoder and decoder head counts differ.
    """
    encoder = getattr(config, "encoder_layers", None) or config.num_layers
    decoder = getattr(config, "decoder_layers", None) or getattr(config, "num_decoder_layers", None) or encoder
    heads = getattr(config, "encoder_attention_heads", None) or config.num_attention_heads
    decoder_heads = getattr(config, "decoder_attention_heads", None) or heads
    if decoder_heads != heads:
        raise ValueError(f"{type(config).__name__} has {heads} encoder and {decoder_heads} decoder attention heads: "
                         "encoder-decoder prefixes need one head count")
    head_dim = getattr(config, "d_kv", None) or config.hidden_size // heads
    return Seq2SeqGeometry(encoder, decoder, heads, head_dim)


def paper_layers(flat: Tensor, g: Seq2SeqGeometry) -> dict[tuple, attn.LayerPrefix]:
    """Every attention stack's prefix from a ``PAPER_LAYOUT`` table.

    Shapes: flat [P, (L_enc + 2 * L_dec) * 2 * kv_heads * head_dim]; returns
    {(stack, layer): LayerPrefix(key, value [1, Hkv, P, D])}.
    Semantics: virtual layer j < L_enc is encoder layer j; the next L_dec are the decoder's
    self-attention layers, the last L_dec its cross-attention layers (views, differentiable).
    """
    layers = layer_prefixes(flat, g.virtual_layers, g.kv_heads, g.head_dim)
    E, L = g.encoder_layers, g.decoder_layers
    keys = [(attn.ENCODER, i) for i in range(E)] + [(attn.DECODER, i) for i in range(L)] + \
        [(attn.CROSS, i) for i in range(L)]
    return {key: layers[j] for j, key in enumerate(keys)}


def peft_layers(flat: Tensor, num_layers: int, num_heads: int, head_dim: int) -> dict[tuple, attn.LayerPrefix]:
    """The decoder self-attention prefixes PEFT's ``SEQ_2_SEQ_LM`` forward applies.

    Shapes: flat [P, num_layers * 2 * num_heads * head_dim] (PEFT's table); returns
    {(DECODER, i): LayerPrefix(key, value [1, H, P, D])} for i < num_layers.
    Semantics: PEFT's layout: layer i's key is slot 4i mod 2L of the table viewed
    [P, 2L, H, D], its value slot 4i + 1 mod 2L (so decoder layers i and i + L/2 share one
    prefix when L is even); no encoder or cross-attention prefix, as in PEFT.
    """
    slots = layer_prefixes(flat, num_layers, num_heads, head_dim)  # {pair: LayerPrefix} of slots 2j, 2j + 1
    return {(attn.DECODER, i): slots[(2 * i) % num_layers] for i in range(num_layers)}


class Seq2SeqPrefix(nn.Module):
    """One encoder-decoder prefix adapter: a :class:`PrefixEncoder` table and its layout.

    Shapes: ``forward()`` returns the flat table (what an adapter directory stores);
    :meth:`layers` returns {(stack, layer): LayerPrefix(key, value [1, Hkv, P, D])}.
    Semantics: ``layout`` is ``PAPER_LAYOUT`` (three prefixes per layer) or ``"peft"`` (PEFT's
    decoder-only use of its table, :func:`peft_layers`).
    """

    def __init__(self, table: PrefixEncoder, geometry: Seq2SeqGeometry, layout: str):
        super().__init__()
        if layout not in (PAPER_LAYOUT, "peft"):
            raise ValueError(f"prefix layout must be {PAPER_LAYOUT!r} or 'peft', got {layout!r}")
        want = geometry.virtual_layers if layout == PAPER_LAYOUT else geometry.decoder_layers
        if table.num_layers != want:
            raise ValueError(f"a {layout} prefix of this model needs {want} table layers, got {table.num_layers}")
        self.table, self.geometry, self.layout = table, geometry, layout

    @property
    def num_virtual_tokens(self) -> int:
        return self.table.num_virtual_tokens

    def forward(self) -> Tensor:
        return self.table()

    def layers(self) -> dict[tuple, attn.LayerPrefix]:
        flat = self.table()
        g = self.geometry
        if self.layout == PAPER_LAYOUT:
            return paper_layers(flat, g)
        return peft_layers(flat, g.decoder_layers, g.kv_heads, g.head_dim)
