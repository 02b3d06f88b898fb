"""End to end: a small random Llama serving a batch whose sequences use different LoRA adapters.

``LlamaConfig`` with 4 layers, hidden 256 (4 heads, 2 KV heads), random init; T = 4 adapters of
ranks 8/16/32/64 on q/k/v/o_proj, sequence b uses adapter b % 4. One forward (logits) per call,
in inference mode:

- ours: the same model with each LoRA target swapped for a bench-local module calling
  ``multi_lora(x, banks..., base=base_layer(x))``. This swap exists only here, for the bench:
  ``MultiAdapterModel`` (issue 8) is the supported way and is not used.
- peft: the PEFT model, ``model(input_ids, adapter_names=[...])`` (its mixed-batch loop).
- base_model: the model without adapters: the floor any LoRA serving path is measured against
  (not compared numerically: it computes something else).

Rows compare logits with a looser tolerance than single ops (4 layers of 16-bit rounding).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .. import costs
from ..harness import Case, Impl
from . import backend_of

RANKS = (8, 16, 32, 64)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def specs(quick: bool, device: torch.device) -> list[dict]:
    gpu = device.type == "cuda"
    if quick:
        return [dict(mode="fwd", B=8, L=256)] if gpu else [dict(mode="fwd", B=4, L=16)]
    if gpu:
        return [dict(mode="fwd", B=B, L=L) for B in (1, 8, 32) for L in (128, 512)]
    return [dict(mode="fwd", B=B, L=L) for B in (2, 4) for L in (16, 64)]


def label(s: dict) -> str:
    return f"llama 4x256 B{s['B']} L{s['L']} T{len(RANKS)} r8-64"


class _Batch:
    """The adapter index of the batch being served (set before each forward)."""

    index: torch.Tensor


class _SwappedLoRA(nn.Module):
    """A LoRA target computed by ``multi_lora`` from stacked banks (bench-local; see module docstring)."""

    def __init__(self, base: nn.Linear, lora_a, lora_b, scaling, ranks, batch: _Batch):
        super().__init__()
        self.base = base
        self.register_buffer("lora_a", lora_a)
        self.register_buffer("lora_b", lora_b)
        self.register_buffer("scaling", scaling)
        self.register_buffer("ranks", ranks)
        self.batch = batch

    def forward(self, x):
        from ...ops import multi_lora

        return multi_lora(x, self.lora_a, self.lora_b, self.batch.index, self.scaling, ranks=self.ranks,
                          base=self.base(x), validate=False)


def build(s: dict, device: torch.device, dtype: torch.dtype, seed: int) -> Case:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    B, L = s["B"], s["L"]
    T = len(RANKS)
    cfg = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max(2048, L))
    torch.manual_seed(seed)
    base = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    alone, swapped = copy.deepcopy(base), copy.deepcopy(base)
    names = [f"a{t}" for t in range(T)]
    peft_model = None
    for name, r in zip(names, RANKS):
        lcfg = LoraConfig(r=r, lora_alpha=16, target_modules=list(TARGETS), lora_dropout=0.0,
                          init_lora_weights=False)  # random A and B: the adapters change the logits
        if peft_model is None:
            peft_model = get_peft_model(base, lcfg, adapter_name=name)
        else:
            peft_model.add_adapter(name, lcfg)
    peft_model = peft_model.to(device=device, dtype=dtype).eval()

    batch = _Batch()
    R = max(RANKS)
    lora_layers = {n: m for n, m in peft_model.base_model.model.named_modules() if hasattr(m, "lora_A") and m.lora_A}
    for path, layer in lora_layers.items():
        H_in, H_out = layer.in_features, layer.out_features
        a = torch.zeros(T, R, H_in, device=device, dtype=dtype)
        b = torch.zeros(T, H_out, R, device=device, dtype=dtype)
        for t, name in enumerate(names):
            r = RANKS[t]
            a[t, :r] = layer.lora_A[name].weight.detach()
            b[t, :, :r] = layer.lora_B[name].weight.detach()
        scaling = torch.tensor([layer.scaling[n] for n in names], device=device, dtype=torch.float32)
        parent_path, _, attr = path.rpartition(".")
        parent = swapped.get_submodule(parent_path)
        setattr(parent, attr, _SwappedLoRA(getattr(parent, attr), a, b, scaling,
                                           torch.tensor(RANKS, device=device), batch))

    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (B, L), generator=g).to(device)
    batch.index = torch.arange(B, device=device) % T
    row_names = [names[t] for t in batch.index.tolist()]

    ours = Impl("ours", lambda: swapped(input_ids=ids).logits, no_grad=True, backend=backend_of("multi_lora"),
                note="bench-local swap of the LoRA targets onto multi_lora (not MultiAdapterModel, issue 8)")
    peft = Impl("peft", lambda: peft_model(input_ids=ids, adapter_names=row_names).logits, no_grad=True,
                tol=5e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-3, note="PEFT adapter_names= mixed batch")
    floor = Impl("base_model", lambda: alone(input_ids=ids).logits, no_grad=True, check=False,
                 note="the model without adapters (a floor, not a numerical check)")
    return Case("e2e", "llama_lora_forward", s["mode"], dict(s, T=T, ranks=list(RANKS), layers=4, hidden=256),
                label(s), dtype, costs.NONE, ours, [peft, floor],
                notes=[f"{len(lora_layers)} LoRA targets ({', '.join(TARGETS)}) x 4 layers; one forward, logits"])
