#!/usr/bin/env python
"""CPU multi-LoRA: the kernel, and what 8 LoRA adapters add to one step of a small Llama.

    python bench/cpu_lora_e2e.py [--threads N] [--min-run-time S] [--rounds K] [--json PATH] [--skip-kernel]

1. Kernel level: ``multi_lora`` at decode (N = 16 rows) and prefill (N = 16 x 64 = 1024 rows)
   shapes, H = 256, 8 adapters of ranks 4..16, fp32 and bf16: the native ``cpp`` kernel (called
   directly, and through the public op as a layer calls it: ``validate=False``) vs
   ``peft_kernels.reference.multi_lora`` and PEFT's mixed-batch loop (for each adapter: row mask,
   ``x[rows] @ A.T @ B.T * s``, index_put; ``peft_kernels.bench.baselines.lora_loop``).
2. End to end: a random-init ``transformers`` Llama (4 layers, hidden 256, intermediate 512,
   8 heads), PEFT LoRA on q/k/v/o with 8 adapters (ranks 4..16, ``init_lora_weights=False`` so B
   is nonzero), eval mode, 16 rows each using adapter ``row % 8``. One step at decode (16 x 1
   with a 32-token KV cache, cropped back after every step) and at 16 x 64 (no cache):
   base model alone; PEFT mixed batch (``model(ids, adapter_names=[...])``); ours: the same PEFT
   model after ``peft_kernels.patch`` (when it supports LoRA) and the peft_kernels LoRA method
   layer (``apply_lora`` + ``LoraLinear``, adapter banks stacked once at load); and, as a what-if
   that is not a code path of the package, that layer calling ``torch.ops.peft_kernels.multi_lora_fwd``
   itself (no Python op wrapper / custom_op / backend selection), which shows what the per-call
   Python overhead costs. Reported: the time the adapters add over the base model, and PEFT's
   added time / ours.

Timing: ``torch.utils.benchmark`` medians, all variants in this process, measured round-robin
(``--rounds`` rounds; the median over rounds is reported) so that load from other processes hits
every variant alike. Logits of every "ours" variant are checked against PEFT's first.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys

import torch
import torch.utils.benchmark as tb

import peft_kernels
from peft_kernels import reference
from peft_kernels.bench.baselines.lora_loop import lora_loop
from peft_kernels.bench.device import cpu_name

RANKS = [4, 6, 8, 10, 12, 14, 16, 16]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def measure(fns: dict, rounds: int, min_run_time: float) -> dict:
    """{name: median seconds over rounds of blocked_autorange medians}, measured round-robin."""
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            m = tb.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
            samples[name].append(m.median)
    return {name: statistics.median(v) for name, v in samples.items()}


# ---------------------------------------------------------------------------- kernel level


def kernel_inputs(N, H, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    T, R = len(RANKS), max(RANKS)
    ranks = torch.tensor(RANKS, dtype=torch.int32)
    a = torch.randn(T, R, H, generator=g) / H**0.5
    b = torch.randn(T, H, R, generator=g) / 4
    for t, r in enumerate(RANKS):  # zero padding, as stacked banks hold it
        a[t, r:], b[t, :, r:] = 0, 0
    x = torch.randn(N, H, generator=g)
    base = torch.randn(N, H, generator=g)
    index = (torch.arange(N) % T).to(torch.int32)
    scaling = torch.full((T,), 2.0)  # lora_alpha = 2r, as in the end-to-end models
    return x.to(dtype), a.to(dtype), b.to(dtype), index, scaling, ranks, base.to(dtype)


def kernel_bench(args) -> list[dict]:
    op = torch.ops.peft_kernels.multi_lora_fwd
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for label, N in (("decode 16", 16), ("prefill 16x64", 1024)):
            x, a, b, index, scaling, ranks, base = kernel_inputs(N, 256, dtype)
            want = reference.multi_lora(x, a, b, index, scaling, ranks, base)
            got = op(x, a, b, index, scaling, ranks, base)
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            torch.testing.assert_close(got, want, atol=tol, rtol=tol)

            def public():
                with peft_kernels.use_backend("cpp"):
                    return peft_kernels.multi_lora(x, a, b, index, scaling, ranks=ranks, base=base, validate=False)

            public()
            assert peft_kernels.last_backend("multi_lora") == "cpp"
            t = measure({
                "cpp kernel": lambda: op(x, a, b, index, scaling, ranks, base),
                "cpp via op": public,
                "reference": lambda: reference.multi_lora(x, a, b, index, scaling, ranks, base),
                "PEFT-style loop": lambda: lora_loop(x, a, b, index, scaling, ranks, base),
            }, args.rounds, args.min_run_time)
            row = dict(shape=label, N=N, H=256, T=len(RANKS), ranks=RANKS, dtype=str(dtype).replace("torch.", ""),
                       **{f"{k} (us)": v * 1e6 for k, v in t.items()},
                       speedup_vs_reference=t["reference"] / t["cpp kernel"],
                       speedup_vs_loop=t["PEFT-style loop"] / t["cpp kernel"])
            rows.append(row)
            us = {k: v * 1e6 for k, v in t.items()}
            print(f"  {row['dtype']:9s} {label:14s} cpp {us['cpp kernel']:8.1f} us   via op {us['cpp via op']:8.1f} us"
                  f"   reference {us['reference']:8.1f} us   loop {us['PEFT-style loop']:8.1f} us"
                  f"   -> x{row['speedup_vs_reference']:.1f} vs reference, x{row['speedup_vs_loop']:.1f} vs loop",
                  flush=True)
    return rows


# ---------------------------------------------------------------------------- end to end


def build_models():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)
    base = LlamaForCausalLM(config).eval()
    plain = copy.deepcopy(base)  # the base model alone, and the model our LoRA layer is applied to
    ours_layer = copy.deepcopy(base)
    names = [f"adapter{t}" for t in range(len(RANKS))]
    peft_model = None
    for name, r in zip(names, RANKS):
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=False,
                         task_type="CAUSAL_LM")
        if peft_model is None:
            peft_model = get_peft_model(base, cfg, adapter_name=name)
        else:
            peft_model.add_adapter(name, cfg)
    peft_model.eval()
    return plain, peft_model, ours_layer, names


def method_layer_model(model, peft_model, names):
    """peft_kernels' LoRA method layer on a copy of the base model, with PEFT's adapter weights."""
    from peft_kernels.methods.lora import apply_lora, lora_layers

    routing = apply_lora(model, TARGETS)
    peft_layers = {name: m for name, m in peft_model.base_model.model.named_modules() if hasattr(m, "lora_A")}
    for name in names:
        for module_name, layer in lora_layers(model).items():
            src = peft_layers[module_name]
            layer.add_slot(src.lora_A[name].weight.detach(), src.lora_B[name].weight.detach(), float(src.scaling[name]))
        routing.names.append(name)
    model.eval()
    return routing


def install_direct_forward(model):
    """Give every LoraLinear of ``model`` a forward that calls torch.ops.peft_kernels.multi_lora_fwd itself."""
    from types import MethodType

    from peft_kernels.methods.lora import LoraLinear

    op = torch.ops.peft_kernels.multi_lora_fwd
    per_length: dict = {}

    def forward(self, x):
        y = self.base(x)
        index = self.routing.index
        if index is None:
            return y
        if x.dim() == 3 and x.shape[1] != 1:  # one adapter per sequence: repeat per token, once per batch
            key = (id(index), x.shape[1])
            if key not in per_length:
                per_length.clear()
                per_length[key] = index.repeat_interleave(x.shape[1])
            index = per_length[key]
        out = op(x.reshape(-1, x.shape[-1]), self.lora_A, self.lora_B, index, self.scaling, self.ranks,
                 y.reshape(-1, y.shape[-1]))
        return out.view(y.shape)

    routing = None
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.forward = MethodType(forward, module)
            routing = module.routing
    return routing


def crop_to(cache, length: int) -> None:
    """Drop the KV cache's tokens past ``length`` (newer transformers take minus the count to drop)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        try:
            cache.crop(-extra)
        except ValueError:
            cache.crop(length)


