"""prefix_attention vs ``torch.cat`` + SDPA and FlexAttention (prefill fwd, fwd+bwd; decode fwd).

Bank of T = 4 prefixes, row b uses prefix b % 4 (the multi-task case; B = 1 uses one), full
prefix lengths, no key padding, bottom-right causal. The SDPA mask and the Flex block mask are
built once per row outside the timing (a model builds them once per batch, not per layer).
"""
from __future__ import annotations

import torch

from .. import costs
from ..baselines import prefix_flex, prefix_sdpa
from ..harness import Case, Impl
from . import Rand, backend_of, es

T_BANK = 4


def specs(quick: bool, device: torch.device) -> list[dict]:
    gpu = device.type == "cuda"
    if quick and gpu:
        base = dict(Hq=32, Hkv=8, D=128)
        return [
            dict(mode="fwd", B=4, Lq=1024, Lk=1024, P=64, **base),
            dict(mode="fwd", B=8, Lq=4096, Lk=4096, P=128, **base),
            dict(mode="fwd+bwd", B=4, Lq=1024, Lk=1024, P=64, **base),
            dict(mode="fwd", B=16, Lq=1, Lk=4096, P=128, **base),
        ]
    if quick:
        base = dict(Hq=4, Hkv=2, D=32)
        return [
            dict(mode="fwd", B=2, Lq=64, Lk=64, P=8, **base),
            dict(mode="fwd+bwd", B=2, Lq=64, Lk=64, P=8, **base),
            dict(mode="fwd", B=2, Lq=1, Lk=128, P=8, **base),
        ]
    if gpu:
        base, Bs, Ls, Ps, Lds = dict(Hq=32, Hkv=8, D=128), (1, 4, 16), (512, 1024, 2048, 4096), (16, 128), (1024, 2048, 4096, 8192)
    else:
        base, Bs, Ls, Ps, Lds = dict(Hq=8, Hkv=2, D=64), (1, 4), (128, 256), (16, 64), (512, 1024)
    out = [dict(mode=m, B=B, Lq=L, Lk=L, P=P, **base) for m in ("fwd", "fwd+bwd") for B in Bs for L in Ls for P in Ps]
    out += [dict(mode="fwd", B=B, Lq=1, Lk=Lk, P=P, **base) for B in Bs for Lk in Lds for P in Ps]
    return out


def label(s: dict) -> str:
    kind = f"decode Lk{s['Lk']}" if s["Lq"] == 1 else f"L{s['Lq']}"
    return f"B{s['B']} Hq{s['Hq']}/{s['Hkv']} D{s['D']} {kind} P{s['P']}"


def build(s: dict, device: torch.device, dtype: torch.dtype, seed: int) -> Case:
    from ...ops import prefix_attention

    rnd = Rand(seed, device, dtype)
    B, Hq, Hkv, Lq, Lk, P, D = (s[k] for k in ("B", "Hq", "Hkv", "Lq", "Lk", "P", "D"))
    bwd = s["mode"] == "fwd+bwd"
    q, k, v = rnd(B, Hq, Lq, D), rnd(B, Hkv, Lk, D), rnd(B, Hkv, Lk, D)
    pk, pv = rnd(T_BANK, Hkv, P, D), rnd(T_BANK, Hkv, P, D)
    idx = torch.arange(B, device=device) % T_BANK
    leaves = [q, k, v, pk, pv]
    if bwd:
        for t in leaves:
            t.requires_grad_(True)
    n_distinct = min(B, T_BANK)
    cost = costs.prefix_attention(B, Hq, Hkv, Lq, Lk, P, D, es(dtype), n_distinct, causal=True, backward=bwd)

    ours = Impl("ours", lambda: prefix_attention(q, k, v, pk, pv, prefix_index=idx, validate=False), leaves=leaves,
                backend=backend_of("prefix_attention", "prefix_attention_backward") if bwd else backend_of("prefix_attention"),
                note="validate=False (as the model layer calls it)")
    mask = prefix_sdpa.visibility_mask(idx, P, Lq, Lk, causal=True)
    sdpa = Impl("cat_sdpa", lambda: prefix_sdpa.prefix_cat_sdpa(q, k, v, pk, pv, idx, mask=mask), leaves=leaves,
                materialised_bytes=prefix_sdpa.materialised_bytes(B, Hq, Hkv, Lq, Lk, P, D, es(dtype)),
                note="per-row prefix gather + torch.cat, repeat_interleave GQA, bool mask (built outside the timing)")
    try:
        flex_fwd, how = prefix_flex.prepare(q, k, v, pk, pv, idx)
        flex = Impl("flex", flex_fwd, leaves=leaves, optional=True, note=how,
                    materialised_bytes=prefix_flex.materialised_bytes(B, Hkv, Lk, P, D, es(dtype)))
    except Exception as exc:  # not in this torch, or no block mask for this shape
        flex = Impl("flex", unavailable=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}")
    return Case("prefix", "prefix_attention", s["mode"], dict(s, T=T_BANK), label(s), dtype, cost, ours, [sdpa, flex],
                notes=["T=4 prefix bank, row b uses prefix b % 4; bottom-right causal; no key padding"])
