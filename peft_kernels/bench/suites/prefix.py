"""prefix_attention vs ``torch.cat`` + SDPA and FlexAttention (prefill fwd, fwd+bwd; decode fwd).

Bank of T = 4 prefixes, row b uses prefix b % 4 (the multi-task case; B = 1 uses one), full
prefix lengths, no key padding. ``causal`` per row: bottom-right causal for the Llama-like
decoder rows (Hq 32 / Hkv 8, D 128), bidirectional for the BERT-like encoder rows (Hq = Hkv = 16,
D 64); ours and both baselines get the same flag. The SDPA mask and the Flex block mask are
built once per row outside the timing (a model builds them once per batch, not per layer).
Without CUDA the full grid is :data:`CPU_SHAPES`, all causal, forward and forward+backward.
"""
from __future__ import annotations

import torch

from .. import costs
from ..baselines import prefix_flex, prefix_sdpa
from ..harness import Case, Impl
from . import Rand, backend_of, es

T_BANK = 4


LLAMA = dict(Hq=32, Hkv=8, D=128, causal=True)  # Llama-like GQA (Hkv = Hq / 4), causal decoder
BERT = dict(Hq=16, Hkv=16, D=64, causal=False)  # BERT-base-like encoder: no GQA, bidirectional


def specs(quick: bool, device: torch.device) -> list[dict]:
    gpu = device.type == "cuda"
    if quick and gpu:
        # ~1 min on an H100, the four FlexAttention compiles included: issue 4's causal L2048 row in
        # both modes, its bidirectional row, and its largest decode row.
        return [
            dict(mode="fwd", B=8, Lq=2048, Lk=2048, P=64, **LLAMA),
            dict(mode="fwd+bwd", B=8, Lq=2048, Lk=2048, P=64, **LLAMA),
            dict(mode="fwd", B=32, Lq=256, Lk=256, P=128, **BERT),
            dict(mode="fwd", B=64, Lq=1, Lk=4096, P=128, **LLAMA),
        ]
    if quick:
        tiny = dict(Hq=4, Hkv=2, D=32, causal=True)
        return [
            dict(mode="fwd", B=2, Lq=64, Lk=64, P=8, **tiny),
            dict(mode="fwd+bwd", B=2, Lq=64, Lk=64, P=8, **tiny),
            dict(mode="fwd", B=4, Lq=32, Lk=32, P=8, Hq=4, Hkv=4, D=32, causal=False),
            dict(mode="fwd", B=4, Lq=1, Lk=128, P=8, **tiny),
        ]
    if gpu:
        # (B, L, P): issue 4's B8 L2048 P64, plus the corners of the old B 1/4/16 x L 512..4096 x
        # P 16/128 grid (the rows in between added time, not information).
        llama = [(1, 4096, 16), (1, 4096, 128), (4, 1024, 16), (4, 1024, 128), (4, 4096, 128), (8, 2048, 64),
                 (16, 512, 16), (16, 512, 128), (16, 2048, 128)]
        bert = [(32, 256, 128), (16, 512, 32)]  # issue 4's B32 L256 P128, and a longer-sequence one
        # Issue 4's decode sweep (B64, context 128..4096, P128), and single-stream / long-context decode.
        decode = [(64, Lk, 128) for Lk in (128, 512, 1024, 2048, 4096)] + [(1, 4096, 128), (16, 8192, 128),
                                                                           (16, 1024, 16)]
        big, enc = LLAMA, BERT
    else:
        return cpu_specs()
    out = [dict(mode=m, B=B, Lq=L, Lk=L, P=P, **big) for m in ("fwd", "fwd+bwd") for B, L, P in llama]
    out += [dict(mode=m, B=B, Lq=L, Lk=L, P=P, **enc) for m in ("fwd", "fwd+bwd") for B, L, P in bert]
    out += [dict(mode="fwd", B=B, Lq=1, Lk=Lk, P=P, **big) for B, Lk, P in decode]
    return out


