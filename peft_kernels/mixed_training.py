"""Train four adapters of four kinds in one loop, every batch mixing them (demo and example).

A tiny random Llama learns four synthetic tasks, one per adapter: after any random context,
answer with the adapter's own token (5 for LoRA, 9 for prefix tuning, 13 for prompt tuning, 17
for P-tuning). Each batch holds rows of all four tasks; one backward pass trains all four
adapters, each on its own rows only, so each must learn its own answer.

    python examples/train_mixed_adapters.py [--steps 60] [--device cpu]
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from .methods.lora import lora_layers
from .multi_adapter import MultiAdapterModel

VOCAB = 64
TASKS = {  # adapter name: (PEFT-style config, the token its rows must answer with)
    "lora": ({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": "all-linear"}, 5),
    "prefix": ({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 8, "prefix_projection": True,
                "encoder_hidden_size": 64}, 9),
    "prompt": ({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 8}, 13),
    "ptuning": ({"peft_type": "P_TUNING", "num_virtual_tokens": 8, "encoder_hidden_size": 64}, 17),
}


def tiny_llama(device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).to(device)


def make_batch(rows_per_task: int, length: int, generator: torch.Generator):
    """Random contexts followed by each row's task answer; labels only on the answers."""
    ids, labels, names = [], [], []
    for name, (_, token) in TASKS.items():
        prompt = torch.randint(20, VOCAB, (rows_per_task, length), generator=generator)
        answer = torch.full((rows_per_task, 2), token)
        ids.append(torch.cat([prompt, answer], dim=1))
        labels.append(torch.cat([torch.full_like(prompt, -100), answer], dim=1))
        names += [name] * rows_per_task
    return torch.cat(ids), torch.cat(labels), names


def train(steps: int = 60, device: str = "cpu", lr: float = 1e-2, log=print) -> dict[str, list[float]]:
    """Train the four adapters together; returns each task's loss per step.

    Semantics: one AdamW step per batch of 4 rows per task; the per-task loss reported is the
    mean token loss of that task's rows in that step (before the update).
    """
    model = MultiAdapterModel(tiny_llama(device))
    for p in model.model.parameters():
        p.requires_grad_(False)
    for name, (config, _) in TASKS.items():
        model.add_adapter(name, config)
    for layer in lora_layers(model.model).values():
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    log(f"trainable parameters: {sum(p.numel() for p in params):,} of {sum(p.numel() for p in model.parameters()):,}")
    opt = torch.optim.AdamW(params, lr=lr)
    gen = torch.Generator().manual_seed(1)
    history = {name: [] for name in TASKS}
    model.train()
    bar = tqdm(range(steps), desc="training 4 adapters", unit="step")
    for _ in bar:
        ids, labels, names = make_batch(4, 6, gen)
        ids, labels = ids.to(device), labels.to(device)
        out = model(ids, labels=labels, adapter_names=names)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        with torch.no_grad():  # per-task loss of this step, for the report
            logp = out.logits[:, :-1].float().log_softmax(-1)
            target = labels[:, 1:]
            nll = -logp.gather(-1, target.clamp(min=0)[..., None])[..., 0] * (target >= 0)
            per_row = nll.sum(1) / (target >= 0).sum(1)
            for name in TASKS:
                rows = [i for i, n in enumerate(names) if n == name]
                history[name].append(per_row[rows].mean().item())
        bar.set_postfix(loss=f"{out.loss.item():.3f}")
    return history
