"""``python -m peft_kernels demo``: every op on a small mixed batch, next to today's baseline.

For each op it prints the backend that ran, the largest difference from the baseline, both
timings (median of repeated runs, same process) and, for prefix attention, the K/V bytes the
baseline copies per batch row. It then takes one training step of four LoRA adapters in one
mixed batch and shows that each adapter received the gradient of its own rows only.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch

from . import multi_lora, prefix_attention, soft_prompt_embed
from .bench.baselines.lora_loop import lora_loop as _baseline_lora_loop
from .bench.baselines.prefix_sdpa import prefix_cat_sdpa as _baseline_prefix_attention
from .bench.baselines.prompt_cat import prompt_embed_cat as _baseline_prompt
from .ops._dispatch import last_backend


def _median_ms(fn: Callable[[], object], device: torch.device, repeats: int = 15) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _row(name: str, backend: str, diff: float, ours: float, base: float, note: str = "") -> str:
    return f"{name:<18} {backend:<10} {diff:>10.2e} {ours:>9.3f} {base:>9.3f} {base / ours:>7.2f}x  {note}"


def run_demo(device: Optional[str] = None, seed: int = 0) -> int:
    """Run the demo; returns the process exit code (non-zero if any op disagrees with its baseline)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    tol = 2e-2 if dtype == torch.float16 else 1e-4
    g = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dev, dtype)  # noqa: E731
    print(f"peft_kernels demo on {dev} ({dtype}); times are medians in ms, same process\n")
    print(f"{'op':<18} {'backend':<10} {'max |diff|':>10} {'ours':>9} {'baseline':>9} {'speedup':>8}  note")
    failures = 0

    # Prefix tuning: 4 rows, 3 task prefixes in one bank, one row without a prefix; GQA.
    B, Hq, Hkv, L, D, T, P = 4, 8, 2, 64, 32, 3, 16
    q, k, v = rnd(B, Hq, L, D), rnd(B, Hkv, L, D), rnd(B, Hkv, L, D)
    pk, pv = rnd(T, Hkv, P, D), rnd(T, Hkv, P, D)
    index = torch.tensor([0, 2, -1, 1], device=dev)
    ours = lambda: prefix_attention(q, k, v, pk, pv, prefix_index=index, validate=False)  # noqa: E731
    base = lambda: _baseline_prefix_attention(q, k, v, pk, pv, index)  # noqa: E731
    diff = (ours().float() - base().float()).abs().max().item()
    copied = 2 * B * Hkv * P * D * q.element_size()
    bank = 2 * T * Hkv * P * D * q.element_size()
    print(_row("prefix_attention", last_backend("prefix_attention"), diff, _median_ms(ours, dev),
               _median_ms(base, dev), f"prefix K/V read from a {bank} B bank; baseline copies {copied} B per layer"))
    failures += diff > tol

    # Multi-LoRA: 64 rows, 4 adapters of ranks 4/8/16/8 padded to 16, some rows without adapter.
    N, H = 64, 256
    ranks = torch.tensor([4, 8, 16, 8], device=dev)
    lora_a, lora_b = rnd(4, 16, H) * 0.1, rnd(4, H, 16) * 0.1
    for t, r in enumerate(ranks.tolist()):
        lora_a[t, r:] = 0
        lora_b[t, :, r:] = 0
    scaling = torch.tensor([2.0, 1.0, 0.5, 1.0], device=dev)
    x, y_base = rnd(N, H), rnd(N, H)
    aidx = torch.randint(-1, 4, (N,), generator=g).to(dev)
    ours = lambda: multi_lora(x, lora_a, lora_b, aidx, scaling, ranks=ranks, base=y_base, validate=False)  # noqa: E731
    base = lambda: _baseline_lora_loop(x, lora_a, lora_b, aidx, scaling, ranks, y_base)  # noqa: E731
    diff = (ours().float() - base().float()).abs().max().item()
    print(_row("multi_lora", last_backend("multi_lora"), diff, _median_ms(ours, dev), _median_ms(base, dev),
               "4 adapters, mixed ranks, one batch"))
    failures += diff > tol

    # Prompt tuning: 8 rows, 2 task prompts of 20 virtual tokens.
    ids = torch.randint(0, 1000, (8, 48), generator=g).to(dev)
    weight, prompts = rnd(1000, H), rnd(2, 20, H)
    pidx = torch.tensor([0, 1] * 4, device=dev)
    ours = lambda: soft_prompt_embed(ids, weight, prompts, prompt_index=pidx, validate=False)  # noqa: E731
    base = lambda: _baseline_prompt(ids, weight, prompts, pidx)  # noqa: E731
    diff = (ours().float() - base().float()).abs().max().item()
    print(_row("soft_prompt_embed", last_backend("soft_prompt_embed"), diff, _median_ms(ours, dev),
               _median_ms(base, dev), "one write per output row"))
    failures += diff > tol

    # One training step: four adapters in one batch, each gets the gradient of its own rows.
    lora_a.requires_grad_(True)
    lora_b.requires_grad_(True)
    multi_lora(x, lora_a, lora_b, aidx, scaling, ranks=ranks, base=y_base).float().square().mean().backward()
    print("\ntraining step, 4 LoRA adapters in one mixed batch:")
    for t in range(4):
        rows = int((aidx == t).sum())
        norm = lora_b.grad[t].float().norm().item()
        pad = lora_b.grad[t, :, int(ranks[t]):].abs().max().item() if int(ranks[t]) < 16 else 0.0
        print(f"  adapter {t} (rank {int(ranks[t]):>2}): {rows:>2} rows, |dB| = {norm:.4f}, grad on rank padding = {pad:g}")
        failures += (rows > 0) != (norm > 0) or pad != 0
    print("\nall ops agree with their baselines" if not failures else f"\n{failures} check(s) FAILED")
    return 1 if failures else 0