# CPU grid (B, Hq, Hkv, Lq, Lk, P, D), causal: small MHA prefill, GQA prefill at L512 and L1024
# (Llama-like heads), and GQA decode over a 1024-token context.
CPU_SHAPES = [(4, 8, 8, 128, 128, 16, 64), (8, 16, 4, 512, 512, 32, 64), (2, 32, 8, 1024, 1024, 64, 128),
              (16, 32, 8, 1, 1024, 64, 128)]


def cpu_specs() -> list[dict]:
    """Every CPU shape forward and forward+backward (decode included: a training step on one token)."""
    keys = ("B", "Hq", "Hkv", "Lq", "Lk", "P", "D")
    return [dict(mode=m, causal=True, **dict(zip(keys, shape))) for shape in CPU_SHAPES for m in ("fwd", "fwd+bwd")]


def label(s: dict) -> str:
    kind = f"decode Lk{s['Lk']}" if s["Lq"] == 1 else f"L{s['Lq']}"
    mask = "" if s.get("causal", True) else " bidir"
    return f"B{s['B']} Hq{s['Hq']}/{s['Hkv']} D{s['D']} {kind} P{s['P']}{mask}"


def build(s: dict, device: torch.device, dtype: torch.dtype, seed: int) -> Case:
    from ...ops import prefix_attention

    rnd = Rand(seed, device, dtype)
    B, Hq, Hkv, Lq, Lk, P, D = (s[k] for k in ("B", "Hq", "Hkv", "Lq", "Lk", "P", "D"))
    bwd = s["mode"] == "fwd+bwd"
    causal = s.get("causal", True)
    q, k, v = rnd(B, Hq, Lq, D), rnd(B, Hkv, Lk, D), rnd(B, Hkv, Lk, D)
    pk, pv = rnd(T_BANK, Hkv, P, D), rnd(T_BANK, Hkv, P, D)
    idx = torch.arange(B, device=device) % T_BANK
    leaves = [q, k, v, pk, pv]
    if bwd:
        for t in leaves:
            t.requires_grad_(True)
    n_distinct = min(B, T_BANK)
    cost = costs.prefix_attention(B, Hq, Hkv, Lq, Lk, P, D, es(dtype), n_distinct, causal=causal, backward=bwd)

    ours = Impl("ours", lambda: prefix_attention(q, k, v, pk, pv, prefix_index=idx, causal=causal,
                                                  validate=False), leaves=leaves,
                backend=backend_of("prefix_attention", "prefix_attention_backward") if bwd else backend_of("prefix_attention"),
                note="validate=False (as the model layer calls it)")
    mask = prefix_sdpa.visibility_mask(idx, P, Lq, Lk, causal=causal)
    sdpa = Impl("cat_sdpa", lambda: prefix_sdpa.prefix_cat_sdpa(q, k, v, pk, pv, idx, causal=causal, mask=mask), leaves=leaves,
                materialised_bytes=prefix_sdpa.materialised_bytes(B, Hq, Hkv, Lq, Lk, P, D, es(dtype)),
                note="per-row prefix gather + torch.cat, repeat_interleave GQA, bool mask (built outside the timing)")
    try:
        flex_fwd, how = prefix_flex.prepare(q, k, v, pk, pv, idx, causal=causal)
        flex = Impl("flex", flex_fwd, leaves=leaves, optional=True, note=how,
                    materialised_bytes=prefix_flex.materialised_bytes(B, Hkv, Lk, P, D, es(dtype)))
    except Exception as exc:  # not in this torch, or no block mask for this shape
        flex = Impl("flex", unavailable=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}")
    mask_note = "bottom-right causal" if causal else "bidirectional (causal=False: every query sees every key)"
    return Case("prefix", "prefix_attention", s["mode"], dict(s, T=T_BANK, causal=causal), label(s), dtype, cost, ours,
                [sdpa, flex], notes=[f"T=4 prefix bank, row b uses prefix b % 4; no key padding; {mask_note} rows"])
