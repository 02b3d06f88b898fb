"""``MultiAdapterModel``: one batch, many adapters of different kinds, for serving and training.

Rows of one batch may each use a LoRA adapter, a prefix (prefix tuning / P-tuning v2), a soft
prompt (prompt tuning / P-tuning v1) or nothing. Per batch, the row selection becomes: one
LoRA slot index shared by every LoRA layer, one per-layer prefix bank read by the
``"peft_prefix"`` attention, and one fused embed + prompt insertion. Adapters load from and
save to PEFT directories.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .integrations import transformers as hf
from .integrations.peft_io import AdapterFormatError, read_adapter_dir, write_adapter_dir
from .methods.lora import (AdapterRouting, LoraLinear, _kaiming_a, apply_lora, check_lora_config, find_targets,
                           lora_layers, module_scaling, peft_lora_modules, peft_lora_state)
from .methods.prefix_tuning import PrefixEncoder, select_prefixes
from .methods.prompt_model import compact_position_ids, generate_with_prompts, prompt_batch
from .methods.soft_prompt import PromptEncoder, SoftPrompt
from .methods.selection import per_row

LORA, PREFIX, PROMPT, PTUNING = "LORA", "PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING"
KINDS = (LORA, PREFIX, PROMPT, PTUNING)


def _as_dict(config) -> dict:
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    config = {k: (v.value if hasattr(v, "value") else v) for k, v in dict(config).items()}
    if isinstance(config.get("target_modules"), (set, frozenset)):
        config["target_modules"] = sorted(config["target_modules"])
    kind = config.get("peft_type")
    if kind not in KINDS:
        raise ValueError(f"peft_type {kind!r} is not supported; choose one of {', '.join(KINDS)}")
    return config


class MultiAdapterModel(nn.Module):
    """A transformers model serving and training many adapters of different kinds at once.

    Shapes: forward(input_ids [B, L], attention_mask [B, L], labels [B, L],
    adapter_names=[name or None] * B) returns the model's output with logits [B, L, V] (real
    tokens only, whatever the kinds in the batch); generate returns [B, L + new].
    Semantics: each row's logits equal that row run alone under its own PEFT model (positions
    counted without padding, as generate counts them); in train mode every adapter used in the
    batch gets exactly the gradient of its own rows. ``adapter_names=None`` gives every row the
    active adapter (:meth:`set_adapter`; none until set: the base model). LoRA weights are kept
    in ``adapter_dtype`` (fp32 by default, as PEFT does).
    """

    def __init__(self, model: nn.Module, adapter_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.model = model
        self.adapter_dtype = adapter_dtype
        self.routing = AdapterRouting()
        self.prompts = nn.ModuleDict()
        self.prefixes = nn.ModuleDict()
        self.configs: dict[str, dict] = {}
        self.prefix_state = hf.PrefixState()
        self._attachment: Optional[hf.Attachment] = None
        self.active_adapter: Optional[str] = None
        self.merged: Optional[str] = None

    # ------------------------------------------------------------------ adapters

    @property
    def adapters(self) -> dict[str, str]:
        """``{name: peft_type}`` of every loaded adapter, in load order."""
        return {name: config["peft_type"] for name, config in self.configs.items()}

    def set_adapter(self, name: Optional[str]) -> None:
        """Make ``name`` the adapter every row uses when ``adapter_names`` is not given (None: base)."""
        if name is not None and name not in self.configs:
            raise ValueError(f"unknown adapter {name!r}; loaded: {list(self.configs)}")
        self.active_adapter = name

    def _check_new(self, name: str) -> None:
        if not name or not isinstance(name, str):
            raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
        if name in self.configs:
            raise ValueError(f"an adapter named {name!r} is already loaded")

    def _geometry(self) -> dict:
        c = self.model.config
        heads = c.num_attention_heads
        kv_heads = getattr(c, "num_key_value_heads", None) or heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        return dict(hidden=c.hidden_size, layers=c.num_hidden_layers, kv_heads=kv_heads, head_dim=head_dim)

    def add_adapter(self, name: str, config) -> None:
        """Create a new trainable adapter from a PEFT config (object or dict).

        Semantics: LORA: ``r``, ``lora_alpha``, ``target_modules`` (names, a regex or
        "all-linear"), ``use_rslora``, ``lora_dropout``, ``init_lora_weights`` (True: B = 0 as
        PEFT; False: random B); PROMPT_TUNING: ``num_virtual_tokens``, ``prompt_tuning_init``
        RANDOM or SAMPLE_VOCAB; P_TUNING: ``encoder_reparameterization_type`` MLP or LSTM,
        ``encoder_hidden_size``; PREFIX_TUNING: ``prefix_projection``, ``encoder_hidden_size``.
        """
        self._check_new(name)
        config = _as_dict(config)
        kind, g = config["peft_type"], self._geometry()
        if kind == LORA:
            check_lora_config(config)
            r = int(config.get("r", 8))
            targets = config.get("target_modules") or "all-linear"
            found = find_targets(self.model, targets)
            if not found:
                raise ValueError(f"target_modules={targets!r} matched no nn.Linear in {type(self.model).__name__}")
            weights = {}
            for module_name in found:
                base = self._linear(module_name)
                a = _kaiming_a(r, base.in_features, None)
                zero_b = config.get("init_lora_weights", True) is not False
                b = torch.zeros(base.out_features, r) if zero_b else _kaiming_a(base.out_features, r, None)
                weights[module_name] = (a, b)
            config.update(target_modules=found, r=r)
            self._install_lora(name, config, weights)
        elif kind in (PROMPT, PTUNING):
            P = int(config.get("num_virtual_tokens", 20))
            if kind == PROMPT:
                init = {"RANDOM": "random", "SAMPLE_VOCAB": "sample_vocab"}.get(config.get("prompt_tuning_init", "RANDOM"))
                if init is None:
                    raise ValueError("prompt_tuning_init TEXT needs a tokenizer; create a SoftPrompt(init='text', "
                                     "init_token_ids=...) and use PromptTunedModel, or use RANDOM / SAMPLE_VOCAB")
                module = SoftPrompt(P, g["hidden"], init, word_embeddings=self.model.get_input_embeddings().weight)
            else:
                kind_name = str(config.get("encoder_reparameterization_type", "MLP")).lower()
                module = PromptEncoder(P, g["hidden"], config.get("encoder_hidden_size"), kind=kind_name,
                                       num_layers=int(config.get("encoder_num_layers", 2)),
                                       dropout=float(config.get("encoder_dropout", 0.0)))
            config.update(num_virtual_tokens=P, token_dim=g["hidden"], num_transformer_submodules=1)
            self.prompts[name] = module.to(self.model.device)
        else:
            P = int(config.get("num_virtual_tokens", 20))
            module = PrefixEncoder(P, g["layers"], g["kv_heads"], g["head_dim"],
                                   projection=bool(config.get("prefix_projection", False)),
                                   encoder_hidden_size=config.get("encoder_hidden_size"))
            config.update(num_virtual_tokens=P, num_layers=g["layers"], num_attention_heads=g["kv_heads"],
                          token_dim=g["kv_heads"] * g["head_dim"], num_transformer_submodules=1)
            self._install_prefix(name, module)
        config.setdefault("task_type", "CAUSAL_LM")
        self.configs[name] = config

    def _linear(self, module_name: str) -> nn.Linear:
        try:
            module = self.model.get_submodule(module_name)
        except AttributeError as exc:
            raise AdapterFormatError(f"module {module_name!r} is not in the base model") from exc
        base = module.base if isinstance(module, LoraLinear) else module
        if not isinstance(base, nn.Linear):
            raise AdapterFormatError(f"module {module_name!r} is a {type(base).__name__}, not nn.Linear")
        return base

    def _install_lora(self, name: str, config: dict, weights: dict[str, tuple[Tensor, Tensor]]) -> None:
        for module_name, (a, b) in weights.items():  # validate everything before touching the model
            base = self._linear(module_name)
            r = a.shape[0]
            if a.dim() != 2 or a.shape[1] != base.in_features or tuple(b.shape) != (base.out_features, r):
                raise AdapterFormatError(
                    f"LoRA weights for {module_name!r} are A {list(a.shape)} and B {list(b.shape)}, but the base "
                    f"layer is Linear({base.in_features}, {base.out_features}): wrong base model?")
        apply_lora(self.model, list(weights), self.routing, self.adapter_dtype)
        dropout = float(config.get("lora_dropout", 0.0))
        for module_name, layer in lora_layers(self.model).items():
            if module_name in weights:
                a, b = weights[module_name]
                layer.add_slot(a, b, module_scaling(config, module_name, a.shape[0]), dropout)
            else:
                layer.add_slot(None, None, 0.0)
        self.routing.names.append(name)

    def _install_prefix(self, name: str, module: PrefixEncoder) -> None:
        if self._attachment is None:
            self._attachment = hf.attach(self.model, self.prefix_state)
        self.prefixes[name] = module.to(self.model.device)

    def load_adapter(self, path: Union[str, os.PathLike], name: str) -> None:
        """Load a PEFT adapter directory (LoRA, prefix tuning, prompt tuning or P-tuning).

        Semantics: a missing file, a corrupt safetensors file, an unsupported type or weights
        that do not fit this base model raise :class:`AdapterFormatError` (a ValueError) and
        leave the loaded adapters untouched.
        """
        self._check_new(name)
        config, state = read_adapter_dir(path)
        try:
            config = _as_dict(config)
        except ValueError as exc:
            raise AdapterFormatError(f"{path}: {exc}") from exc
        kind, g = config["peft_type"], self._geometry()
        if kind == LORA:
            try:
                check_lora_config(config)
                weights = peft_lora_modules(state)
            except ValueError as exc:
                raise AdapterFormatError(f"{path}: {exc}") from exc
            self._install_lora(name, config, weights)
        else:
            table = state.get("prompt_embeddings")
            if table is None:
                raise AdapterFormatError(f"{path}: no 'prompt_embeddings' tensor (keys: {sorted(state)})")
            P = int(config.get("num_virtual_tokens", table.shape[0]))
            width = g["hidden"] if kind != PREFIX else g["layers"] * 2 * g["kv_heads"] * g["head_dim"]
            if tuple(table.shape) != (P, width):
                raise AdapterFormatError(f"{path}: prompt_embeddings is {list(table.shape)} but this base model needs "
                                         f"[{P}, {width}] for {kind}: wrong base model?")
            if kind == PREFIX:
                module = PrefixEncoder(P, g["layers"], g["kv_heads"], g["head_dim"])
                module.embedding.weight.data.copy_(table)
                self._install_prefix(name, module)
            else:
                module = SoftPrompt(P, g["hidden"])
                module.weight.data.copy_(table)
                self.prompts[name] = module.to(self.model.device)
        self.configs[name] = config

    def unload_adapter(self, name: str) -> None:
        """Remove an adapter (its LoRA slots, prefix or prompt) from the model."""
        kind = self.adapters.get(name)
        if kind is None:
            raise ValueError(f"unknown adapter {name!r}; loaded: {list(self.configs)}")
        if kind == LORA:
            if self.merged == name:
                self.unmerge_adapter()
            slot = self.routing.names.index(name)
            for layer in lora_layers(self.model).values():
                layer.remove_slot(slot)
            self.routing.names.remove(name)
        elif kind == PREFIX:
            del self.prefixes[name]
        else:
            del self.prompts[name]
        del self.configs[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def merge_adapter(self, name: str) -> None:
        """Fold LoRA adapter ``name`` into the base weights (W += scaling * B @ A in each layer).

        Semantics: for serving one adapter at base-model speed; while merged, every row must use
        ``name`` (it is made active) and :meth:`unmerge_adapter` restores the base weights.
        """
        if self.adapters.get(name) != LORA:
            raise ValueError(f"only LoRA adapters merge; {name!r} is {self.adapters.get(name)}")
        if self.merged is not None:
            raise ValueError(f"adapter {self.merged!r} is already merged; unmerge it first")
        slot = self.routing.names.index(name)
        for layer in lora_layers(self.model).values():
            layer.merge(slot, name)
        self.merged = self.active_adapter = name

    def unmerge_adapter(self) -> None:
        """Undo :meth:`merge_adapter` (a no-op when nothing is merged)."""
        if self.merged is None:
            return
        slot = self.routing.names.index(self.merged)
        for layer in lora_layers(self.model).values():
            layer.unmerge(slot)
        self.merged = None

    def adapter_state_dict(self, name: str) -> dict[str, Tensor]:
        """The adapter's tensors under PEFT's key names (what ``save_adapter`` writes)."""
        kind = self.adapters.get(name)
        if kind is None:
            raise ValueError(f"unknown adapter {name!r}; loaded: {list(self.configs)}")
        if kind == LORA:
            slot = self.routing.names.index(name)
            return peft_lora_state({m: tuple(w.detach() for w in layer.weights(slot))
                                    for m, layer in lora_layers(self.model).items() if int(layer.ranks[slot])})
        module = self.prefixes[name] if kind == PREFIX else self.prompts[name]
        return {"prompt_embeddings": module().detach()}

    def save_adapter(self, name: str, path: Union[str, os.PathLike]) -> None:
        """Write a PEFT-compatible adapter directory, atomically (temp files, then renames)."""
        config = dict(self.configs[name], inference_mode=True)
        write_adapter_dir(path, config, self.adapter_state_dict(name))

    # ------------------------------------------------------------------ batches

    @contextlib.contextmanager
    def _batch(self, adapter_names, rows: int, device) -> Iterator[dict]:
        """Route one batch: LoRA slot index, prefix banks and the rows' prompts, set once."""
        if adapter_names is None:
            adapter_names = [self.active_adapter] * rows
        names = per_row(adapter_names, rows, list(self.configs))
        if self.merged is not None and any(n != self.merged for n in names):
            raise ValueError(f"adapter {self.merged!r} is merged into the base weights: every row must use it "
                             "(call unmerge_adapter() to mix adapters)")
        kind = self.adapters
        lora = [self.routing.names.index(n) if n is not None and kind[n] == LORA else -1 for n in names]
        use_lora = max(lora, default=-1) >= 0 and self.merged is None
        lora_index = torch.tensor(lora, dtype=torch.int32, device=device) if use_lora else None
        prefix_rows = [n if n is not None and kind[n] == PREFIX else None for n in names]
        prompt_rows = [n if n is not None and kind[n] in (PROMPT, PTUNING) else None for n in names]
        select_prefixes(self.prefix_state, self.prefixes, prefix_rows, device)
        try:
            with self.routing.use(lora_index):
                yield {"prompt_rows": prompt_rows if any(prompt_rows) else None}
        finally:
            select_prefixes(self.prefix_state, self.prefixes, [None] * rows, device)

    def _inputs(self, route, input_ids, attention_mask, labels, inputs_embeds) -> dict:
        if route["prompt_rows"] is not None:
            return prompt_batch(self.model, self.prompts, route["prompt_rows"], input_ids=input_ids,
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
        with self._batch(adapter_names, B, tokens.device) as route:
            out = self.model(**self._inputs(route, input_ids, attention_mask, labels, inputs_embeds), **kwargs)
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
        with self._batch(adapter_names, B, input_ids.device) as route:
            if route["prompt_rows"] is not None:
                inputs = self._inputs(route, input_ids, attention_mask, None, None)
                return generate_with_prompts(self.model, input_ids, inputs, **kwargs)
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
