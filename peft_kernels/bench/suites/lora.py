"""multi_lora vs the PEFT-style loop, PEFT itself, a torch gather+bmm and a padded-rank BGMV kernel.

Banks: T adapters, uniform rank 16 or mixed ranks cycling 8, 16, 32, 64, 128 (zero-padded to the
max); ``scaling = 16 / r``; ``base`` (the frozen layer's output) is given, so no base GEMM is
timed anywhere. Decode rows use adapter n % T (round robin), prefill rows contiguous segments
of N / T rows per adapter (one adapter per sequence). Training rows (fwd+bwd) take grads w.r.t.
x, lora_a and lora_b.
"""
from __future__ import annotations

import math

import torch

from .. import costs
from ..baselines import lora_bgmv, lora_gather_bmm, lora_loop, lora_peft
from ..harness import Case, Impl
from . import Rand, backend_of, es, gpu_memory_limit

MIXED = (8, 16, 32, 64, 128)


def specs(quick: bool, device: torch.device) -> list[dict]:
    gpu = device.type == "cuda"
    if quick and gpu:
        H = dict(H=4096)
        return [
            dict(mode="fwd", phase="decode", N=16, T=8, ranks="mixed", **H),
            dict(mode="fwd", phase="decode", N=64, T=32, ranks="uniform", **H),
            dict(mode="fwd", phase="prefill", N=4096, T=8, ranks="mixed", **H),
            dict(mode="fwd+bwd", phase="prefill", N=4096, T=1, ranks="uniform", **H),
            dict(mode="fwd+bwd", phase="prefill", N=4096, T=8, ranks="mixed", **H),
        ]
    if quick:
        return [
            dict(mode="fwd", phase="decode", N=4, T=4, ranks="mixed", H=128, mixed=(4, 8, 16)),
            dict(mode="fwd", phase="prefill", N=64, T=4, ranks="mixed", H=128, mixed=(4, 8, 16)),
            dict(mode="fwd+bwd", phase="prefill", N=64, T=1, ranks="uniform", H=128, uniform=8),
            dict(mode="fwd+bwd", phase="prefill", N=64, T=4, ranks="mixed", H=128, mixed=(4, 8, 16)),
        ]
    if gpu:
        H, decode_N, prefill_N, Ts = 4096, (1, 16, 64), (2048, 8192), (1, 8, 32, 128)
    else:
        H, decode_N, prefill_N, Ts = 512, (1, 16), (256,), (1, 8, 32)
    rank_kinds = lambda T: ("uniform",) if T == 1 else ("uniform", "mixed")  # noqa: E731
    out = [dict(mode="fwd", phase="decode", N=N, T=T, ranks=rk, H=H) for N in decode_N for T in Ts for rk in rank_kinds(T)]
    out += [dict(mode=m, phase="prefill", N=N, T=T, ranks=rk, H=H)
            for m in ("fwd", "fwd+bwd") for N in prefill_N for T in Ts for rk in rank_kinds(T)]
    if not gpu:  # training rows of the CPU targets: many adapters per batch, a handful, a tiny batch
        out += [dict(mode="fwd+bwd", phase="prefill", N=N, T=T, ranks=rk, H=H)
                for N, T in ((1024, 64), (1024, 8), (16, 4)) for rk in ("uniform", "mixed")]
    return out


def _ranks(s: dict) -> list[int]:
    if s["ranks"] == "uniform":
        return [s.get("uniform", 16)] * s["T"]
    cyc = s.get("mixed", MIXED)
    return [cyc[t % len(cyc)] for t in range(s["T"])]


def label(s: dict) -> str:
    rk = _ranks(s)
    ranks = f"r{rk[0]}" if s["ranks"] == "uniform" else f"r{min(rk)}-{max(rk)}"
    return f"{s['phase']} N{s['N']} H{s['H']} T{s['T']} {ranks}"


