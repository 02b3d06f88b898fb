"""Prefix attention inside transformers models: the ``"peft_prefix"`` attention and mask functions.

Prefix K/V live in a :class:`PrefixState` shared by a model's attention modules (one bank per
layer, never copied per row, never put in the KV cache, no rotary embedding). The attention
function reads the layer's bank from the state's *current selection* and calls
:func:`peft_kernels.prefix_attention`; the mask function hands it the 2-D ``[B, Lk]`` padding
mask, so nothing ``Lq x Lk`` is materialised. A pre-hook on the model's backbone shifts position
ids by the selection's offset (PEFT gives real tokens positions P..P+L-1; checkpoints trained
that way keep their meaning).

The selection is per call, not per module: :meth:`PrefixState.use` sets it in a
``contextvars.ContextVar``, so two threads running one model with different prefixes each see
their own, and a call outside any ``use`` block runs without a prefix.
"""
from __future__ import annotations

import contextlib
import contextvars
import inspect
from dataclasses import dataclass, field
from typing import Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops import prefix_attention, prefix_attention_varlen
from .packing import Packing, current_packing

NAME = "peft_prefix"
STATE_ATTR = "peft_prefix_state"
LAYER_ATTR = "peft_prefix_layer"
BIAS_ATTR = "peft_prefix_bias_source"

# Encoder-decoder models: a layer's bank is keyed (stack, layer index) with one of these stacks.
ENCODER, DECODER, CROSS = "encoder", "decoder", "cross"
# Encoder-decoder architectures whose attention modules call transformers' AttentionInterface
# (checked on transformers 5.17 and 5.24) although their classes do not declare it.
SEQ2SEQ_INTERFACE_MODELS = ("bart", "t5")


@dataclass
class LayerPrefix:
    """One layer's prefix bank: key, value [T, Hkv, P, D] and optional lengths [T]."""

    key: Tensor
    value: Tensor
    lens: Optional[Tensor] = None


@dataclass
class PrefixSelection:
    """The prefixes of every layer for one call, and which entry each row uses.

    Semantics: ``layers[key]`` is that layer's bank (absent: no prefix there), keyed by the layer
    index, or by ``(stack, layer index)`` in encoder-decoder models (stack ``ENCODER``,
    ``DECODER`` or ``CROSS``: encoder self-, decoder self- or decoder cross-attention); ``index``
    [B] picks each row's entry (-1 none; None: T == 1 or T == B); ``position_offset`` (an int
    or a [B] tensor) is added to every position id of the batch.
    """

    layers: dict[int, LayerPrefix] = field(default_factory=dict)
    index: Optional[Tensor] = None
    position_offset: Union[int, Tensor] = 0


NO_PREFIX = PrefixSelection()


class PrefixState:
    """Where a model's attention modules look for the current call's :class:`PrefixSelection`.

    Semantics: :meth:`current` is the selection of the innermost :meth:`use` block of this
    thread / async context (``NO_PREFIX`` outside any block), so concurrent calls never see
    each other's prefixes and nothing lingers after a call.
    """

    def __init__(self):
        self._current: contextvars.ContextVar[PrefixSelection] = contextvars.ContextVar(
            f"peft_prefix_selection_{id(self)}", default=NO_PREFIX)

    def __getstate__(self) -> dict:  # copies and pickles never carry a call's selection
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def current(self) -> PrefixSelection:
        return self._current.get()

    @contextlib.contextmanager
    def use(self, selection: PrefixSelection) -> Iterator[PrefixSelection]:
        token = self._current.set(selection)
        try:
            yield selection
        finally:
            self._current.reset(token)


def sequence_mask(key_padding_mask: Optional[Tensor], B: int, Lq: int, Lk: int, causal: bool, device) -> Tensor:
    """``[B, 1, Lq, Lk]`` bool, True = query i may attend sequence key j (the op's contract:
    ``key_padding_mask`` [B, >= Lk] real keys, causal bottom-right aligned)."""
    visible = torch.ones(B, 1, Lq, Lk, dtype=torch.bool, device=device)
    if key_padding_mask is not None:
        visible &= key_padding_mask[:, None, None, -Lk:].to(torch.bool)
    if causal:
        visible &= (torch.arange(Lk, device=device)[None] <= torch.arange(Lq, device=device)[:, None] + Lk - Lq)
    return visible


