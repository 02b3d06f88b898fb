"""``python -m peft_kernels demo``: the ops, a mixed-adapter batch, and mixed-adapter training.

1. Every op on a small batch next to today's way of doing it (cat + SDPA, a per-adapter loop,
   embedding + cat): backend, largest difference, both timings (medians, same process) and, for
   prefix attention, the K/V bytes the baseline copies.
2. A small random Llama with five PEFT adapters of four kinds (two LoRA, prefix tuning, prompt
   tuning, P-tuning) saved by ``peft`` and loaded into one ``MultiAdapterModel``: one mixed batch,
   each row's logits against that row under its own PEFT model, and tokens/s against PEFT's
   route (one PEFT model per group of rows: PEFT cannot mix adapter kinds in a batch), and the
   KV-cache bytes of the prefix rows, measured from both caches.
3. Four adapters of four kinds trained together for a few steps (progress bar, losses).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch

from . import multi_lora, prefix_attention, soft_prompt_embed
from .attention import cat_sdpa, sequence_mask
from .cache_utils import cache_of, cache_stats
from .ops._dispatch import last_backend

MIXED_ROWS = ["lora_qv", "lora_all", "prefix", "prompt", "ptuning", None] * 2


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


def _lora_loop(x, lora_a, lora_b, index, scaling, ranks, base):
    """Today's mixed-adapter LoRA: one masked pass per adapter in the batch (PEFT's adapter_names loop)."""
    out = base.clone()
    for t in index.unique().tolist():
        if t >= 0:
            r, rows = int(ranks[t]), index == t
            out[rows] += (x[rows] @ lora_a[t, :r].T) @ lora_b[t, :, :r].T * float(scaling[t])
    return out


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
    seq_mask = sequence_mask(None, B, L, L, True, dev)
    base = lambda: cat_sdpa(q, k, v, pk, pv, index, None, seq_mask)  # noqa: E731
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
    base = lambda: _lora_loop(x, lora_a, lora_b, aidx, scaling, ranks, y_base)  # noqa: E731
    diff = (ours().float() - base().float()).abs().max().item()
    print(_row("multi_lora", last_backend("multi_lora"), diff, _median_ms(ours, dev), _median_ms(base, dev),
               "4 adapters, mixed ranks, one batch"))
    failures += diff > tol

    # Prompt tuning: 8 rows, 2 task prompts of 20 virtual tokens.
    ids = torch.randint(0, 1000, (8, 48), generator=g).to(dev)
    weight, prompts = rnd(1000, H), rnd(2, 20, H)
    pidx = torch.tensor([0, 1] * 4, device=dev)
    ours = lambda: soft_prompt_embed(ids, weight, prompts, prompt_index=pidx, validate=False)  # noqa: E731
    base = lambda: torch.cat([prompts[pidx], torch.nn.functional.embedding(ids, weight)], dim=1)  # noqa: E731
    diff = (ours().float() - base().float()).abs().max().item()
    print(_row("soft_prompt_embed", last_backend("soft_prompt_embed"), diff, _median_ms(ours, dev),
               _median_ms(base, dev), "one write per output row"))
    failures += diff > tol

    print("\nall ops agree with their baselines" if not failures else f"\n{failures} op check(s) FAILED")
    failures += _mixed_batch_section(dev, seed)
    failures += _training_section(dev)
    print("\ndemo finished: all checks passed" if not failures else f"\ndemo finished: {failures} check(s) FAILED")
    return 1 if failures else 0


def _demo_llama(device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                         pad_token_id=0, eos_token_id=None)
    model = LlamaForCausalLM(config).to(device).eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, None
    return model


def _peft_adapters(base, root):
    """Five randomised PEFT adapters saved under ``root``: {name: (directory, PEFT model)}."""
    import copy

    import peft

    configs = {
        "lora_qv": peft.LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                   init_lora_weights=False),
        "lora_all": peft.LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=16, target_modules="all-linear",
                                    use_rslora=True, init_lora_weights=False),
        "prefix": peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16),
        "prompt": peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16),
        "ptuning": peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=8, encoder_hidden_size=64),
    }
    out = {}
    for i, (name, config) in enumerate(configs.items()):
        torch.manual_seed(100 + i)
        model = peft.get_peft_model(copy.deepcopy(base), config)
        if name == "prefix":
            with torch.no_grad():
                for p in model.prompt_encoder.parameters():
                    p.normal_(0, 0.5)
        model.save_pretrained(root / name)
        out[name] = (root / name, model.eval())
    return out


def _mixed_batch_section(dev, seed: int) -> int:
    import copy
    import tempfile
    import warnings
    from pathlib import Path

    from .multi_adapter import MultiAdapterModel

    print("\n== one batch, five adapters of four kinds (tiny random Llama, 4 layers) ==")
    try:
        import peft  # noqa: F401
    except ImportError:
        print("peft is not installed (pip install peft): the comparison with PEFT is skipped")
        return 0
    # PEFT's own route warns about its deprecated transformers calls; the demo's output stays readable.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Position ids are not supported")
    base = _demo_llama(dev)
    g = torch.Generator().manual_seed(seed)
    B, L, new = len(MIXED_ROWS), 32, 16
    ids = torch.randint(3, 512, (B, L), generator=g).to(dev)
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        refs = _peft_adapters(base, Path(tmp))
        model = MultiAdapterModel(copy.deepcopy(base))
        for name, (path, _) in refs.items():
            model.load_adapter(path, name)
    groups = {name: [b for b, n in enumerate(MIXED_ROWS) if n == name] for name in dict.fromkeys(MIXED_ROWS)}
    with torch.no_grad():
        logits = model(ids, adapter_names=MIXED_ROWS).logits
        print(f"{'adapter':<10} {'kind':<14} {'rows':>4} {'max |logit diff| vs its own PEFT model':>40}")
        for name, rows in groups.items():
            ref = base if name is None else refs[name][1]
            want = ref(input_ids=ids[rows]).logits[:, -L:]
            diff = (logits[rows].float() - want.float()).abs().max().item()
            kind = "base model" if name is None else model.adapters[name]
            print(f"{str(name):<10} {kind:<14} {len(rows):>4} {diff:>40.2e}")
            failures += diff > 1e-3

        def peft_route(fn):
            for name, rows in groups.items():
                fn(base if name is None else refs[name][1], ids[rows])

        prefill_ours = _median_ms(lambda: model(ids, adapter_names=MIXED_ROWS), dev, repeats=5)
        prefill_peft = _median_ms(lambda: peft_route(lambda m, x: m(input_ids=x)), dev, repeats=5)
        gen = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
        decode_ours = _median_ms(lambda: model.generate(ids, adapter_names=MIXED_ROWS, **gen), dev, repeats=2)
        decode_peft = _median_ms(lambda: peft_route(lambda m, x: m.generate(input_ids=x, **gen)), dev, repeats=2)
    print(f"\n{'':<26} {'ours':>12} {'PEFT route':>12} {'speed-up':>9}")
    for label, toks, ours_ms, peft_ms in (("prefill tokens/s", B * L, prefill_ours, prefill_peft),
                                          (f"generate tokens/s ({new} new)", B * new, decode_ours, decode_peft)):
        print(f"{label:<26} {toks / ours_ms * 1e3:>12,.0f} {toks / peft_ms * 1e3:>12,.0f} {peft_ms / ours_ms:>8.2f}x")
    prefix_rows = groups["prefix"]
    with torch.no_grad():
        ours_kv = cache_stats(cache_of(model(ids[prefix_rows], adapter_names="prefix", use_cache=True)))
        peft_kv = cache_stats(cache_of(refs["prefix"][1](input_ids=ids[prefix_rows], use_cache=True)))
    print(f"KV cache after the prefill of the {len(prefix_rows)} prefix rows (measured): ours "
          f"{ours_kv['bytes']:,} bytes ({ours_kv['positions']} positions), PEFT {peft_kv['bytes']:,} bytes "
          f"({peft_kv['positions']} positions: its prefix sits in the cache, one copy per row)")
    print("(PEFT's route is timed with PEFT's own generate; with some transformers versions its prefix and prompt")
    print(" outputs are wrong - see the README - but it still does the work that is timed.)")
    return failures


def _training_section(dev) -> int:
    from .mixed_training import train

    print("\n== training four adapters of four kinds in one loop (each row trains its own adapter) ==")
    history = train(steps=30, device=str(dev), log=print)
    failures = 0
    print(f"{'adapter':<10} {'first loss':>10} {'last loss':>10}")
    for name, losses in history.items():
        last = sum(losses[-5:]) / 5
        print(f"{name:<10} {losses[0]:>10.3f} {last:>10.3f}")
        failures += not last < losses[0]
    return failures
