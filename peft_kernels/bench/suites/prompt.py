"""soft_prompt_embed / soft_prompt_concat vs embedding + expand + ``torch.cat`` and PEFT's own path.

``embed`` rows: prompt tuning (prompts at position 0, frozen embedding table, grads w.r.t. the
prompts only); T = 1 is PEFT's case (one prompt per model), T = 8 a multi-task batch (row b uses
prompt b % 8; PEFT has no per-row prompts). ``concat`` rows: visual prompt tuning on ViT tokens
(prompts after the CLS token, ``insert_at=1``; deep VPT overwrites them, ``replace=True``); grads
w.r.t. the embeddings and the prompts.
"""
from __future__ import annotations

import torch

from .. import costs
from ..baselines import prompt_cat, prompt_peft
from ..harness import Case, Impl
from . import Rand, backend_of, es


def specs(quick: bool, device: torch.device) -> list[dict]:
    gpu = device.type == "cuda"
    if quick and gpu:
        E = dict(kind="embed", H=4096, V=32000)
        return [
            dict(mode="fwd", B=8, L=512, P=20, T=1, **E),
            dict(mode="fwd", B=64, L=512, P=100, T=8, **E),
            dict(mode="fwd+bwd", B=8, L=512, P=20, T=1, **E),
            dict(mode="fwd", kind="concat", B=64, L=197, P=50, H=768, T=1, insert_at=1, replace=False),
        ]
    if quick:
        E = dict(kind="embed", H=64, V=1000)
        return [
            dict(mode="fwd", B=4, L=32, P=8, T=1, **E),
            dict(mode="fwd+bwd", B=4, L=32, P=8, T=1, **E),
            dict(mode="fwd", kind="concat", B=4, L=17, P=4, H=64, T=1, insert_at=1, replace=False),
        ]
    if gpu:
        H, V, Bs, Ls, Ps, vit = 4096, 32000, (1, 8, 64), (128, 512, 4096), (20, 100), dict(Bs=(8, 64), L=197, H=768, Ps=(10, 50))
    else:  # a BERT/GPT-2-sized table and ViT-B/16 tokens: what a CPU trains; B1 rows show the per-call cost
        H, V, Bs, Ls, Ps, vit = 768, 8000, (1, 8), (128, 512), (20, 100), dict(Bs=(8,), L=197, H=768, Ps=(10, 50))
    out = [dict(mode=m, kind="embed", B=B, L=L, P=P, T=1, H=H, V=V) for m in ("fwd", "fwd+bwd") for B in Bs for L in Ls for P in Ps]
    out += [dict(mode="fwd", kind="embed", B=Bs[-1], L=L, P=P, T=8, H=H, V=V) for L in Ls[1:] for P in Ps]
    if not gpu:  # multi-task training: per-row prompts, dprompts summed per prompt
        out += [dict(mode="fwd+bwd", kind="embed", B=Bs[-1], L=Ls[0], P=P, T=8, H=H, V=V) for P in Ps]
    out += [dict(mode=m, kind="concat", B=B, L=vit["L"], P=P, H=vit["H"], T=1, insert_at=1, replace=rep)
            for m in ("fwd", "fwd+bwd") for B in vit["Bs"] for P in vit["Ps"] for rep in (False, True)]
    return out


def label(s: dict) -> str:
    extra = "" if s["kind"] == "embed" else f" at{s['insert_at']}{' replace' if s['replace'] else ''}"
    return f"{s['kind']} B{s['B']} L{s['L']} P{s['P']} H{s['H']} T{s['T']}{extra}"


