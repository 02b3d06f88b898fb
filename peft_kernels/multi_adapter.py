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
import os
import re
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .adapters import AdapterKind, Batch, as_config_dict, kind_class
from .integrations.peft_io import AdapterFormatError, read_adapter_dir, write_adapter_dir
from .methods.checkpointing import keep_call_context
from .methods.geometry import model_device
from .methods.prompt_model import compact_position_ids, generate_with_prompts, prompt_batch
from .methods.selection import per_row

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

    Thread safety: concurrent ``forward``/``generate`` calls (threads or async tasks) are safe:
    each call's routing lives in ``contextvars``, and a call made directly on ``self.model``
    outside them runs the base model. Adding, loading, unloading, merging or training adapters
    while other calls run is not: do those while no call is in flight.
    """

    def __init__(self, model: nn.Module, adapter_dtype: torch.dtype = torch.float32, freeze_base: bool = True):
        super().__init__()
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            raise ValueError(f"MultiAdapterModel serves decoder-only and encoder-only models; {type(model).__name__} "
                             "is an encoder-decoder model (its prefixes and prompts would need the encoder and the "
                             "decoder routed separately), which is not supported")
        self.model = model
        self.adapter_dtype = adapter_dtype
        self.kinds = nn.ModuleDict()
        self.configs: dict[str, dict] = {}
        self.active_adapter: Optional[str] = None
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

    # ------------------------------------------------------------------ batches

    @contextlib.contextmanager
    def route(self, adapter_names, rows: int, device=None) -> Iterator[Batch]:
        """Route every call of ``self.model`` inside the block: each kind sets up its rows.

        Semantics: ``adapter_names`` as in :meth:`forward`; the routing is per call (context-local)
        and gone after the block.
        """
        if adapter_names is None:
            adapter_names = [self.active_adapter] * rows
        names = per_row(adapter_names, rows, list(self.configs))
        if self.training:
            keep_call_context(self.model)  # recomputed checkpointed blocks see this call's routing
        with contextlib.ExitStack() as stack:
            batch = Batch(names, self.adapters, device or self._device(), stack)
            for kind in self.kinds.values():
                kind.route(batch)
            yield batch

    def _device(self) -> torch.device:
        return model_device(self.model)

    def _inputs(self, batch: Batch, input_ids, attention_mask, labels, inputs_embeds) -> dict:
        if batch.prompt_rows is not None:
            return prompt_batch(self.model, batch.prompts, batch.prompt_rows, input_ids=input_ids,
                                inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels)
        inputs = dict(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels)
        if attention_mask is not None:
            inputs["position_ids"] = compact_position_ids(attention_mask)
        return inputs

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                labels: Optional[Tensor] = None, *, adapter_names: Union[None, str, Sequence[Optional[str]]] = None,
                inputs_embeds: Optional[Tensor] = None, **kwargs):
        tokens = input_ids if input_ids is not None else inputs_embeds
        B, L = tokens.shape[:2]
        with self.route(adapter_names, B, tokens.device) as batch:
            out = self.model(**self._inputs(batch, input_ids, attention_mask, labels, inputs_embeds), **kwargs)
        if getattr(out, "logits", None) is not None and out.logits.shape[1] != L:
            out.logits = out.logits[:, -L:]  # drop the soft-prompt slots: real tokens only
        return out

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *,
                 adapter_names: Union[None, str, Sequence[Optional[str]]] = None, **kwargs) -> Tensor:
        """Generate for a mixed batch; returns [B, L + new] (input ids, then new tokens).

        Semantics: one routing for the whole generation: LoRA rows keep their slot, prefix
        rows read their prefix from the attention kernel (never from the KV cache), prompt
        rows get their prompt embedded once at prefill. Beam search and several return
        sequences per row are not supported (they would re-order rows).
        """
        for key in ("num_beams", "num_return_sequences"):
            if int(kwargs.get(key) or 1) > 1:
                raise ValueError(f"{key} > 1 is not supported for mixed-adapter batches")
        B = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with self.route(adapter_names, B, input_ids.device) as batch:
            if batch.prompt_rows is not None:
                inputs = self._inputs(batch, input_ids, attention_mask, None, None)
                return generate_with_prompts(self.model, input_ids, inputs, **kwargs)
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
