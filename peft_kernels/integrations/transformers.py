"""transformers integration: the ``"peft_prefix"`` attention function and mask function.

Prefix K/V live in a :class:`PrefixState` shared by the model's attention modules (one bank per
layer, never copied per row, never put in the KV cache, no rotary embedding). The attention
function reads the layer's bank and calls :func:`peft_kernels.prefix_attention`; the mask
function hands it the 2-D ``[B, Lk]`` padding mask, so nothing ``Lq x Lk`` is materialised.
A pre-hook on the model's backbone shifts position ids by the prefix length (PEFT gives real
tokens positions P..P+L-1; checkpoints trained that way keep their meaning).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import prefix_attention

NAME = "peft_prefix"
STATE_ATTR = "peft_prefix_state"
LAYER_ATTR = "peft_prefix_layer"


@dataclass
class LayerPrefix:
    """One layer's prefix bank: key, value [T, Hkv, P, D] and optional lengths [T]."""

    key: Tensor
    value: Tensor
    lens: Optional[Tensor] = None


@dataclass
class PrefixState:
    """The prefixes of every layer for the current batch, and which entry each row uses.

    Semantics: ``layers[layer_idx]`` is that layer's bank (absent: no prefix there); ``index``
    [B] picks each row's entry (-1 none; None: T == 1 or T == B); ``position_offset`` (an int
    or a [B] tensor) is added to every position id of the batch.
    """

    layers: dict[int, LayerPrefix] = field(default_factory=dict)
    index: Optional[Tensor] = None
    position_offset: Union[int, Tensor] = 0


def _sdpa_fallback(query, key, value, bank_k, bank_v, index, lens, mask4, dropout, scaling):
    """Concatenate the rows' prefixes and run SDPA: for 4-D masks and attention dropout."""
    B, Hq, Lq, D = query.shape
    Hkv, P = key.shape[1], bank_k.shape[2]
    rows = torch.zeros(B, dtype=torch.long, device=query.device) if index is None and bank_k.shape[0] == 1 else (
        torch.arange(B, device=query.device) if index is None else index.long())
    visible = (rows >= 0)[:, None] & (torch.arange(P, device=query.device)[None] <
                                       (P if lens is None else lens.long()[rows.clamp(min=0)][:, None]))
    if mask4.dtype != torch.bool:
        mask4 = mask4 > torch.finfo(mask4.dtype).min / 2
    mask = torch.cat([visible[:, None, None, :].expand(B, 1, Lq, P), mask4.expand(B, 1, Lq, -1)], dim=-1)
    k_all = torch.cat([bank_k[rows.clamp(min=0)], key], dim=2).repeat_interleave(Hq // Hkv, dim=1)
    v_all = torch.cat([bank_v[rows.clamp(min=0)], value], dim=2).repeat_interleave(Hq // Hkv, dim=1)
    return F.scaled_dot_product_attention(query, k_all, v_all, attn_mask=mask, dropout_p=dropout, scale=scaling)


def prefix_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                             attention_mask: Optional[Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                             is_causal: Optional[bool] = None, **kwargs):
    """The ``"peft_prefix"`` attention function (transformers' AttentionInterface signature).

    Shapes: query [B, Hq, Lq, D]; key, value [B, Hkv, Lk, D] (after the cache update);
    attention_mask [B, Lk] bool (from :func:`prefix_mask`), None, or a 4-D mask. Returns
    ([B, Lq, Hq, D], None).
    Semantics: the layer's prefix (if any) is attended before the keys, masked per row;
    causal unless the module says otherwise. Layers without a prefix run the same op with
    every row's prefix switched off.
    """
    state: Optional[PrefixState] = getattr(module, STATE_ATTR, None)
    layer = state.layers.get(getattr(module, LAYER_ATTR, 0)) if state is not None else None
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    B, Hkv, Lk, D = key.shape
    if layer is None:
        bank_k = bank_v = key.new_zeros(1, Hkv, 1, D)
        index, lens = torch.full((B,), -1, dtype=torch.int32, device=key.device), None
    else:
        bank_k, bank_v, lens, index = layer.key.to(key.dtype), layer.value.to(key.dtype), layer.lens, state.index
    dropout = dropout if module.training else 0.0
    if (attention_mask is not None and attention_mask.dim() == 4) or dropout > 0:
        mask4 = attention_mask
        if mask4 is None or mask4.dim() != 4:
            mask4 = _as_4d(attention_mask, B, query.shape[2], Lk, causal, key.device)
        out = _sdpa_fallback(query, key, value, bank_k, bank_v, index, lens, mask4, dropout, scaling)
    else:
        kpm = None if attention_mask is None else attention_mask[:, -Lk:].to(torch.bool)
        out = prefix_attention(query, key, value, bank_k, bank_v, prefix_index=index, prefix_lens=lens,
                               key_padding_mask=kpm, causal=causal, softmax_scale=scaling, validate=False)
    return out.transpose(1, 2).contiguous(), None


def _as_4d(mask2: Optional[Tensor], B: int, Lq: int, Lk: int, causal: bool, device) -> Tensor:
    visible = torch.ones(B, 1, Lq, Lk, dtype=torch.bool, device=device)
    if mask2 is not None:
        visible &= mask2[:, None, None, -Lk:].to(torch.bool)
    if causal:
        visible &= (torch.arange(Lk, device=device)[None] <= torch.arange(Lq, device=device)[:, None] + Lk - Lq)
    return visible


def prefix_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                mask_function=None, attention_mask: Optional[Tensor] = None, **kwargs):
    """The ``"peft_prefix"`` mask function (transformers' AttentionMaskInterface signature).

    Shapes: attention_mask [B, past + q] bool or None. Returns the 2-D padding mask
    [B, kv_length] (None when nothing is padded) for plain causal or bidirectional masks, and
    transformers' 4-D SDPA mask for anything else (sliding windows, packed sequences).
    """
    from transformers import masking_utils as mu

    if mask_function in (mu.causal_mask_function, mu.bidirectional_mask_function):
        # Never test "all real" here: that reads the mask on the host and breaks graph capture.
        return None if attention_mask is None else attention_mask[:, -kv_length:]
    kwargs.pop("allow_is_causal_skip", None)
    return mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                        kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                        allow_is_causal_skip=False, **kwargs)


