"""Prefix tuning and P-tuning v2: per-layer prefix K/V read by the ``"peft_prefix"`` attention.

:class:`PrefixEncoder` produces every layer's prefix (with the MLP reparameterisation in
training, folded away for inference; P-tuning v2 = no reparameterisation). Its layout matches
PEFT's ``PrefixEncoder`` (``embedding``, ``transform``), so PEFT state dicts load unchanged.
:class:`PrefixTunedModel` serves and trains several prefixes in one batch.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .. import attention as attn
from .geometry import model_geometry
from .prompt_model import compact_position_ids
from .selection import per_row, used_in_order


class PrefixEncoder(nn.Module):
    """Trainable prefixes for every layer.

    Shapes: ``forward()`` returns [P, num_layers * 2 * num_kv_heads * head_dim] (PEFT's flat
    layout); :meth:`layers` returns {layer: LayerPrefix(key, value [1, Hkv, P, D])}.
    Semantics: ``projection=True`` is prefix tuning's reparameterisation: a [P, Hkv * D]
    embedding through Linear -> tanh -> Linear (hidden ``encoder_hidden_size``) to the flat
    layout; ``False`` trains the flat table directly (P-tuning v2). :meth:`fold` returns the
    projection-free equivalent for inference.
    """

    def __init__(self, num_virtual_tokens: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 projection: bool = False, encoder_hidden_size: Optional[int] = None):
        super().__init__()
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        token_dim = num_kv_heads * head_dim
        flat = num_layers * 2 * token_dim
        if projection:
            hidden = encoder_hidden_size or token_dim
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim)
            self.transform = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(), nn.Linear(hidden, flat))
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, flat)
            self.transform = None

    @classmethod
    def for_model(cls, config, num_virtual_tokens: int, **kwargs) -> "PrefixEncoder":
        """Sized from a transformers config (layers, KV heads, head dim)."""
        g = model_geometry(config)
        return cls(num_virtual_tokens, g.layers, g.kv_heads, g.head_dim, **kwargs)

    @property
    def num_virtual_tokens(self) -> int:
        return self.embedding.num_embeddings

    def forward(self) -> Tensor:
        table = self.embedding.weight
        return table if self.transform is None else self.transform(table)

    def layers(self) -> dict[int, attn.LayerPrefix]:
        return layer_prefixes(self(), self.num_layers, self.num_kv_heads, self.head_dim)

    @torch.no_grad()
    def fold(self) -> "PrefixEncoder":
        folded = PrefixEncoder(self.num_virtual_tokens, self.num_layers, self.num_kv_heads, self.head_dim)
        folded.embedding.weight.copy_(self())
        return folded


def layer_prefixes(flat: Tensor, num_layers: int, num_kv_heads: int, head_dim: int) -> dict[int, attn.LayerPrefix]:
    """Every layer's prefix from PEFT's flat table: {layer: LayerPrefix(key, value [1, Hkv, P, D])}.

    Shapes: flat [P, num_layers * 2 * num_kv_heads * head_dim].
    Semantics: PEFT's layout: the table viewed as [P, layers * 2, Hkv, D]; layer i's key is
    slot 2i, its value 2i + 1 (views, differentiable).
    """
    P = flat.shape[0]
    kv = flat.view(P, num_layers * 2, num_kv_heads, head_dim).permute(1, 2, 0, 3)
    return {i: attn.LayerPrefix(kv[2 * i][None], kv[2 * i + 1][None]) for i in range(num_layers)}


def stack_layer_prefixes(per_prefix: Sequence[dict[int, attn.LayerPrefix]]) -> dict[int, attn.LayerPrefix]:
    """Per-layer banks [T, Hkv, P_max, D] (+ lens [T]) from T prefixes' layers.

    Semantics: shorter prefixes are zero-padded at the end and masked through ``lens``; a
    layer some prefix lacks gets length 0 for that prefix.
    """
    layers = sorted({i for p in per_prefix for i in p})
    banks = {}
    for i in layers:
        present = [p[i] for p in per_prefix if i in p]
        Hkv, D = present[0].key.shape[1], present[0].key.shape[3]
        P = max(lp.key.shape[2] for lp in present)
        keys, values, lens = [], [], []
        for p in per_prefix:
            lp = p.get(i)
            n = 0 if lp is None else lp.key.shape[2]
            pad = (0, 0, 0, P - n)
            keys.append(present[0].key.new_zeros(Hkv, P, D) if lp is None else nn.functional.pad(lp.key[0], pad))
            values.append(present[0].key.new_zeros(Hkv, P, D) if lp is None else nn.functional.pad(lp.value[0], pad))
            lens.append(n)
        banks[i] = attn.LayerPrefix(torch.stack(keys), torch.stack(values),
                                  torch.tensor(lens, dtype=torch.int32, device=keys[0].device))
    return banks


# Rules giving the KV heads a tensor-parallel model's attention holds on this rank (registered by
# ``peft_kernels.distributed``); each returns None for a model it does not shard.
KV_HEAD_RULES: list = []


def local_kv_heads(model: nn.Module) -> Optional[slice]:
    """The KV heads of ``model``'s attention on this rank (None: all, an unsharded model)."""
    for rule in KV_HEAD_RULES:
        heads = rule(model)
        if heads is not None:
            return heads
    return None


