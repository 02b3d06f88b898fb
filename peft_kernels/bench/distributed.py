"""The communication row: bytes per training step and rank, adapter-only DDP / FSDP2 vs full-model DDP.

    python -m peft_kernels.bench.distributed [--nproc 2] [--out DIR]

Launches ``torchrun --nproc_per_node N`` (gloo on CPU, NCCL with CUDA) on this module in worker
mode. Each rank runs one step of a small Llama three ways: a :class:`~peft_kernels.MultiAdapterModel`
(LoRA + prefix + prompt adapters, frozen base) under :func:`peft_kernels.distributed.ddp` and under
:func:`~peft_kernels.distributed.fsdp`, and the base model fully fine-tuned under plain DDP. The
bytes are counted, not modelled: DDP's by a comm hook on every gradient bucket, and every
collective by :class:`~peft_kernels.distributed.CollectiveBytes`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

SHAPE = dict(hidden=256, layers=4, heads=8, kv_heads=4, vocab=1024, rows_per_rank=4, length=32)
ADAPTERS = {
    "lora": {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    "prefix": {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 16},
    "prompt": {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 16},
}


def _base(device):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    s = SHAPE
    config = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=2 * s["hidden"],
                         num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                         num_key_value_heads=s["kv_heads"], max_position_embeddings=128)
    return LlamaForCausalLM(config).to(device)


def _worker(out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    from ..distributed import CollectiveBytes, counting_ddp_hook, ddp, fsdp, world
    from ..multi_adapter import MultiAdapterModel

    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, size = world()
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, SHAPE["vocab"], (SHAPE["rows_per_rank"], SHAPE["length"]), generator=g).to(device)
    names = [list(ADAPTERS)[i % len(ADAPTERS)] for i in range(SHAPE["rows_per_rank"])]
    rows = {}

    def adapters_model():
        model = MultiAdapterModel(_base(device))
        for i, (name, config) in enumerate(ADAPTERS.items()):
            torch.manual_seed(i)
            model.add_adapter(name, config)
        return model.train()

    for mode in ("ddp", "fsdp"):
        model = adapters_model()
        trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        wrapped = ddp(model) if mode == "ddp" else fsdp(model)
        hook = Counter()
        if mode == "ddp":
            wrapped.register_comm_hook(None, counting_ddp_hook(hook))
        with CollectiveBytes() as moved:
            wrapped(ids, None, ids, names).backward()
        rows[f"adapters_{mode}"] = dict(bytes=moved.total, by_op=dict(moved.bytes), hook_bytes=hook["allreduce"],
                                        trainable_bytes=trainable)

    full = _base(device).train()
    params = sum(p.numel() * p.element_size() for p in full.parameters())
    wrapped = nn.parallel.DistributedDataParallel(full, broadcast_buffers=False)
    hook = Counter()
    wrapped.register_comm_hook(None, counting_ddp_hook(hook))
    with CollectiveBytes() as moved:
        wrapped(input_ids=ids, labels=ids).loss.backward()
    rows["full_model_ddp"] = dict(bytes=moved.total, by_op=dict(moved.bytes), hook_bytes=hook["allreduce"],
                                  trainable_bytes=params)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(dict(rows, world_size=size, device=str(device)), f)
    dist.destroy_process_group()


def run(nproc: int = 2, out: str = "bench/results/distributed") -> dict:
    """Launch the workers; returns the row (rank 0's counts; every rank's are checked equal)."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "peft_kernels.bench.distributed", "--worker", str(out_dir)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-4000:]}")
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(nproc)]
    row = dict(suite="distributed", op="comm_bytes_per_step_per_rank", shape=dict(SHAPE, world_size=nproc),
               adapters=ADAPTERS, device=ranks[0]["device"], ours=ranks[0]["adapters_ddp"],
               ours_fsdp=ranks[0]["adapters_fsdp"], baseline=ranks[0]["full_model_ddp"],
               same_on_every_rank=all(r == ranks[0] for r in ranks[1:]))
    row["reduction"] = row["baseline"]["bytes"] / max(row["ours"]["bytes"], 1)
    (out_dir / "comm_bytes.json").write_text(json.dumps(row, indent=1))
    (out_dir / "comm_bytes.md").write_text(markdown(row))
    return row


def markdown(row: dict) -> str:
    s = row["shape"]
    head = (f"Llama h{s['hidden']} x{s['layers']} layers, {s['world_size']} ranks x {s['rows_per_rank']} rows x "
            f"L{s['length']}, {row['device']}")
    lines = [f"### Communication per training step and rank ({head})", "",
             "| run | bytes moved / step / rank | of which gradient buckets (comm hook) | trainable bytes |",
             "|---|---:|---:|---:|"]
    for name, key in (("adapters, DDP (ours)", "ours"), ("adapters, FSDP2 (ours)", "ours_fsdp"),
                      ("full model, DDP", "baseline")):
        r = row[key]
        hook = f"{r['hook_bytes']:,}" if r["hook_bytes"] else "n/a (all-gather + reduce-scatter)"
        lines.append(f"| {name} | {r['bytes']:,} | {hook} | {r['trainable_bytes']:,} |")
    lines += ["", f"Full-model DDP moves {row['reduction']:.0f}x the bytes of adapter-only DDP."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--out", default="bench/results/distributed")
    p.add_argument("--worker", metavar="DIR", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args.worker)
        return 0
    row = run(args.nproc, args.out)
    print(markdown(row))
    return 0 if row["same_on_every_rank"] else 1


if __name__ == "__main__":
    sys.exit(main())
