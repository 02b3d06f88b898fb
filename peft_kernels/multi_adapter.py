"""``MultiAdapterModel``: one batch, many adapters of different kinds, for serving and training.

Rows of one batch may each use a LoRA adapter, a prefix (prefix tuning / P-tuning v2), a soft
prompt (prompt tuning / P-tuning v1), a bottleneck adapter or nothing. The model is a registry of
adapter kinds (:mod:`peft_kernels.adapters`, one class per kind) plus a per-call router: per
batch, each kind routes its own rows (one LoRA slot index shared by every LoRA layer, one
per-layer prefix bank read by the ``"peft_prefix"`` attention, one fused embed + prompt
insertion), and that routing lives in the call, not on the model.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import re
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import attention as attn
from .adapters import AdapterKind, Batch, as_config_dict, kind_class
from .cache_utils import cache_kw
from .integrations.peft_io import AdapterFormatError, read_adapter_dir, write_adapter_dir
from .methods.checkpointing import keep_call_context
from .methods.geometry import model_device
from .methods.packed_batch import PackedRows, pack_rows, packed_prompt_inputs
from .methods.packed_generation import packed_settings
from .methods.prompt_model import compact_position_ids, generate_with_prompts, prompt_batch
from .methods.selection import per_row
from .packing import make_packing, packed, packed_cache

# Adapter kinds an encoder-decoder model serves (prefixes go to the encoder, the decoder and the
# cross-attention; LoRA is per module).
ENCODER_DECODER_KINDS = ("LORA", "PREFIX_TUNING")

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


def check_adapter_name(name) -> str:
    """``name`` if it is a valid adapter name (letters, digits, ``_ . -``; no path separators,
    not ``.`` / ``..``), else ValueError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in (".", "..") or ".." in name:
        raise ValueError(f"adapter name must be a non-empty string of letters, digits, '_', '.' or '-' (no path "
                         f"separators, no '..'), got {name!r}")
    return name


