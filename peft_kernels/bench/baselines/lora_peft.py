"""PEFT's own LoRA forward on a one-Linear module, with the stacked bank's adapters loaded into it.

``build`` makes a ``peft.PeftModel`` around a module holding one ``nn.Linear`` target and adds
one PEFT adapter per bank entry (its real rank, ``lora_alpha = scaling * r`` so PEFT's scaling
equals the bank's), with the bank's weights copied in. The target's base layer returns a
precomputed base output (a clone, which PEFT then updates in place), so the base GEMM is outside
the timing exactly as it is for ``multi_lora(..., base=...)``: what is timed is PEFT's model
forward, its hooks, and ``_mixed_batch_forward`` (``adapter_names=``, inference only) or, with a
single adapter, the plain LoRA forward (which also trains).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


class _PrecomputedBase(nn.Linear):
    """An ``nn.Linear`` (PEFT's dispatch checks the type) whose forward returns a stored output."""

    def forward(self, x: Tensor) -> Tensor:  # noqa: D401
        return self.precomputed.clone()


class _OneLinear(nn.Module):
    def __init__(self, H_in: int, H_out: int, base: Tensor):
        super().__init__()
        self.target = _PrecomputedBase(H_in, H_out, bias=False, device="meta")
        self.target.weight = nn.Parameter(torch.empty(0, device=base.device, dtype=base.dtype), requires_grad=False)
        self.target.in_features, self.target.out_features = H_in, H_out
        self.target.precomputed = base

    def forward(self, x: Tensor) -> Tensor:
        return self.target(x)


def build(lora_a: Tensor, lora_b: Tensor, scaling: Tensor, ranks: Optional[Tensor], base: Tensor):
    """``(peft_model, names)``: a PeftModel with adapters ``a0..a{T-1}``, in eval mode, on the bank's device/dtype."""
    from peft import LoraConfig, get_peft_model

    T, R, H_in = lora_a.shape
    H_out = lora_b.shape[1]
    rank_of = ranks.tolist() if ranks is not None else [R] * T
    scale_of = scaling.tolist()
    module = _OneLinear(H_in, H_out, base)
    names = [f"a{t}" for t in range(T)]
    model = None
    for t, name in enumerate(names):
        cfg = LoraConfig(r=rank_of[t], lora_alpha=scale_of[t] * rank_of[t], target_modules=["target"],
                         lora_dropout=0.0, bias="none")
        if model is None:
            model = get_peft_model(module, cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    layer = model.base_model.model.target
    with torch.no_grad():
        for t, name in enumerate(names):
            r = rank_of[t]
            layer.lora_A[name].to(device=lora_a.device, dtype=lora_a.dtype)
            layer.lora_B[name].to(device=lora_a.device, dtype=lora_a.dtype)
            layer.lora_A[name].weight.copy_(lora_a[t, :r])
            layer.lora_B[name].weight.copy_(lora_b[t, :, :r])
            if abs(layer.scaling[name] - scale_of[t]) > 1e-6 * abs(scale_of[t]):
                raise RuntimeError(f"PEFT scaling {layer.scaling[name]} != bank scaling {scale_of[t]} for {name}")
    model.eval()
    return model, names


def adapter_names(adapter_index: Tensor, names: list[str]) -> list[str]:
    """Per-row names for PEFT (``__base__`` for -1 rows)."""
    return [names[t] if t >= 0 else "__base__" for t in adapter_index.tolist()]


def leaves(model, name: str) -> list[Tensor]:
    """The trainable weights of one adapter: lora_A, lora_B (for fwd+bwd rows with one adapter)."""
    layer = model.base_model.model.target
    return [layer.lora_A[name].weight, layer.lora_B[name].weight]