def row_index(index: Optional[Tensor], T: int, B: int, device) -> Tensor:
    """Per-row bank index as int64 [B] (``None``: entry 0 for every row when T == 1, else row b -> b)."""
    if index is not None:
        return index.to(device=device, dtype=torch.long)
    if T == 1:
        return torch.zeros(B, dtype=torch.long, device=device)
    return torch.arange(B, dtype=torch.long, device=device)


def row_prefix_lens(rows: Tensor, P: int, lens: Optional[Tensor]) -> Tensor:
    """[B] int64: each row's real prefix length (rows [B] int64 entries, -1 = none -> 0)."""
    length = torch.full_like(rows, P) if lens is None else lens.to(rows.device).long()[rows.clamp(min=0)]
    return torch.where(rows >= 0, length, 0)


def prefix_slots_visible(rows: Tensor, P: int, lens: Optional[Tensor]) -> Tensor:
    """[B, P] bool: slot p of row b's prefix is real (its entry is >= 0 and p < its length)."""
    return torch.arange(P, device=rows.device)[None] < row_prefix_lens(rows, P, lens)[:, None]


def cat_sdpa(query: Tensor, key: Tensor, value: Tensor, bank_k: Tensor, bank_v: Tensor, index: Optional[Tensor],
             lens: Optional[Tensor], mask: Tensor, dropout: float = 0.0, scaling: Optional[float] = None) -> Tensor:
    """Prefix attention the way it is done without this library: copy each row's prefix in
    front of its K/V, and run SDPA (``enable_gqa``) with an explicit boolean mask.

    Shapes: query [B, Hq, Lq, D]; key, value [B, Hkv, Lk, D]; bank_k, bank_v [T, Hkv, P, D];
    index [B] or None; lens [T] or None; mask [B, 1, Lq, Lk] over the sequence keys (bool, or
    an additive float mask; the prefix part is built here) or [B, 1 or Hq, Lq, P + Lk] over
    [prefix ; sequence] (bool, or an additive float mask such as T5's position bias: used as
    is); returns [B, Hq, Lq, D].
    Semantics: the op's contract, through torch's SDPA, differentiable; serves attention
    dropout and arbitrary 4-D masks in models, and is the benchmark baseline. A query with no
    visible key gets NaN from SDPA where the op returns 0.
    """
    B, Hq, Lq, _ = query.shape
    Hkv, P, Lk = key.shape[1], bank_k.shape[2], key.shape[2]
    rows = row_index(index, bank_k.shape[0], B, query.device)
    if mask.shape[-1] != P + Lk:
        visible = prefix_slots_visible(rows, P, lens)
        if mask.dtype != torch.bool:
            mask = mask > torch.finfo(mask.dtype).min / 2
        mask = torch.cat([visible[:, None, None, :].expand(B, 1, Lq, P), mask.expand(B, 1, Lq, -1)], dim=-1)
    k_all = torch.cat([bank_k[rows.clamp(min=0)], key], dim=2)  # the per-row copy
    v_all = torch.cat([bank_v[rows.clamp(min=0)], value], dim=2)
    return F.scaled_dot_product_attention(query, k_all, v_all, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                          enable_gqa=Hq != Hkv)


def prefix_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                             attention_mask: Optional[Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                             is_causal: Optional[bool] = None, **kwargs):
    """The ``"peft_prefix"`` attention function (transformers' AttentionInterface signature).

    Shapes: query [B, Hq, Lq, D]; key, value [B, Hkv, Lk, D] (after the cache update);
    attention_mask [B, Lk] bool (from :func:`prefix_mask`), None, or a 4-D mask. Returns
    ([B, Lq, Hq, D], None). In a packed call (:func:`peft_kernels.packing.packed`) B = 1 and
    the tokens are the sequences of the current :class:`~peft_kernels.packing.Packing`.
    Semantics: the layer's prefix of the current call (if any) is attended before the keys,
    masked per row (per sequence when packed); causal unless the module says otherwise. In a
    sliding-window layer the prefix slides out of the window as PEFT's cached prefix does.
    Without a prefix for this layer it is plain attention through the same op. A
    ``position_bias`` [1 or B, Hq, Lq, Lk] (T5's relative bias) is added to the sequence
    scores (cat + SDPA: the op has no bias input); the prefix slots get 0, or, in a decoder
    self-attention whose module names a bias source, the bias of positions -P_b..-1 before the
    first real token (where PEFT's cached prefix sits).
    """
    state: Optional[PrefixState] = getattr(module, STATE_ATTR, None)
    selection = state.current() if state is not None else NO_PREFIX
    layer = selection.layers.get(getattr(module, LAYER_ATTR, 0))
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    dropout = dropout if module.training else 0.0
    bias = kwargs.get("position_bias")
    if bias is not None:
        return _biased(module, query, key, value, attention_mask, layer, selection.index, causal, dropout, scaling,
                       bias), None
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    packing = current_packing()
    if packing is not None:
        return _packed(query, key, value, layer, selection.index, causal, dropout, scaling, window, packing), None
    return _batched(query, key, value, attention_mask, layer, selection.index, causal, dropout, scaling, window), None