def build(s: dict, device: torch.device, dtype: torch.dtype, seed: int) -> Case:
    from ...ops import multi_lora

    rnd = Rand(seed, device, dtype)
    N, H, T = s["N"], s["H"], s["T"]
    bwd = s["mode"] == "fwd+bwd"
    rank_list = _ranks(s)
    R = max(rank_list)
    lora_a = rnd(T, R, H, scale=1 / math.sqrt(H))
    lora_b = rnd(T, H, R, scale=1 / math.sqrt(R))
    for t, r in enumerate(rank_list):  # zero padding beyond each real rank (gather baselines rely on it)
        lora_a[t, r:] = 0
        lora_b[t, :, r:] = 0
    ranks = torch.tensor(rank_list, device=device)
    scaling = torch.tensor([16.0 / r for r in rank_list], device=device)
    if s["phase"] == "decode":
        idx = torch.arange(N, device=device) % T
    else:
        idx = torch.arange(N, device=device) * T // N
    x, base = rnd(N, H), rnd(N, H)
    leaves = [x, lora_a, lora_b]
    if bwd:
        for t in leaves:
            t.requires_grad_(True)
    used = sorted(set(idx.tolist()))
    cost = costs.multi_lora([rank_list[t] for t in idx.tolist()], [rank_list[t] for t in used], H, H, es(dtype),
                            has_base=True, backward=bwd)
    call = dict(ranks=ranks, base=base)

    ours = Impl("ours", lambda: multi_lora(x, lora_a, lora_b, idx, scaling, validate=False, **call), leaves=leaves,
                backend=backend_of("multi_lora", "multi_lora_backward") if bwd else backend_of("multi_lora"),
                note="validate=False")
    loop = Impl("peft_loop", lambda: lora_loop.lora_loop(x, lora_a, lora_b, idx, scaling, **call), leaves=leaves,
                note="PEFT adapter_names-style loop over the adapters in the batch (real ranks)")
    gb_bytes = lora_gather_bmm.materialised_bytes(N, R, H, H, es(dtype))
    gather = Impl("gather_bmm", lambda: lora_gather_bmm.lora_gather_bmm(x, lora_a, lora_b, idx, scaling, **call),
                  leaves=leaves, materialised_bytes=gb_bytes, note="per-row gathered A/B at padded rank R, bmm")
    if gb_bytes * (3 if bwd else 1) > gpu_memory_limit(device):
        gather = Impl("gather_bmm", unavailable=f"would materialise {gb_bytes * (3 if bwd else 1) / 2**30:.1f} GiB "
                      f"(> a quarter of device memory)")

    # CPU rows never time the Triton interpreter (even under TRITON_INTERPRET=1): the torch fallback runs.
    why_not = lora_bgmv.triton_runs_on(device) if device.type == "cuda" else "no CUDA: the Triton kernel needs CUDA tensors"
    if why_not is None:
        bgmv = Impl("bgmv[triton]", lambda: lora_bgmv.lora_bgmv(x, lora_a, lora_b, idx, scaling, **call),
                    materialised_bytes=lora_bgmv.materialised_bytes(N, R, H, H, es(dtype), True),
                    note="padded-rank gather, Triton shrink + expand (every row pays rank R)")
    else:
        bgmv = Impl("bgmv[torch]", lambda: lora_bgmv.lora_bgmv_torch(x, lora_a, lora_b, idx, scaling, **call),
                    materialised_bytes=lora_bgmv.materialised_bytes(N, R, H, H, es(dtype), False),
                    note=f"torch gather fallback of the padded-rank kernel ({why_not})")
    if bwd:
        bgmv = Impl(bgmv.name, unavailable="forward-only serving kernel (no backward)")
    return Case("lora", "multi_lora", s["mode"], dict(s, ranks_list=rank_list, R=R), label(s), dtype, cost, ours,
                [loop, _peft_impl(lora_a, lora_b, scaling, ranks, base, x, idx, T, bwd), gather, bgmv],
                notes=["base output precomputed and passed in (no base GEMM timed)"])


def _peft_impl(lora_a, lora_b, scaling, ranks, base, x, idx, T, bwd) -> Impl:
    try:
        model, names = lora_peft.build(lora_a.detach(), lora_b.detach(), scaling, ranks, base)
    except Exception as exc:
        return Impl("peft", unavailable=f"could not build a PEFT LoRA model: {type(exc).__name__}: {exc}")
    note = "PEFT LoRA forward on a one-Linear module (base output precomputed)"
    if not bwd:
        if T == 1:
            return Impl("peft", lambda: model(x), no_grad=True, note=note + ", single adapter")
        row_names = lora_peft.adapter_names(idx, names)
        return Impl("peft", lambda: model(x, adapter_names=row_names), no_grad=True, note=note + ", adapter_names=")
    model.train()
    if T > 1:
        try:
            model(x.detach(), adapter_names=lora_peft.adapter_names(idx, names))
            reason = "PEFT accepted adapter_names in training mode, but cannot return per-adapter grads here"
        except Exception as exc:
            reason = f"PEFT cannot train a mixed-adapter batch: {type(exc).__name__}: {exc}"
        return Impl("peft", unavailable=reason)
    a_w, b_w = lora_peft.leaves(model, names[0])
    return Impl("peft", lambda: model(x), leaves=[x, a_w, b_w], note=note + ", single adapter, training",
                canon=lambda got: [got[0], got[1], got[2][None], got[3][None]])
