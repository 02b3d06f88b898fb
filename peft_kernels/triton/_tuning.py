"""Config choice for the autotuned Triton kernels: arch limits, the committed decode table, autotuning.

Every autotuned launch goes through :func:`launch`. What it runs depends on ``PEFT_KERNELS_AUTOTUNE``:

* unset (default): a launch that names a table entry (the decode launches: a captured CUDA-graph
  step must never autotune) runs the committed config for (kernel, GPU arch, dtype, shape bucket)
  from ``configs/decode.json``, or the first config the pruner keeps when the table has no entry;
  every other launch autotunes over the pruned configs.
* ``1``: every launch autotunes (on a GPU, ``tools/tune_decode_table.py`` then writes the table).
* ``0``: nothing autotunes; each launch runs the first config the pruner keeps.

Pruners see the target arch, so the compile check (``tools/compile_triton.py``) can ask what a
launch would keep on sm_80 or sm_90 from a machine without a GPU.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import triton
from torch import Tensor

from ._common import INTERPRET

__all__ = [
    "SMEM_PER_BLOCK", "smem_limit", "device_arch", "autotune_mode", "table_entry", "pick_config", "tuned",
    "launch", "TABLE_PATH", "SPILLS_PATH", "config_text", "drop_spilling",
]

# Shared memory one block may opt into, in bytes (CUDA programming guide, compute capabilities table).
SMEM_PER_BLOCK = {
    80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024,
    100: 227 * 1024, 103: 227 * 1024, 120: 99 * 1024, 121: 99 * 1024,
}
_SMEM_UNKNOWN = 99 * 1024  # the smallest of the table: safe on an arch it does not list

TABLE_PATH = Path(__file__).with_name("configs") / "decode.json"
SPILLS_PATH = Path(__file__).with_name("configs") / "spills.json"

Prune = Callable[..., list]  # (configs, named launch arguments, arch, screen_spills=True) -> kept configs


def config_text(cfg: triton.Config) -> str:
    """A config as ``M64,N128 w4s3`` (block sizes without ``BLOCK_``, warps, stages)."""
    blocks = ",".join(f"{k.removeprefix('BLOCK_')}{v}" for k, v in cfg.kwargs.items())
    return f"{blocks + ' ' if blocks else ''}w{cfg.num_warps}s{cfg.num_stages}"


@functools.lru_cache(maxsize=4)
def _load_spills(path: str) -> frozenset:
    with open(path) as f:
        data = json.load(f)
    return frozenset((e["kernel"], e["config"], _dtype_class(e["dtype"]), str(e["D"]), int(e["arch"]))
                     for entries in data["spilling"].values() for e in entries)


def _dtype_class(name: str) -> str:
    """fp16 and bf16 compile to the same tiles (16-bit MMA): their spills are shared."""
    return "16-bit" if name in ("float16", "bfloat16") else name


def drop_spilling(kernel: str, configs: Sequence[triton.Config], dtype: torch.dtype, d, arch: int,
                  path: Path = SPILLS_PATH) -> list:
    """``configs`` without those ptxas made spill for (kernel, dtype, head dim ``d`` or "-", arch),
    unless that would leave none.

    Semantics: the spill list is the compile check's (tools/compile_triton.py --write-spills), for
    every Triton version it ran with; fp16 and bf16 share entries; shapes it did not compile keep
    every config.
    """
    if not path.exists():
        return list(configs)
    listed = _load_spills(str(path))
    name = _dtype_class(str(dtype).removeprefix("torch."))
    clean = [c for c in configs if (kernel, config_text(c), name, str(d), int(arch)) not in listed]
    return clean or list(configs)


def smem_limit(arch: int) -> int:
    """Bytes of shared memory one block may use on ``arch`` (e.g. 90 for sm_90)."""
    return SMEM_PER_BLOCK.get(int(arch), _SMEM_UNKNOWN)


@functools.lru_cache(maxsize=None)
def _cuda_arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return major * 10 + minor


def device_arch(device: torch.device) -> int:
    """``major * 10 + minor`` of a CUDA device; 90 (the GPU machines' H100/H200) for any other device."""
    if device.type != "cuda":
        return 90
    return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())