class MultiAdapterModel(nn.Module):
    """A transformers model serving and training many adapters of different kinds at once.

    Shapes: forward(input_ids [B, L], attention_mask [B, L], labels [B, L],
    adapter_names=[name or None] * B) returns the model's output with logits [B, L, V] (real
    tokens only, whatever the kinds in the batch); generate returns [B, L + new].
    Semantics: each row's logits equal that row run alone under its own PEFT model (positions
    counted without padding, as generate counts them); in train mode every adapter used in the
    batch gets exactly the gradient of its own rows. ``adapter_names=None`` gives every row the
    active adapter (:meth:`set_adapter`; none until set: the base model). The base model is
    frozen (``freeze_base=False`` keeps its ``requires_grad`` flags); adapter weights are kept in
    ``adapter_dtype`` (fp32 by default, as PEFT does).

    Packed batches: where the model allows it (transformers' attention interface, causal
    attention, no sliding window, no attention dropout in training), a batch with padding or
    soft prompts runs packed (``packed=None``, the default): only real tokens and each row's own
    prompt slots are computed, positions restart per row, and the KV cache of ``generate`` holds
    exactly those tokens. ``packed=False`` runs the padded batch; ``packed=True`` refuses a model
    that cannot pack. Outputs have the padded shapes either way.

    Encoder-decoder models (BART, T5): LoRA and prefix adapters (other kinds are refused);
    ``forward`` takes the model's decoder arguments (``decoder_input_ids``, ...) and returns its
    decoder logits; padded batches only. A prefix made here has the paper's three prefixes per
    layer (encoder self-, decoder self- and cross-attention); a PEFT ``SEQ_2_SEQ_LM`` prefix
    directory runs as PEFT runs it (decoder self-attention only). Decoder positions start at the
    row's prefix length (PEFT's convention); encoder positions are the model's own.

    Thread safety: concurrent ``forward``/``generate`` calls (threads or async tasks) are safe:
    each call's routing lives in ``contextvars``, and a call made directly on ``self.model``
    outside them runs the base model. Adding, loading, unloading, merging or training adapters
    while other calls run is not: do those while no call is in flight.
    """

    def __init__(self, model: nn.Module, adapter_dtype: torch.dtype = torch.float32, freeze_base: bool = True):
        super().__init__()
        self.model = model
        self.encoder_decoder = attn.is_encoder_decoder(model)
        self.adapter_dtype = adapter_dtype
        self.kinds = nn.ModuleDict()
        self.configs: dict[str, dict] = {}
        self.active_adapter: Optional[str] = None
        self.prefix_state = attn.PrefixState()
        self._attachment: Optional[attn.Attachment] = None
        self._pack_refusal: Optional[str] = None
        if freeze_base:
            for p in model.parameters():
                p.requires_grad_(False)

    # ------------------------------------------------------------------ registry

    @property
    def adapters(self) -> dict[str, str]:
        """``{name: peft_type}`` of every loaded adapter, in load order."""
        return {name: config["peft_type"] for name, config in self.configs.items()}

    def kind(self, peft_type: str) -> AdapterKind:
        """The instance of adapter kind ``peft_type`` in this model (created on first use)."""
        cls = kind_class(peft_type)
        if self.encoder_decoder and cls.peft_type not in ENCODER_DECODER_KINDS:
            raise ValueError(f"{cls.peft_type} adapters are not supported on encoder-decoder models like "
                             f"{type(self.model).__name__}; supported there: {', '.join(ENCODER_DECODER_KINDS)}")
        if cls.key not in self.kinds:
            self.kinds[cls.key] = cls(self).train(self.training)
        return self.kinds[cls.key]

    def _kind_of(self, name: str) -> AdapterKind:
        return self.kind(self._known(name)["peft_type"])

    def _known(self, name: str) -> dict:
        if name not in self.configs:
            raise ValueError(f"unknown adapter {name!r}; loaded: {list(self.configs)}")
        return self.configs[name]

    def set_adapter(self, name: Optional[str]) -> None:
        """Make ``name`` the adapter every row uses when ``adapter_names`` is not given (None: base)."""
        if name is not None:
            self._known(name)
        self.active_adapter = name

    def _check_new(self, name: str) -> None:
        check_adapter_name(name)
        if name in self.configs:
            raise ValueError(f"an adapter named {name!r} is already loaded")

    def _add(self, name: str, config: dict, build) -> None:
        """Run ``build(kind)`` (which adds the adapter) so that a failure leaves no trace."""
        kind = self.kind(config.get("peft_type"))
        before = list(kind.names)
        try:
            stored = build(kind)
        except Exception:
            if name in kind.names and name not in before:
                kind.remove(name)
            raise
        stored.setdefault("task_type", "CAUSAL_LM")
        self.configs[name] = stored

    def add_adapter(self, name: str, config) -> None:
        """Create a new trainable adapter from a config: an ``api`` config dataclass, a PEFT config
        object, or a PEFT-style dict with ``peft_type``.

        Semantics: LORA: ``r``, ``lora_alpha``, ``target_modules`` (names, a regex or
        "all-linear"), ``use_rslora``, ``lora_dropout``, ``alpha_pattern``, ``init_lora_weights``
        (True: B = 0 as PEFT; False: random B); PROMPT_TUNING: ``num_virtual_tokens``,
        ``prompt_tuning_init`` RANDOM or SAMPLE_VOCAB; P_TUNING: ``encoder_reparameterization_type``
        MLP or LSTM, ``encoder_hidden_size``; PREFIX_TUNING: ``prefix_projection``,
        ``encoder_hidden_size``; BOTTLENECK: see ``api.BottleneckConfig``. Defaults are the
        ``api`` dataclasses'. A bad value raises ValueError naming the field and changes nothing.
        """
        self._check_new(name)
        config = as_config_dict(config)
        self._add(name, config, lambda kind: kind.create(name, config))

    def load_adapter(self, path: Union[str, os.PathLike], name: str) -> None:
        """Load an adapter directory (PEFT's LoRA, prefix tuning, prompt tuning or P-tuning; ours
        for bottleneck adapters).

        Semantics: a missing file, a corrupt safetensors file, an unsupported type, a bad config
        value or weights that do not fit this base model raise :class:`AdapterFormatError` (a
        ValueError) naming the directory, and leave the model exactly as before.
        """
        self._check_new(name)
        config, state = read_adapter_dir(path)
        try:
            kind_class(config.get("peft_type"))
            self._add(name, config, lambda kind: kind.load(name, config, state))
        except (ValueError, TypeError) as exc:  # AdapterFormatError included
            raise AdapterFormatError(f"{path}: {exc}") from exc

    def unload_adapter(self, name: str) -> None:
        """Remove an adapter (its LoRA slots, prefix, prompt or bottleneck slots) from the model."""
        self._kind_of(name).remove(name)
        del self.configs[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def merge_adapter(self, name: str) -> None:
        """Fold LoRA adapter ``name`` into the base weights (W += scaling * B @ A in each layer).

        Semantics: for serving one adapter at base-model speed; while merged, every row must use
        ``name`` (it is made active) and :meth:`unmerge_adapter` restores the base weights.
        """
        kind = self._kind_of(name)
        if not hasattr(kind, "merge"):
            raise ValueError(f"only LoRA adapters merge; {name!r} is {self.adapters[name]}")
        kind.merge(name)
        self.active_adapter = name

    def unmerge_adapter(self) -> None:
        """Undo :meth:`merge_adapter` (a no-op when nothing is merged)."""
        for kind in self.kinds.values():
            if hasattr(kind, "unmerge"):
                kind.unmerge()

    @property
    def merged(self) -> Optional[str]:
        """The merged LoRA adapter, or None."""
        return next((k.merged for k in self.kinds.values() if getattr(k, "merged", None)), None)

    def adapter_state_dict(self, name: str) -> dict[str, Tensor]:
        """The adapter's tensors under PEFT's key names (what ``save_adapter`` writes)."""
        return self._kind_of(name).state_dict_of(name)

    def save_adapter(self, name: str, path: Union[str, os.PathLike]) -> None:
        """Write a PEFT-compatible adapter directory, atomically (a complete temporary sibling,
        swapped in with one rename)."""
        config = dict(self._known(name), inference_mode=True)
        write_adapter_dir(path, config, self.adapter_state_dict(name))

    def attention(self) -> attn.PrefixState:
        """The model's ``"peft_prefix"`` attention state, attached on first use (prefix kinds and
        packed calls both run on it)."""
        if self._attachment is None:
            self._attachment = attn.attach(self.model, self.prefix_state)
        return self.prefix_state

    # ------------------------------------------------------------------ batches

    @contextlib.contextmanager
    def route(self, adapter_names, rows: int, device=None, slots_per_row: Optional[Tensor] = None,
              memo: Optional[dict] = None) -> Iterator[Batch]:
        """Route every call of ``self.model`` inside the block: each kind sets up its rows.

        Semantics: ``adapter_names`` as in :meth:`forward`; ``slots_per_row`` [B] makes it a
        packed call's routing (per-token indices over each row's slots); the routing is per call
        (context-local) and gone after the block. ``memo``: see :class:`Batch` (its owner
        empties it whenever an adapter's weights may have changed).
        """
        names = self.row_names(adapter_names, rows)
        if self.training:
            keep_call_context(self.model)  # recomputed checkpointed blocks see this call's routing
        with contextlib.ExitStack() as stack:
            configs = self.configs  # the types of this call's adapters only: a server may hold thousands
            kind_of = {n: configs[n]["peft_type"] for n in set(names) if n is not None}
            batch = Batch(names, kind_of, device or self.device, stack, slots_per_row=slots_per_row, memo=memo)
            for kind in self.kinds.values():
                kind.route(batch)
            yield batch

    def row_names(self, adapter_names, rows: int) -> list[Optional[str]]:
        """Each row's adapter name (None: base model), checked; ``adapter_names`` as in :meth:`forward`."""
        if adapter_names is None:
            adapter_names = [self.active_adapter] * rows
        return per_row(adapter_names, rows, list(self.configs))

    @property
    def device(self) -> torch.device:
        """The device of the wrapped model."""
        return model_device(self.model)

    def virtual_tokens(self, name: Optional[str]) -> int:
        """Soft-prompt slots adapter ``name`` puts before a row's tokens (0 for None and non-prompt kinds)."""
        return 0 if name is None else self._kind_of(name).virtual_tokens(name)

    def position_offset(self, name: Optional[str]) -> int:
        """The position a row of adapter ``name`` gives its first token (a prefix's length, else 0)."""
        return 0 if name is None else self._kind_of(name).position_offset(name)

    def _inputs(self, batch: Batch, input_ids, attention_mask, labels, inputs_embeds) -> dict:
        if batch.prompt_rows is not None:
            return prompt_batch(self.model, batch.prompts, batch.prompt_rows, input_ids=input_ids,
                                inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels)
        inputs = dict(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels)
        if attention_mask is not None and not self.encoder_decoder:  # encoder-decoder models take no position ids
            inputs["position_ids"] = compact_position_ids(attention_mask)
        return inputs

    # ------------------------------------------------------------------ packed calls

    def pack_refusal(self) -> Optional[str]:
        """Why this model cannot run packed batches (None: it can)."""
        if self._pack_refusal is None:
            modules = attn.attention_modules(self.model)
            if self.encoder_decoder:
                why = "it is an encoder-decoder model (packing serves causal LMs)"
            elif not getattr(self.model, "_supports_attention_backend", False) or not modules:
                why = f"{type(self.model).__name__} does not run its attention through transformers' AttentionInterface"
            elif any(not getattr(m, "is_causal", True) for m in modules):
                why = "its attention is bidirectional (packing serves causal LMs)"
            elif any(getattr(m, "sliding_window", None) for m in modules):
                why = "it has sliding-window attention layers"
            elif attn.position_module(self.model, list(modules)) is None:
                why = "it takes no position_ids"
            else:
                why = ""
            self._pack_refusal = why
        if self.training and any(float(getattr(m, "attention_dropout", 0.0) or 0.0) > 0
                                 for m in attn.attention_modules(self.model)):
            return "its attention dropout is on (train mode)"
        return self._pack_refusal or None

    def _packs(self, packed: Optional[bool], attention_mask: Optional[Tensor], names, kwargs: dict,
               allowed: frozenset) -> bool:
        if packed is False:
            return False
        why = self.pack_refusal() or next((f"{k}= is not supported packed" for k in kwargs if k not in allowed), None)
        if packed is True and why:
            raise ValueError(f"cannot run this batch packed: {why}")
        if why:
            return False
        if packed is True:
            return True
        padded = attention_mask is not None and not bool(attention_mask.bool().all())
        return padded or any(self.virtual_tokens(n) for n in set(names))

    @contextlib.contextmanager
    def _packed_route(self, names, attention_mask, shape, device) -> Iterator[tuple[Batch, PackedRows]]:
        slots = {n: self.virtual_tokens(n) for n in set(names)}
        prompt_lens = torch.tensor([slots[n] for n in names], dtype=torch.long, device=device)
        rows = pack_rows(attention_mask, shape, device, prompt_lens=prompt_lens)
        self.attention()
        with self.route(names, shape[0], device, slots_per_row=rows.seq_lens) as batch:
            yield batch, rows.shifted(batch.position_offset)

    def keeps_logits(self) -> bool:
        """Does the model's forward take ``logits_to_keep`` (positions whose logits to compute)?"""
        return "logits_to_keep" in inspect.signature(self.model.forward).parameters

    def packed_call(self, rows: PackedRows, inputs: dict, **kwargs):
        """``self.model(**inputs, **kwargs)`` as the packed step ``rows`` describes (its packing and
        positions); the caller routes the call (:meth:`route` with ``slots_per_row``)."""
        with packed(rows.packing):
            return self.model(**inputs, position_ids=rows.positions, **kwargs)

    # ------------------------------------------------------------------ forward / generate

    _PACKED_FORWARD_KWARGS = frozenset({"return_dict", "use_cache"})

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                labels: Optional[Tensor] = None, *, adapter_names: Union[None, str, Sequence[Optional[str]]] = None,
                inputs_embeds: Optional[Tensor] = None, packed: Optional[bool] = None, **kwargs):
        """Run a mixed batch: input_ids [B, L] (or inputs_embeds [B, L, H]), attention_mask [B, L]
        (padding anywhere), labels [B, L]; returns the model's output with logits [B, L, V].

        Semantics: see the class; a packed call's logits are 0 on padding and its loss is the
        padded call's (the same tokens, each predicted within its own row).
        """
        tokens = input_ids if input_ids is not None else inputs_embeds
        B, L = tokens.shape[:2]
        names = self.row_names(adapter_names, B)
        if self._packs(packed, attention_mask, names, kwargs, self._PACKED_FORWARD_KWARGS):
            kwargs.setdefault("use_cache", False)
            with self._packed_route(names, attention_mask, (B, L), tokens.device) as (batch, rows):
                inputs = packed_prompt_inputs(self.model, batch.prompts, batch.prompt_rows, rows, input_ids=input_ids,
                                              inputs_embeds=inputs_embeds)
                if labels is not None:
                    inputs["labels"] = rows.labels(labels)
                elif self.keeps_logits():
                    kwargs["logits_to_keep"] = rows.token_slots  # no head over prompt slots
                out = self.packed_call(rows, inputs, **kwargs)
            out.logits = rows.unpack(out.logits)
            return out
        with self.route(names, B, tokens.device) as batch:
            out = self.model(**self._inputs(batch, input_ids, attention_mask, labels, inputs_embeds), **kwargs)
        if getattr(out, "logits", None) is not None and out.logits.shape[1] != L and not self.encoder_decoder:
            out.logits = out.logits[:, -L:]  # drop the soft-prompt slots: real tokens only
        return out

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *,
                 adapter_names: Union[None, str, Sequence[Optional[str]]] = None, packed: Optional[bool] = None,
                 **kwargs) -> Tensor:
        """Generate for a mixed batch; returns [B, L + new] (input ids, then new tokens).

        Semantics: one routing for the whole generation: LoRA rows keep their slot, prefix
        rows read their prefix from the attention kernel (never from the KV cache), prompt
        rows get their prompt embedded once at prefill. Packed (see the class), greedy or
        sampled (temperature, top-k, top-p); other generation settings run transformers'
        ``generate`` on the padded batch. Finished rows get ``pad_token_id`` until every row
        has stopped. Beam search and several return sequences per row are not supported (they
        would re-order rows).
        """
        for key in ("num_beams", "num_return_sequences"):
            if int(kwargs.get(key) or 1) > 1:
                raise ValueError(f"{key} > 1 is not supported for mixed-adapter batches")
        B, L = input_ids.shape
        names = self.row_names(adapter_names, B)
        sampling = packed_settings(self.model, L, kwargs) if packed is not False else None
        if sampling is not None and self._packs(packed, attention_mask, names, {}, frozenset()):
            return self._generate_packed(input_ids, attention_mask, names, sampling)
        if packed is True:
            raise ValueError(f"cannot generate packed with {sorted(kwargs)}: only max_new_tokens / max_length, "
                             "min_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id and pad_token_id "
                             "run packed")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with self.route(names, B, input_ids.device) as batch:
            if batch.prompt_rows is not None:
                inputs = self._inputs(batch, input_ids, attention_mask, None, None)
                return generate_with_prompts(self.model, input_ids, inputs, **kwargs)
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def _generate_packed(self, input_ids: Tensor, attention_mask: Optional[Tensor], names, sampling) -> Tensor:
        B, L = input_ids.shape
        device = input_ids.device
        if sampling.max_new_tokens == 0:
            return input_ids
        cache = packed_cache()
        keep = {"logits_to_keep": None} if self.keeps_logits() else {}
        with self._packed_route(names, attention_mask, (B, L), device) as (batch, rows):
            if bool((rows.seq_lens == 0).any()):
                raise ValueError("every row needs at least one real token (or a soft prompt) to generate from")
            inputs = packed_prompt_inputs(self.model, batch.prompts, batch.prompt_rows, rows, input_ids=input_ids)
            last = rows.last_slots()
            if keep:
                keep["logits_to_keep"] = last
            out = self.packed_call(rows, inputs, use_cache=True, **{cache_kw(): cache}, **keep)
            logits = out.logits[0] if keep else out.logits[0, last]
        positions = rows.positions[0, last] + 1
        cached = rows.seq_lens.clone()
        new = input_ids.new_full((B, sampling.max_new_tokens), sampling.pad_token_id)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        eos = None if sampling.eos is None else sampling.eos.to(device)
        ones = torch.ones(B, dtype=torch.long, device=device)
        with self.route(names, B, device):  # decode: one token per row, so per-row indices are per token
            for step in range(sampling.max_new_tokens):
                token = sampling.choose(input_ids, logits, step)
                token = torch.where(done, sampling.pad_token_id, token)
                new[:, step] = token
                if eos is not None:
                    done |= torch.isin(token, eos)
                if step + 1 == sampling.max_new_tokens or bool(done.all()):
                    return torch.cat([input_ids, new[:, :step + 1]], 1)
                packing = make_packing(ones, cached)
                with packed(packing):
                    out = self.model(input_ids=token[:, None].T, position_ids=positions[None], use_cache=True,
                                     **{cache_kw(): cache})
                logits = out.logits[0]
                positions = positions + 1
                cached = cached + 1
        return torch.cat([input_ids, new], 1)