def build(s: dict, device: torch.device, dtype: torch.dtype, seed: int) -> Case:
    from ...ops import soft_prompt_concat, soft_prompt_embed

    rnd = Rand(seed, device, dtype)
    B, L, P, H, T = s["B"], s["L"], s["P"], s["H"], s["T"]
    bwd = s["mode"] == "fwd+bwd"
    prompts = rnd(T, P, H)
    idx = None if T == 1 else torch.arange(B, device=device) % T
    n_distinct = min(B, T)
    if s["kind"] == "concat":
        return _concat(s, rnd, prompts, idx, bwd, soft_prompt_concat, dtype, n_distinct)

    ids = rnd.ints(s["V"], B, L)
    weight = rnd(s["V"], H)  # frozen word embedding (prompt tuning trains the prompts only)
    if bwd:
        prompts.requires_grad_(True)
    cost = costs.soft_prompt(B, L, P, H, es(dtype), n_distinct, embed=True, backward=bwd)
    ops = ("soft_prompt_embed", "soft_prompt_embed_backward") if bwd else ("soft_prompt_embed",)
    ours = Impl("ours", lambda: soft_prompt_embed(ids, weight, prompts, prompt_index=idx, validate=False),
                leaves=[prompts], backend=backend_of(*ops), note="validate=False")
    cat = Impl("embed_cat", lambda: prompt_cat.prompt_embed_cat(ids, weight, prompts, idx), leaves=[prompts],
               materialised_bytes=prompt_cat.materialised_bytes(B, L, P, H, es(dtype), shared=T == 1),
               note="F.embedding, then torch.cat with the expanded (T=1) or gathered prompts")
    return Case("prompt", "soft_prompt_embed", s["mode"], s, label(s), dtype, cost, ours,
                [cat, _peft_impl(weight, prompts, ids, T, bwd)],
                notes=["frozen embedding table; prompts at position 0 (prompt tuning)"])


def _peft_impl(weight, prompts, ids, T, bwd) -> Impl:
    if T != 1:
        return Impl("peft", unavailable="PEFT prompt tuning holds one prompt per model (no per-row prompt choice)")
    try:
        model = prompt_peft.build(weight, prompts.detach()[0])
    except Exception as exc:
        return Impl("peft", unavailable=f"could not build a PEFT prompt-tuning model: {type(exc).__name__}: {exc}")
    note = "PEFT PeftModelForCausalLM input path: word_embeddings, get_prompt(B), torch.cat"
    if not bwd:
        return Impl("peft", lambda: prompt_peft.embed(model, ids), no_grad=True, note=note)
    return Impl("peft", lambda: prompt_peft.embed(model, ids), leaves=[prompt_peft.prompt_weight(model)],
                canon=lambda got: [got[0], got[1][None]], note=note)


def _concat(s, rnd, prompts, idx, bwd, soft_prompt_concat, dtype, n_distinct) -> Case:
    B, L, P, H = s["B"], s["L"], s["P"], s["H"]
    at, rep = s["insert_at"], s["replace"]
    embeds = rnd(B, L, H)
    leaves = [embeds, prompts]
    if bwd:
        for t in leaves:
            t.requires_grad_(True)
    cost = costs.soft_prompt(B, L, P, H, es(dtype), n_distinct, replace=rep, embed=False, backward=bwd)
    ops = ("soft_prompt_concat", "soft_prompt_concat_backward") if bwd else ("soft_prompt_concat",)
    ours = Impl("ours", lambda: soft_prompt_concat(embeds, prompts, prompt_index=idx, insert_at=at, replace=rep,
                                                   validate=False), leaves=leaves, backend=backend_of(*ops))
    cat = Impl("cat", lambda: prompt_cat.prompt_concat_cat(embeds, prompts, idx, insert_at=at, replace=rep), leaves=leaves,
               materialised_bytes=prompt_cat.materialised_bytes(B, L, P, H, es(dtype), shared=idx is None, embed=False),
               note="torch.cat of the slices around the expanded prompt")
    peft = Impl("peft", unavailable="PEFT has no visual prompt tuning (VPT) path")
    return Case("prompt", "soft_prompt_concat", s["mode"], s, label(s), dtype, cost, ours, [cat, peft],
                notes=["VPT: prompts after the CLS token (insert_at=1); replace=True is deep VPT"])