def autotune_mode() -> str:
    """``"on"``, ``"off"`` or ``"table"`` from ``PEFT_KERNELS_AUTOTUNE`` (``1``, ``0``, unset)."""
    value = os.environ.get("PEFT_KERNELS_AUTOTUNE", "").strip()
    return {"1": "on", "0": "off"}.get(value, "table")


@functools.lru_cache(maxsize=4)
def _load_table(path: str) -> dict:
    with open(path) as f:
        data = json.load(f)
    return {(e["kernel"], int(e["arch"]), e["dtype"], e["bucket"]): e["config"] for e in data["entries"]}


def table_entry(kernel: str, arch: int, dtype: torch.dtype, bucket: str, path: Path = TABLE_PATH) -> Optional[dict]:
    """The committed config of (kernel, arch, dtype, bucket), or None.

    Shapes: a config is ``{"kwargs": {...}, "num_warps": w, "num_stages": s}``.
    Semantics: dtype is written as ``torch.<name>`` without the prefix (``bfloat16``).
    """
    if not path.exists():
        return None
    return _load_table(str(path)).get((kernel, int(arch), str(dtype).removeprefix("torch."), bucket))


def _as_config(entry: dict) -> triton.Config:
    return triton.Config(dict(entry["kwargs"]), num_warps=int(entry["num_warps"]), num_stages=int(entry["num_stages"]))


def pick_config(kernel: str, configs: Sequence[triton.Config], prune: Prune, named: dict, arch: int,
                dtype: torch.dtype, bucket: Optional[str]) -> tuple[triton.Config, str]:
    """(config, where it came from) for a launch that does not autotune.

    Semantics: the table's entry for (kernel, arch, dtype, bucket) when there is one and the pruner
    keeps it (``"table"``), else the first config the pruner keeps for this arch (``"default"``).
    """
    kept = prune(configs, named, arch)
    if bucket is not None:
        entry = table_entry(kernel, arch, dtype, bucket)
        if entry is not None:
            cfg = _as_config(entry)
            if any(c.kwargs == cfg.kwargs and c.num_warps == cfg.num_warps and c.num_stages == cfg.num_stages
                   for c in kept):
                return cfg, "table"
    return kept[0], "default"


def _first_tensor(named: dict) -> Optional[Tensor]:
    return next((v for v in named.values() if isinstance(v, Tensor)), None)


def tuned(fn, configs: Sequence[triton.Config], key: list[str], prune: Prune):
    """``triton.autotune`` of ``fn`` whose early pruning calls ``prune(configs, named_args, arch)``
    with the arch of the launch's first tensor; the pruner is kept on the tuner as ``.arch_prune``."""

    def early_prune(cfgs, named_args, **kwargs):
        first = _first_tensor(named_args)
        arch = device_arch(first.device) if first is not None else 90
        return prune(cfgs, {**named_args, **kwargs}, arch)

    tuner = triton.autotune(configs=list(configs), key=key, prune_configs_by={"early_config_prune": early_prune})(fn)
    tuner.arch_prune = prune
    return tuner


def launch(tuner, grid: Callable[[dict], tuple], args: tuple, kwargs: dict, *, kernel: str, dtype: torch.dtype,
           bucket: Optional[str] = None):
    """Launch an autotuned kernel as ``PEFT_KERNELS_AUTOTUNE`` says (see the module docstring).

    Shapes: ``args`` are the kernel's leading positional arguments, ``kwargs`` the rest (constexprs).
    Semantics: ``dtype`` and ``bucket`` name the launch's row in the decode table (bucket None: not a
    decode launch); the arch is that of the first tensor argument's device.
    """
    mode = autotune_mode()
    if INTERPRET or mode == "on" or (mode == "table" and bucket is None):
        return tuner[grid](*args, **kwargs)
    named = dict(zip(tuner.fn.arg_names, args))
    named.update(kwargs)
    first = _first_tensor(named)
    arch = device_arch(first.device)
    cfg, _ = pick_config(kernel, tuner.configs, tuner.arch_prune, named, arch, dtype,
                         bucket if mode == "table" else None)
    meta = {**kwargs, **cfg.kwargs}
    return tuner.fn[grid(meta)](*args, **meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
