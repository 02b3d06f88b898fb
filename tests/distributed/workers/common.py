"""What the distributed workers share: the tiny Llama, its adapters, the batches, result files."""
from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

torch.set_num_threads(1)

ADAPTERS = {  # name: PEFT-style config (init_lora_weights=False: B != 0, so A gets a gradient at step 1)
    "lora_a": {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": False},
    "lora_b": {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj", "down_proj"],
               "init_lora_weights": False},
    "prefix": {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3, "prefix_projection": True,
               "encoder_hidden_size": 16},
    "prompt": {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3},
    "ptune": {"peft_type": "P_TUNING", "num_virtual_tokens": 2, "encoder_hidden_size": 16},
    "idle": {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["o_proj"], "init_lora_weights": False},
}

# The union batch: 8 rows; rank r of 2 gets rows 4r..4r+3. Rank 0 has no lora_b / ptune row, rank 1
# no prompt row, and no rank uses "idle". Right padding differs per row, so ranks hold different
# numbers of target tokens.
NAMES = ["lora_a", "prefix", "prompt", None, "lora_b", "prefix", "ptune", "lora_a"]
LENGTHS = [7, 5, 6, 7, 4, 7, 6, 3]
L = 7


def save_tiny_llama(path: str) -> None:
    """A random 2-layer Llama (hidden 64, 4 heads, 2 KV heads, vocab 128) saved for from_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(path)


def load_base(path: str, tp: bool = False):
    from transformers import AutoModelForCausalLM

    kwargs = {"tp_plan": "auto"} if tp else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()


def multi_adapter_model(path: str, names=ADAPTERS, tp: bool = False):
    """A MultiAdapterModel over the saved base with ``names`` created from fixed seeds (identical on every rank)."""
    from peft_kernels import MultiAdapterModel

    model = MultiAdapterModel(load_base(path, tp))
    for i, name in enumerate(names):
        torch.manual_seed(100 + i)
        model.add_adapter(name, ADAPTERS[name])
    return model


def union_batch():
    """input_ids, attention_mask, labels [8, L] and the rows' adapter names."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 128, (len(NAMES), L), generator=g)
    mask = (torch.arange(L)[None] < torch.tensor(LENGTHS)[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels, list(NAMES)


def rank_rows(rank: int, world: int):
    per = len(NAMES) // world
    return slice(rank * per, (rank + 1) * per)


def init() -> tuple[int, int]:
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def write_result(out_dir: str, rank: int, result: dict) -> None:
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f, indent=1)


def max_diff(a, b) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def main_guard(fn) -> None:
    """Run ``fn(*argv)`` and tear the process group down (also after a failure)."""
    try:
        fn(*sys.argv[1:])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