def _bank(layer: Optional[LayerPrefix], index: Optional[Tensor], key: Tensor, rows: int):
    """(bank_k, bank_v, lens, index) of the layer's prefix; an unused one-slot bank without one
    (key [B, Hkv, L, D] or packed [N, Hkv, D]: Hkv is dim 1 of both)."""
    if layer is None:
        bank = key.new_zeros(1, key.shape[1], 1, key.shape[-1])
        return bank, bank, None, torch.full((rows,), -1, dtype=torch.int32, device=key.device)
    return layer.key.to(key.dtype), layer.value.to(key.dtype), layer.lens, index


def _batched(query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
             layer: Optional[LayerPrefix], index: Optional[Tensor], causal: bool, dropout: float,
             scaling: Optional[float], window) -> Tensor:
    """[B, Lq, Hq, D]: the padded-batch attention of :func:`prefix_attention_forward`."""
    B, Hkv, Lk, D = key.shape
    Lq = query.shape[2]
    if layer is None and attention_mask is None and (Lq == Lk or Lq == 1):
        # No prefix and no padding in this call: plain attention at the base model's cost (no bank,
        # no merge); Lq == Lk or Lq == 1 makes torch's top-left causal alignment the op's bottom-right one.
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scaling,
                                             is_causal=causal and Lq > 1, enable_gqa=Hkv != query.shape[1])
        return out.transpose(1, 2).contiguous()
    bank_k, bank_v, lens, index = _bank(layer, index, key, B)
    if (attention_mask is not None and attention_mask.dim() == 4) or dropout > 0:
        mask4 = attention_mask
        if mask4 is None or mask4.dim() != 4:
            mask4 = sequence_mask(attention_mask, B, Lq, Lk, causal, key.device)
        if window and layer is not None:
            mask4 = _with_windowed_prefix(mask4, bank_k.shape[0], bank_k.shape[2], index, lens, window)
        out = cat_sdpa(query, key, value, bank_k, bank_v, index, lens, mask4, dropout, scaling)
    else:
        kpm = None if attention_mask is None else attention_mask[:, -Lk:].to(torch.bool)
        out = prefix_attention(query, key, value, bank_k, bank_v, prefix_index=index, prefix_lens=lens,
                               key_padding_mask=kpm, causal=causal, softmax_scale=scaling, validate=False)
    return out.transpose(1, 2).contiguous()