def select_prefixes(prefixes: Mapping[str, PrefixEncoder], names: Sequence[Optional[str]],
                    device, kv_heads: Optional[slice] = None, memo: Optional[dict] = None) -> attn.PrefixSelection:
    """This batch's prefixes: per-layer banks, row index, position offsets.

    Shapes: each layer's bank [T, Hkv, P, D], or [T, len(kv_heads), P, D] with ``kv_heads``.
    Semantics: built once per batch (every layer then reads it through
    :meth:`PrefixState.use`); rows with None get no prefix and no position offset; with no
    prefix in the batch every layer runs prefix-free. ``kv_heads`` keeps those KV heads only
    (a tensor-parallel rank's, :func:`local_kv_heads`). ``memo`` (a dict the caller keeps) reuses
    the banks of the same prefixes while no gradient is recorded and no prefix weight changed (a
    server's steps: the banks are stacked once, not once per step).
    """
    used = used_in_order(names, list(prefixes))
    if not used:
        return attn.NO_PREFIX
    heads = slice(None) if kv_heads is None else kv_heads
    key = None
    if memo is not None and not torch.is_grad_enabled():
        key = ("prefix banks", tuple(used), str(device), (heads.start, heads.stop, heads.step),
               tuple((id(p), p._version) for n in used for p in prefixes[n].parameters()))
    layers = memo.get(key) if key is not None else None
    if layers is None:
        layers = {i: attn.LayerPrefix(lp.key[:, heads].to(device), lp.value[:, heads].to(device), lp.lens.to(device))
                  for i, lp in stack_layer_prefixes([prefixes[n].layers() for n in used]).items()}
        if key is not None:
            if len(memo) >= 64:  # a server sees a handful of prefix mixes at a time; old ones go
                memo.clear()
            memo[key] = layers
    index = torch.tensor([-1 if n is None else used.index(n) for n in names], dtype=torch.int32, device=device)
    lengths = torch.tensor([0] + [prefixes[n].num_virtual_tokens for n in used], device=device)
    return attn.PrefixSelection(layers, index, lengths[index.long() + 1])


class PrefixTunedModel(nn.Module):
    """A transformers model with named prefixes; each row of a batch picks one (or none).

    Shapes: forward(input_ids [B, L], attention_mask [B, L], ...) -> the model's output over L
    positions (the prefix is not a token); generate -> [B, L + new].
    Semantics: every layer attends [row's prefix ; row's tokens]; real tokens get positions
    shifted by the row's prefix length (PEFT's convention) and counted without padding (as
    ``generate`` counts them), so a row's logits do not depend on the rest of the batch; the
    KV cache holds only real tokens.
    """

    def __init__(self, model: nn.Module, prefixes: Union[PrefixEncoder, Mapping[str, PrefixEncoder]]):
        super().__init__()
        self.model = model
        self.prefixes = nn.ModuleDict({"default": prefixes} if isinstance(prefixes, nn.Module) else dict(prefixes))
        self.state = attn.PrefixState()
        self._attachment = attn.attach(model, self.state)

    def _selection(self, prefix, rows: int) -> attn.PrefixSelection:
        names = per_row(prefix, rows, list(self.prefixes), "prefix")
        return select_prefixes(self.prefixes, names, self.model.device, local_kv_heads(self.model))

    def forward(self, input_ids=None, attention_mask=None, *, prefix=None, **kwargs):
        """Run the model with each row's prefix; ``input_ids``/``inputs_embeds`` for text models,
        ``pixel_values`` for vision encoders (which keep their patch positions)."""
        tokens = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        first = tokens if tokens is not None else kwargs["pixel_values"]
        if input_ids is not None:
            kwargs["input_ids"] = input_ids
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
            if tokens is not None and kwargs.get("position_ids") is None:
                kwargs["position_ids"] = compact_position_ids(attention_mask)[:, -tokens.shape[1]:]
        with self.state.use(self._selection(prefix, first.shape[0])):
            return self.model(**kwargs)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *, prefix=None, **kwargs) -> Tensor:
        with self.state.use(self._selection(prefix, input_ids.shape[0])):
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def remove(self) -> nn.Module:
        """Detach the prefix attention and return the plain model."""
        self._attachment.detach()
        return self.model
