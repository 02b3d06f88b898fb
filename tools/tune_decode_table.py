"""On a GPU: autotune every decode launch the committed config table covers and rewrite the table.

    python tools/tune_decode_table.py [--table PATH] [--dtypes fp16,bf16,fp32] [--head-dims 64,128] [--copy-to DIR]

Runs the decode shapes of peft_kernels.triton.prefix_attention / multi_lora (DECODE_SHAPES) with
``PEFT_KERNELS_AUTOTUNE=1``, takes each launch's autotuned config and writes it into the table
(``peft_kernels/triton/configs/decode.json`` by default) for this GPU's arch, marked
"autotuned on <GPU>"; entries of other archs are kept. Exits 2 without a CUDA device.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

os.environ["PEFT_KERNELS_AUTOTUNE"] = "1"  # before the kernel modules load

import torch  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", type=Path, default=None)
    ap.add_argument("--dtypes", default="fp16,bf16,fp32")
    ap.add_argument("--head-dims", default=None, help="attention head dims to tune (default: all the table covers)")
    ap.add_argument("--copy-to", type=Path, default=None, help="also copy the written table into this folder")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_decode_table: no CUDA device: nothing tuned, the committed table is unchanged")
        return 2
    import triton

    from peft_kernels.triton import _tuning
    from peft_kernels.triton import multi_lora as tm
    from peft_kernels.triton import prefix_attention as tp

    table = args.table or _tuning.TABLE_PATH
    dev = torch.device("cuda")
    arch = _tuning.device_arch(dev)
    gpu = torch.cuda.get_device_name(dev)
    seen: list[tuple] = []

    def recording(real):
        def wrapped(tuner, grid, a, kw, *, kernel, dtype, bucket=None):
            out = real(tuner, grid, a, kw, kernel=kernel, dtype=dtype, bucket=bucket)
            if bucket is not None:
                seen.append((kernel, str(dtype).removeprefix("torch."), bucket, tuner.best_config))
            return out
        return wrapped

    tp.launch, tm.launch = recording(tp.launch), recording(tm.launch)
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        head_dims = [int(d) for d in args.head_dims.split(",")] if args.head_dims else tp.DECODE_HEAD_DIMS
        for D in head_dims:
            for shape in tp.DECODE_SHAPES:
                B, Hq, Hkv, Lq, Lk, T, P = shape["B"], shape["Hq"], shape["Hkv"], shape["Lq"], shape["Lk"], 3, 8
                q = torch.randn(B, Hq, Lq, D, device=dev, dtype=dtype)
                k = torch.randn(B, Hkv, Lk, D, device=dev, dtype=dtype)
                pk = torch.randn(T, Hkv, P, D, device=dev, dtype=dtype)
                index = torch.arange(B, device=dev) % T
                tp.prefix_attention_fwd(q, k, k, pk, pk, index, None, None, True, None)
        for shape in tm.DECODE_SHAPES:
            N, T, R, H = shape["N"], shape["T"], shape["R"], shape["H"]
            x = torch.randn(N, H, device=dev, dtype=dtype)
            a = torch.randn(T, R, H, device=dev, dtype=dtype)
            b = torch.randn(T, H, R, device=dev, dtype=dtype)
            tm.multi_lora(x, a, b, torch.arange(N, device=dev) % T, torch.ones(T, device=dev), None, x)
    torch.cuda.synchronize()

    data = json.loads(table.read_text()) if table.exists() else {"about": "", "entries": []}
    entries = {(e["kernel"], int(e["arch"]), e["dtype"], e["bucket"]): e for e in data["entries"]}
    for kernel, dtype, bucket, cfg in seen:
        entries[(kernel, arch, dtype, bucket)] = {
            "kernel": kernel, "arch": arch, "dtype": dtype, "bucket": bucket,
            "config": {"kwargs": dict(cfg.kwargs), "num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
            "source": f"autotuned on {gpu} (triton {triton.__version__}, torch {torch.__version__})",
        }
    data["entries"] = [entries[k] for k in sorted(entries)]
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text(json.dumps(data, indent=1) + "\n")
    if args.copy_to is not None:
        args.copy_to.mkdir(parents=True, exist_ok=True)
        shutil.copy(table, args.copy_to / table.name)
    print(f"tune_decode_table: {len(seen)} decode launches tuned on {gpu} (sm_{arch}) -> {table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