def _packed(query: Tensor, key: Tensor, value: Tensor, layer: Optional[LayerPrefix], index: Optional[Tensor],
            causal: bool, dropout: float, scaling: Optional[float], window, packing: Packing) -> Tensor:
    """[1, N_q, Hq, D]: attention of a packed call, each sequence over [its prefix ; its own keys]."""
    if dropout > 0 or window:
        raise RuntimeError("packed calls run without attention dropout and sliding windows; the model layer "
                           "runs such models as padded batches")
    Hq, Nq, D = query.shape[1:]
    q, k, v = query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1)  # [N, H, D] views
    S = packing.num_seqs
    if packing.uniform and S:
        # Equal lengths: the stream is an [S, L] batch, viewed in place (no copy).
        def rows(t: Tensor) -> Tensor:
            return t.unflatten(0, (S, t.shape[0] // S)).transpose(1, 2)

        out = _batched(rows(q), rows(k), rows(v), None, layer, index, causal, 0.0, scaling, None)
        return out.reshape(1, Nq, Hq, D)
    bank_k, bank_v, lens, index = _bank(layer, index, k, S)
    out = prefix_attention_varlen(q, k, v, bank_k, bank_v, cu_seqlens_q=packing.cu_seqlens_q,
                                  cu_seqlens_k=packing.cu_seqlens_k, max_seqlen_q=packing.max_seqlen_q,
                                  max_seqlen_k=packing.max_seqlen_k, prefix_index=index, prefix_lens=lens,
                                  causal=causal, softmax_scale=scaling, validate=False)
    return out[None]


def _biased(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
            layer: Optional[LayerPrefix], index: Optional[Tensor], causal: bool, dropout: float,
            scaling: Optional[float], bias: Tensor) -> Tensor:
    """[B, Lq, Hq, D]: attention over [prefix ; sequence] with an additive sequence bias [1 or B, Hq, Lq, Lk]."""
    B, Hkv, Lk, _ = key.shape
    Hq, Lq = query.shape[1], query.shape[2]
    if attention_mask is not None and attention_mask.dim() == 4:
        visible = attention_mask if attention_mask.dtype == torch.bool else \
            attention_mask > torch.finfo(attention_mask.dtype).min / 2
    else:
        visible = sequence_mask(attention_mask, B, Lq, Lk, causal, key.device)
    bank_k, bank_v, lens, index = _bank(layer, index, key, B)
    T, P = bank_k.shape[0], bank_k.shape[2]
    rows = row_index(index, T, B, key.device)
    slots = prefix_slots_visible(rows, P, lens)[:, None, None, :].expand(B, 1, Lq, P)
    source = module.__dict__.get(BIAS_ATTR)
    if layer is not None and source is not None:
        prefix_bias = _cached_prefix_bias(source, row_prefix_lens(rows, P, lens), P, Lq, Lk)
    else:
        prefix_bias = bias.new_zeros(1, 1, Lq, P)
    scores = torch.cat([prefix_bias.expand(B, Hq, Lq, P), bias.expand(B, Hq, Lq, Lk)], dim=-1).to(query.dtype)
    mask = scores.masked_fill(~torch.cat([slots, visible.expand(B, 1, Lq, Lk)], dim=-1),
                              torch.finfo(query.dtype).min)
    return cat_sdpa(query, key, value, bank_k, bank_v, index, lens, mask, dropout, scaling).transpose(1, 2).contiguous()


def _cached_prefix_bias(source: nn.Module, row_len: Tensor, P: int, Lq: int, Lk: int) -> Tensor:
    """[B, H, Lq, P]: T5's relative bias (``source``: the stack's attention module holding
    ``relative_attention_bias``) of slot p of row b at position p - P_b, for queries at real
    positions Lk - Lq .. Lk - 1 (the slots and tokens of PEFT's prefilled cache)."""
    device = row_len.device
    queries = torch.arange(Lq, device=device) + Lk - Lq
    relative = torch.arange(P, device=device)[None, None, :] - row_len[:, None, None] - queries[None, :, None]
    buckets = type(source)._relative_position_bucket(
        relative, bidirectional=not source.is_decoder, num_buckets=source.relative_attention_num_buckets,
        max_distance=source.relative_attention_max_distance)
    return source.relative_attention_bias(buckets).permute(0, 3, 1, 2)


def _with_windowed_prefix(seq_mask: Tensor, T: int, P: int, index: Optional[Tensor], lens: Optional[Tensor],
                          window: int) -> Tensor:
    """``[B, 1, Lq, P + Lk]``: a sliding-window layer's mask over [prefix ; sequence], where the
    prefix slides out of the window as it does in PEFT's cache (slot p sits at position p, the
    row's real tokens after its P_b slots): query i sees slot p iff p > P_b + Lk - Lq + i - window."""
    if seq_mask.dtype != torch.bool:
        seq_mask = seq_mask > torch.finfo(seq_mask.dtype).min / 2
    B, Lq, Lk = seq_mask.shape[0], seq_mask.shape[2], seq_mask.shape[3]
    device = seq_mask.device
    rows = row_index(index, T, B, device)
    row_len = row_prefix_lens(rows, P, lens)
    slot = torch.arange(P, device=device)
    query = torch.arange(Lq, device=device)
    real = prefix_slots_visible(rows, P, lens)  # [B, P]
    in_window = slot[None, None, :] > (row_len[:, None, None] + Lk - Lq + query[None, :, None] - window)
    prefix = (real[:, None, :] & in_window)[:, None]  # [B, 1, Lq, P]
    return torch.cat([prefix, seq_mask.expand(B, 1, Lq, Lk)], dim=-1)


def prefix_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                mask_function=None, attention_mask: Optional[Tensor] = None, **kwargs):
    """The ``"peft_prefix"`` mask function (transformers' AttentionMaskInterface signature).

    Shapes: attention_mask [B, past + q] bool or None. Returns the 2-D padding mask
    [B, kv_length] (None when nothing is padded) for plain causal or bidirectional masks, and
    transformers' 4-D SDPA mask for anything else (sliding windows, packed sequences).
    """
    from transformers import masking_utils as mu

    if current_packing() is not None:
        return None  # the attention reads the sequence boundaries from the packing
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


# Models whose default position ids count the attention mask's real tokens instead of cache slots.
MASK_POSITION_MODELS = ("opt",)


def _offset_positions(state: PrefixState, mask_positions: bool):
    def hook(module, args, kwargs):
        if current_packing() is not None:
            return None  # a packed call passes its positions, offsets included
        offset = state.current().position_offset
        if isinstance(offset, int) and offset == 0:
            return None
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs["inputs_embeds"]
        positions = kwargs.get("position_ids")
        mask = kwargs.get("attention_mask")
        if positions is None and mask_positions and mask is not None and mask.dim() == 2:
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -tokens.shape[1]:]
        elif positions is None:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            past = cache.get_seq_length() if cache is not None else 0
            positions = torch.arange(past, past + tokens.shape[1], device=tokens.device)[None]
        if isinstance(offset, Tensor):
            offset = offset.to(positions.device)[:, None]
        kwargs["position_ids"] = positions + offset
        return args, kwargs

    return hook


