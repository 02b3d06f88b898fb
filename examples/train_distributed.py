"""Train four adapters of four kinds (LoRA, prefix tuning, prompt tuning, P-tuning) on any number of
ranks with DDP or FSDP2: the base model is frozen and replicated, only adapter gradients travel,
and rank 0 writes each adapter as a PEFT directory.

    torchrun --nproc_per_node 2 examples/train_distributed.py --mode ddp  [--steps 30] [--out adapters/]
    torchrun --nproc_per_node 2 examples/train_distributed.py --mode fsdp [--steps 30] [--out adapters/]

Every step draws one global batch (the same on every rank) and each rank trains on its contiguous
slice of the rows, so a rank may hold no row of some adapter; the loss is scaled so the averaged
gradient is that of the global batch's mean token loss.
"""
import argparse
import os

import torch
import torch.distributed as dist

from peft_kernels import MultiAdapterModel
from peft_kernels.distributed import CollectiveBytes, ddp, fsdp, save_adapters, trainable, world
from peft_kernels.mixed_training import TASKS, make_batch, tiny_llama


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["ddp", "fsdp"], default="ddp")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rows-per-task", type=int, default=2, help="rows of each task per rank and step")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--out", default=None, help="directory for the trained adapters (rank 0 writes)")
    args = parser.parse_args()

    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else "cpu"
    if device != "cpu":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device != "cpu" else "gloo")
    rank, size = world()

    model = MultiAdapterModel(tiny_llama(device))
    for i, (name, (config, _)) in enumerate(TASKS.items()):
        torch.manual_seed(10 + i)  # the same adapters on every rank (ddp/fsdp broadcast rank 0's anyway)
        model.add_adapter(name, config)
    model.train()
    wrapped = ddp(model) if args.mode == "ddp" else fsdp(model)
    params = trainable(wrapped)
    opt = torch.optim.AdamW(params, lr=args.lr)

    gen = torch.Generator().manual_seed(1)
    per_rank = args.rows_per_task * len(TASKS)
    for step in range(args.steps):
        ids, labels, names = make_batch(args.rows_per_task * size, 6, gen)  # the global batch, task by task
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        with CollectiveBytes() as moved:
            loss = wrapped(ids[rows].to(device), None, labels[rows].to(device), names[rows])
            opt.zero_grad()
            loss.backward()
        opt.step()
        global_loss = loss.detach() / size
        dist.all_reduce(global_loss)
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {global_loss.item():.3f}  "
                  f"communicated {moved.total / 1e3:.1f} kB/rank ({dict(moved.calls)})", flush=True)

    if rank == 0:
        adapter_bytes = sum(p.numel() * p.element_size() for p in params)  # DTensors count their global size
        base_bytes = sum(p.numel() * p.element_size() for p in model.model.parameters() if not p.requires_grad)
        print(f"{args.mode} on {size} ranks: adapters {adapter_bytes / 1e3:.1f} kB, frozen base {base_bytes / 1e3:.1f} kB "
              "(never communicated)")
    if args.out:
        saved = save_adapters(wrapped, args.out)
        if rank == 0:
            print(f"saved {', '.join(saved)} to {args.out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
