"""Benchmark suites, one per ``--op``: each has ``specs(quick, device) -> list[dict]`` (cheap, no
tensors) and ``build(spec, device, dtype, seed) -> harness.Case`` (allocates the inputs).

Shapes: ``quick`` on CUDA is a handful of realistic rows per op (about two minutes in all on an
H100, compile and autotune included); ``quick`` without CUDA uses tiny shapes (seconds). The full
grids (prefix: B8 L2048 Hq32/Hkv8 D128 P64 causal, B32 L256 Hq16 D64 P128
bidirectional, decode B64 over contexts 128..4096 with P128, fwd and fwd+bwd, plus corners of
the B/L/P grid; LoRA: decode N 1..64 and prefill N 2048..8192, H 4096, 1/8/32/128 adapters,
uniform and mixed ranks 8..128; prompts: B 1..64, L 128..4096, H 4096, P 20..100; e2e: a small
Llama through MultiAdapterModel, LoRA-only and mixed-kind batches, and prefix generation's KV
cache). Without CUDA the full grid is a reduced one (the GPU grid would take hours on a CPU).
"""
from __future__ import annotations

import importlib

import torch

SUITES = ("prefix", "lora", "prompt", "e2e")


def get(name: str):
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; choose from {', '.join(SUITES)}")
    return importlib.import_module(f"{__name__}.{name}")


class Rand:
    """Seeded random tensors, drawn on the device itself (no host round trip for GB-sized inputs)."""

    def __init__(self, seed: int, device: torch.device, dtype: torch.dtype):
        self.g = torch.Generator(device=device).manual_seed(seed)
        self.device, self.dtype = device, dtype

    def __call__(self, *shape, scale: float = 1.0, dtype=None) -> torch.Tensor:
        t = torch.randn(*shape, generator=self.g, device=self.device, dtype=dtype or self.dtype)
        return t.mul_(scale) if scale != 1.0 else t

    def ints(self, high: int, *shape) -> torch.Tensor:
        return torch.randint(0, high, shape, generator=self.g, device=self.device)


def es(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def backend_of(*ops: str):
    """A callable naming the backend(s) that ran the last call of ``ops`` (``fwd/bwd`` when two)."""
    from ...ops._dispatch import last_backend

    return lambda: "/".join(str(last_backend(op)) for op in ops)


def gpu_memory_limit(device: torch.device) -> int:
    """Bytes a baseline may materialise before it is skipped (a quarter of the device, 2 GiB on CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 4
    return 2 << 30