def register() -> None:
    """Register ``"peft_prefix"`` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, prefix_attention_forward)
    AttentionMaskInterface.register(NAME, prefix_mask)


def _offset_positions(state: PrefixState):
    def hook(module, args, kwargs):
        offset = state.position_offset
        if isinstance(offset, int) and offset == 0:
            return None
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs["inputs_embeds"]
        positions = kwargs.get("position_ids")
        if positions is None:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            past = cache.get_seq_length() if cache is not None else 0
            positions = torch.arange(past, past + tokens.shape[1], device=tokens.device)[None]
        if isinstance(offset, Tensor):
            offset = offset.to(positions.device)[:, None]
        kwargs["position_ids"] = positions + offset
        return args, kwargs

    return hook


def _attention_modules(model: nn.Module) -> dict[nn.Module, int]:
    """{attention module: its layer index}: modules with ``layer_idx`` (decoders, BERT), else
    modules whose class name ends in "Attention", indexed by the layer number in their name (ViT)."""
    found = {m: m.layer_idx for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)}
    if found:
        return found
    for name, module in model.named_modules():
        numbers = [int(part) for part in name.split(".") if part.isdigit()]
        if type(module).__name__.endswith("Attention") and numbers:
            found[module] = numbers[0]
    return found


def attach(model: nn.Module, state: PrefixState) -> "Attachment":
    """Route ``model``'s attention through ``"peft_prefix"`` reading ``state``.

    Semantics: every attention module gets ``state`` and its layer index; when the backbone
    (``model.base_model``) takes ``position_ids``, a pre-hook adds ``state.position_offset`` to
    them (models with learned patch positions, like ViT, keep theirs). ``detach()`` on the
    result restores the previous attention implementation exactly.
    """
    register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(f"no attention modules found in {type(model).__name__}: prefix attention cannot attach")
    for module, layer in modules.items():
        setattr(module, STATE_ATTR, state)
        setattr(module, LAYER_ATTR, layer)
    backbone = getattr(model, "base_model", model)
    hook = None
    if "position_ids" in inspect.signature(backbone.forward).parameters:
        hook = backbone.register_forward_pre_hook(_offset_positions(state), with_kwargs=True)
    return Attachment(model, previous, list(modules), hook)


@dataclass
class Attachment:
    model: nn.Module
    previous: str
    modules: list
    hook: object

    def detach(self) -> None:
        if self.hook is not None:
            self.hook.remove()
        for module in self.modules:
            module.__dict__.pop(STATE_ATTR, None)
            module.__dict__.pop(LAYER_ATTR, None)
        self.model.set_attn_implementation(self.previous)