def attention_modules(model: nn.Module) -> dict[nn.Module, int]:
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


def is_encoder_decoder(model: nn.Module) -> bool:
    """Is ``model`` a transformers encoder-decoder model (BART, T5, ...)?

    Semantics: its config's ``is_encoder_decoder`` (False for a model without a config).
    """
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def layer_keys(model: nn.Module) -> dict[nn.Module, object]:
    """{attention module: the key of its bank in :attr:`PrefixSelection.layers`}.

    Semantics: the layer index (:func:`attention_modules`), or in an encoder-decoder model
    ``(stack, layer index)`` with stack ``ENCODER`` (modules of ``get_encoder()``), ``CROSS``
    (non-causal decoder modules) or ``DECODER`` (causal decoder modules).
    """
    modules = attention_modules(model)
    if not is_encoder_decoder(model):
        return modules
    encoder = {id(m) for m in model.get_encoder().modules()}
    return {m: (ENCODER if id(m) in encoder else DECODER if getattr(m, "is_causal", True) else CROSS, i)
            for m, i in modules.items()}


def _bias_sources(modules: dict[nn.Module, object]) -> dict[nn.Module, nn.Module]:
    """{decoder self-attention module: its stack's module holding T5's ``relative_attention_bias``}."""
    holders = [m for m, key in modules.items() if isinstance(key, tuple) and key[0] == DECODER
               and getattr(m, "has_relative_attention_bias", False)]
    if not holders:
        return {}
    return {m: holders[0] for m, key in modules.items() if isinstance(key, tuple) and key[0] == DECODER}


def _offset_embedded_positions(state: PrefixState):
    """Forward hook of a learned decoder position embedding called as ``(ids, past, position_ids=)``
    (BART's): re-embeds the positions shifted by the selection's ``position_offset`` ([B, L, H] then)."""
    def hook(module, args, kwargs, output):
        offset = state.current().position_offset
        positions = kwargs.get("position_ids")
        if isinstance(offset, int) and offset == 0:
            return None
        if positions is None:
            raise RuntimeError(f"{type(module).__name__} was called without position_ids=: the prefix's position "
                               "offset cannot be applied to this decoder")
        offset = offset.to(positions.device)[:, None] if isinstance(offset, Tensor) else offset
        shifted = positions.reshape(1, -1) + offset  # [1 or B, L]
        return type(module).forward(module, args[0], position_ids=shifted)[0]

    return hook


def _decoder_position_hook(model: nn.Module, state: PrefixState):
    embed = getattr(model.get_decoder(), "embed_positions", None)
    if embed is None or "position_ids" not in inspect.signature(embed.forward).parameters:
        return None  # relative positions (T5): the prefix bias takes the offset
    return embed.register_forward_hook(_offset_embedded_positions(state), with_kwargs=True)


