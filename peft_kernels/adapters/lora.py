"""LoRA adapters in a MultiAdapterModel: one bank per targeted ``nn.Linear``, one slot per adapter."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import torch
from torch import Tensor, nn

from ..integrations.peft_io import (AdapterFormatError, check_lora_config, lora_module_alpha, peft_lora_modules,
                                    peft_lora_state)
from ..methods.lora import (AdapterRouting, LoraLinear, apply_lora, find_targets, is_linear, kaiming_uniform,
                            linear_shape, lora_layers, lora_scaling)
from .base import AdapterKind, Batch, PeftConfig


@dataclass
class LoraConfig(PeftConfig):
    """LoRA (Hu et al. 2021): ``W x + (alpha / r) B A x`` on the target ``nn.Linear`` layers, via ``multi_lora``.

    ``target_modules``: ``"all-linear"`` (every linear layer but the output head), a list of module
    names / suffixes (``["q_proj", "v_proj"]``) or a full-match regex. ``init_lora_weights=True``
    zero-initialises B (the adapter starts as a no-op); ``use_rslora`` scales by alpha / sqrt(r);
    ``alpha_pattern`` gives per-module alphas (regex -> alpha), as PEFT.
    """

    peft_type = "LORA"
    r: int = 8
    lora_alpha: float = 8.0
    target_modules: Union[str, list] = "all-linear"
    lora_dropout: float = 0.0
    use_rslora: bool = False
    init_lora_weights: bool = True
    alpha_pattern: dict = field(default_factory=dict)


class LoraKind(AdapterKind):
    """LoRA adapters: each targeted linear layer becomes a :class:`LoraLinear` bank; the batch's
    slot index is built once per call and shared by every layer (:class:`AdapterRouting`)."""

    peft_type = "LORA"
    key = "lora"
    config_class = LoraConfig

    def __init__(self, host: nn.Module):
        super().__init__(host)
        self.routing = AdapterRouting()
        self.merged: Union[None, str] = None

    def _linear(self, module_name: str) -> tuple[int, int]:
        """(in_features, out_features) of the linear layer (``nn.Linear`` or ``Conv1D``) ``module_name``."""
        try:
            module = self.model.get_submodule(module_name)
        except AttributeError as exc:
            raise AdapterFormatError(f"module {module_name!r} is not in the base model") from exc
        base = module.base if isinstance(module, LoraLinear) else module
        if not is_linear(base):
            raise AdapterFormatError(f"module {module_name!r} is a {type(base).__name__}, not a linear layer "
                                     "(nn.Linear or Conv1D)")
        return linear_shape(base)

    def create(self, name: str, config: dict) -> dict:
        check_lora_config(config)
        cfg = LoraConfig.from_peft(config)
        found = find_targets(self.model, cfg.target_modules or "all-linear")
        if not found:
            raise ValueError(f"target_modules={cfg.target_modules!r} matched no nn.Linear in {type(self.model).__name__}")
        weights = {}
        for module_name in found:
            fan_in, fan_out = self._linear(module_name)
            a = kaiming_uniform(cfg.r, fan_in)
            b = torch.zeros(fan_out, cfg.r) if cfg.init_lora_weights is not False else kaiming_uniform(fan_out, cfg.r)
            weights[module_name] = (a, b)
        stored = {**config, **cfg.to_peft_dict(), "target_modules": found}
        self._install(name, stored, weights)
        return stored

    def load(self, name: str, config: dict, state: dict[str, Tensor]) -> dict:
        check_lora_config(config)
        self._install(name, config, peft_lora_modules(state))
        return config

    def _install(self, name: str, config: dict, weights: dict[str, tuple[Tensor, Tensor]]) -> None:
        slots = {}
        for module_name, (a, b) in weights.items():  # everything checked and computed before the model changes
            fan_in, fan_out = self._linear(module_name)
            r = a.shape[0]
            if a.dim() != 2 or a.shape[1] != fan_in or tuple(b.shape) != (fan_out, r):
                raise AdapterFormatError(
                    f"LoRA weights for {module_name!r} are A {list(a.shape)} and B {list(b.shape)}, but the base "
                    f"layer maps {fan_in} -> {fan_out} features: wrong base model?")
            scale = lora_scaling(float(lora_module_alpha(config, module_name)), r, bool(config.get("use_rslora", False)))
            slots[module_name] = (a, b, scale)
        dropout = float(config.get("lora_dropout", 0.0))
        apply_lora(self.model, list(weights), self.routing, self.host.adapter_dtype)
        for module_name, layer in lora_layers(self.model).items():
            layer.train(self.host.training)
            if module_name in slots:
                a, b, scale = slots[module_name]
                layer.add_slot(a, b, scale, dropout)
            else:
                layer.add_slot(None, None, 0.0)
        self.routing.names.append(name)
        self.names.append(name)

    def state_dict_of(self, name: str) -> dict[str, Tensor]:
        slot = self.routing.names.index(name)
        return peft_lora_state({m: tuple(w.detach() for w in layer.weights(slot))
                                for m, layer in lora_layers(self.model).items() if int(layer.ranks[slot])})

    def remove(self, name: str) -> None:
        if self.merged == name:
            self.unmerge()
        slot = self.routing.names.index(name)
        for layer in lora_layers(self.model).values():
            layer.remove_slot(slot)
        self.routing.names.remove(name)
        self.names.remove(name)

    def merge(self, name: str) -> None:
        """Fold adapter ``name`` into the base weights (W += scaling * B @ A in each layer)."""
        if self.merged is not None:
            raise ValueError(f"adapter {self.merged!r} is already merged; unmerge it first")
        slot = self.routing.names.index(name)
        for layer in lora_layers(self.model).values():
            layer.merge(slot, name)
        self.merged = name

    def unmerge(self) -> None:
        if self.merged is None:
            return
        slot = self.routing.names.index(self.merged)
        for layer in lora_layers(self.model).values():
            layer.unmerge(slot)
        self.merged = None

    def route(self, batch: Batch) -> None:
        if self.merged is not None:
            if any(n != self.merged for n in batch.names):
                raise ValueError(f"adapter {self.merged!r} is merged into the base weights: every row must use it "
                                 "(call unmerge_adapter() to mix adapters)")
            return
        rows = batch.rows_of(self)
        if all(n is None for n in rows):
            return
        slot_of = {n: self.routing.names.index(n) for n in set(rows) if n is not None}
        slots = [-1 if n is None else slot_of[n] for n in rows]
        batch.enter(self.routing.use(batch.token_index(torch.tensor(slots, dtype=torch.int32, device=batch.device))))