def e2e_bench(args) -> list[dict]:
    from transformers import DynamicCache

    plain, peft_model, ours_layer, names = build_models()
    B, prefix = 16, 32
    per_row = [names[i % len(names)] for i in range(B)]
    g = torch.Generator().manual_seed(1)
    routing = method_layer_model(ours_layer, peft_model, names)
    index = torch.tensor([routing.names.index(n) for n in per_row], dtype=torch.int32)

    patched = None
    from peft_kernels.integrations import peft as pk_peft
    if "LORA" in getattr(pk_peft, "SUPPORTED", ()):
        patched = peft_kernels.patch(copy.deepcopy(peft_model))
    else:
        print("  note: peft_kernels.patch does not support LoRA here; only the method layer is measured")

    variants = {
        "base model": lambda ids, **kw: plain(ids, **kw),
        "PEFT mixed batch": lambda ids, **kw: peft_model(ids, adapter_names=per_row, **kw),
    }
    if patched is not None:
        variants["ours: patch(PEFT model)"] = lambda ids, **kw: patched(ids, adapter_names=per_row, **kw)

    def method_layer(ids, **kw):
        with routing.use(index):
            return ours_layer(ids, **kw)

    variants["ours: LoRA method layer"] = method_layer

    # What-if (not a code path of the package): the method layer calling the native op directly,
    # without the Python op wrapper, custom_op and backend selection; inference only.
    direct_model = copy.deepcopy(ours_layer)
    direct_routing = install_direct_forward(direct_model)

    def direct_layer(ids, **kw):
        with direct_routing.use(index):
            return direct_model(ids, **kw)

    variants["what-if: method layer -> native op directly"] = direct_layer

    rows = []
    with torch.inference_mode():
        # Same logits as PEFT's mixed batch (16 x 64, no cache).
        ids = torch.randint(0, 1024, (B, 64), generator=g)
        want = peft_model(ids, adapter_names=per_row).logits
        for name, fn in variants.items():
            if name.startswith(("ours", "what-if")):
                got = fn(ids).logits
                err = (got - want).abs().max().item()
                assert err < 1e-3, f"{name}: logits differ from PEFT's by {err}"
                last = peft_kernels.last_backend("multi_lora")
                print(f"  {name}: logits match PEFT's (max abs diff {err:.1e}); multi_lora backend {last!r}")
        base_delta = (plain(ids).logits - want).abs().max().item()
        print(f"  (the adapters move the logits by up to {base_delta:.2f}: B is nonzero)")

        # Decode: 16 x 1 with a 32-token KV cache, cropped back to 32 after every step.
        cache = DynamicCache()
        plain(torch.randint(0, 1024, (B, prefix), generator=g), past_key_values=cache, use_cache=True)
        step_ids = torch.randint(0, 1024, (B, 1), generator=g)

        def decode(fn):
            def step():
                fn(step_ids, past_key_values=cache, use_cache=True)
                crop_to(cache, prefix)
            return step

        shapes = {
            "decode 16 x 1 (KV cache 32)": {name: decode(fn) for name, fn in variants.items()},
            "prefill 16 x 64": {name: (lambda fn=fn: fn(ids, use_cache=False)) for name, fn in variants.items()},
        }
        for label, fns in shapes.items():
            t = measure(fns, args.rounds, args.min_run_time)
            base_t = t["base model"]
            peft_add = t["PEFT mixed batch"] - base_t
            print(f"  {label}: base model {base_t * 1e3:.2f} ms; PEFT mixed batch {t['PEFT mixed batch'] * 1e3:.2f} ms "
                  f"(adds {peft_add * 1e3:.2f} ms)")
            for name in t:
                if not name.startswith(("ours", "what-if")):
                    continue
                add = t[name] - base_t
                ratio = peft_add / add if add > 0 else float("inf")
                print(f"      {name}: {t[name] * 1e3:.2f} ms (adds {add * 1e3:.3f} ms) -> PEFT's added time / ours = "
                      f"x{ratio:.1f}")
                rows.append(dict(shape=label, variant=name, base_ms=base_t * 1e3, peft_ms=t["PEFT mixed batch"] * 1e3,
                                 ours_ms=t[name] * 1e3, peft_added_ms=peft_add * 1e3, ours_added_ms=add * 1e3,
                                 added_ratio=ratio))
            sys.stdout.flush()
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--min-run-time", type=float, default=0.3, help="seconds per blocked_autorange")
    parser.add_argument("--rounds", type=int, default=5, help="round-robin rounds per shape")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--skip-kernel", action="store_true", help="only the end-to-end part")
    parser.add_argument("--skip-e2e", action="store_true", help="only the kernel part")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ext = peft_kernels._ext.CPU
    if not ext.loaded or not hasattr(torch.ops.peft_kernels, "multi_lora_fwd"):
        sys.exit(f"the cpp multi_lora kernel is not built: {ext.error}")
    device = f"{cpu_name()}, {torch.get_num_threads()} threads"
    print(f"device: {device}; torch {torch.__version__}; _C build_info {ext.build_info}")
    out = dict(device=device, torch=torch.__version__, build_info=ext.build_info, rounds=args.rounds,
               min_run_time=args.min_run_time)
    if not args.skip_kernel:
        print("kernel level (median time per call):")
        out["kernel"] = kernel_bench(args)
    if not args.skip_e2e:
        print("end to end (median time per step):")
        out["e2e"] = e2e_bench(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