def _own_config_stacks(model: nn.Module) -> list:
    """[(submodel, its attention implementation)]: sub-models with a config of their own (T5's
    encoder and decoder stacks, whose configs ``set_attn_implementation`` of the whole model does
    not reach on transformers 5.17)."""
    from transformers import PreTrainedModel

    return [(m, m.config._attn_implementation) for m in model.modules()
            if m is not model and isinstance(m, PreTrainedModel) and m.config is not model.config]


def attach(model: nn.Module, state: PrefixState) -> "Attachment":
    """Route ``model``'s attention through ``"peft_prefix"`` reading ``state``.

    Semantics: refuses (ValueError) a model whose class does not declare transformers' attention
    interface support (its attention would silently ignore the prefix) unless it is one of
    ``SEQ2SEQ_INTERFACE_MODELS``; every attention module gets ``state`` and its key
    (:func:`layer_keys`); a pre-hook on :func:`position_module` adds the current selection's
    ``position_offset`` to the position ids (models with learned patch positions, like ViT, keep
    theirs). Encoder-decoder models: the offset shifts the decoder's positions only (a hook on a
    learned decoder position embedding; T5's decoder self-attention modules get their stack's
    relative-bias module instead, for the prefix slots' bias).
    ``detach()`` on the result restores the previous attention implementation exactly.
    """
    seq2seq = is_encoder_decoder(model) and getattr(model.config, "model_type", None) in SEQ2SEQ_INTERFACE_MODELS
    if not getattr(model, "_supports_attention_backend", False) and not seq2seq:
        raise ValueError(f"{type(model).__name__} does not run its attention through transformers' "
                         "AttentionInterface, so the prefix cannot reach its attention layers: prefix tuning is "
                         "not supported on this architecture (LoRA and soft prompts are)")
    register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    modules = layer_keys(model)
    if not modules:
        model.set_attn_implementation(previous)
        raise ValueError(f"no attention modules found in {type(model).__name__}: prefix attention cannot attach")
    for module, layer in modules.items():
        setattr(module, STATE_ATTR, state)
        setattr(module, LAYER_ATTR, layer)
    for module, source in _bias_sources(modules).items():
        module.__dict__[BIAS_ATTR] = source  # a plain reference, not a submodule
    if seq2seq:
        stacks = _own_config_stacks(model)
        for stack, _ in stacks:
            stack.set_attn_implementation(NAME)
        return Attachment(model, previous, list(modules), _decoder_position_hook(model, state), stacks)
    backbone = position_module(model, list(modules))
    hook = None
    if backbone is not None:
        mask_positions = getattr(model.config, "model_type", None) in MASK_POSITION_MODELS
        hook = backbone.register_forward_pre_hook(_offset_positions(state, mask_positions), with_kwargs=True)
    return Attachment(model, previous, list(modules), hook)


def position_module(model: nn.Module, attention: list) -> Optional[nn.Module]:
    """The innermost module that takes ``position_ids`` and holds every attention module: where
    a model's positions enter (``LlamaModel``; ``OPTDecoder``, which ``OPTForCausalLM`` calls
    directly), or None (models with learned patch positions, like ViT)."""
    wanted = {id(m) for m in attention}
    best, depth = None, -1
    for name, module in model.named_modules():
        if "position_ids" not in inspect.signature(module.forward).parameters:
            continue
        held = {id(m) for m in module.modules()}
        if wanted <= held and name.count(".") + bool(name) > depth:
            best, depth = module, name.count(".") + bool(name)
    return best


@dataclass
class Attachment:
    """What :func:`attach` changed on a model; :meth:`detach` undoes it."""

    model: nn.Module
    previous: str
    modules: list
    hook: object
    stacks: list = field(default_factory=list)  # [(submodel, its previous attention implementation)]

    def detach(self) -> None:
        if self.hook is not None:
            self.hook.remove()
        for module in self.modules:
            module.__dict__.pop(STATE_ATTR, None)
            module.__dict__.pop(LAYER_ATTR, None)
            module.__dict__.pop(BIAS_ATTR, None)
        self.model.set_attn_implementation(self.previous)
        for stack, previous in self.stacks:
            stack.set_attn_implementation(previous)
