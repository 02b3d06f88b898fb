"""End to end: a random Llama serving batches whose rows use different adapters, and the KV cache
of prefix-tuned generation.

Models: ``LlamaConfig`` with random weights. On CUDA a Llama-like 8 layers, hidden 1024 (16 heads,
4 KV heads, intermediate 2816, vocabulary 32000), in the bench dtype (bf16); on CPU a smaller
shape: 4 layers, hidden 256 (8 heads, 8 KV heads, intermediate 512, vocabulary 1024). Adapters
are made with ``peft`` (random weights: ``init_lora_weights=False``, prefix encoders redrawn),
saved with ``save_pretrained`` into a temporary directory and loaded from there into ours, as a
server would load them. Three kinds of rows:

``llama_multi_lora`` (``row="lora"``): T = 8 or 32 LoRA adapters on q/k/v/o_proj, mixed ranks
    (8..64 on CUDA, 4..16 on CPU; ``lora_alpha = 2 r``), row b uses adapter b % T.
    - ours: ``MultiAdapterModel`` with the T adapter directories loaded,
      ``model(ids, adapter_names=[...])``;
    - peft: one ``PeftModel`` holding the T adapters, ``model(input_ids, adapter_names=[...])``
      (PEFT's mixed-batch loop);
    - base_model: the model without adapters, the floor (not compared numerically).
    ``phase="prefill"``: one forward over B x L (logits). ``phase="decode"``: one decode step,
    B x 1 tokens after a ``ctx``-token KV cache (each implementation's own cache, built once;
    cropped back to ``ctx`` after every step).

``llama_mixed_kinds`` (``row="mixed"``): per 16 rows, 8 LoRA adapters (the ranks above), two
    P-tuning v2 prefixes (P 16 and 24 on CPU), a prompt-tuning and a P-tuning adapter and 4 base rows.
    Equal-length rows (L) and ragged ones (``lengths``: each row's length drawn in 16..256, left-padded).
    - ours: one ``MultiAdapterModel`` batch (``forward`` / ``generate`` with ``adapter_names``), which
      runs packed (real tokens and each row's own prompt slots only);
    - ours_padded: the same with ``packed=False`` (the padded batch: every row carries the longest
      prompt's slots and the padding);
    - peft: PEFT's best route for a batch it cannot mix: the LoRA and base rows in one
      ``adapter_names=`` call of the LoRA ``PeftModel`` (``"__base__"`` for base rows), then one
      call per prompt-learning adapter on its own ``PeftModel``, one after another (padding inside
      its calls; not compared numerically on ragged rows, whose positions it takes from the padding);
    - base_model: the whole batch on the model without adapters.
    ``phase="prefill"``: forward over B x L (tokens/s counts real tokens); ``phase="generate"``:
    ``generate`` of ``new`` tokens (greedy, exactly ``new``) after the prompt.

``llama_prefix_generate`` (``row="prefix_cache"``): one prefix-tuning ``PeftModel``; ``generate``
    ``new`` tokens for B x L prompts: ours = ``peft_kernels.patch(peft_model)`` (the prefix is read
    by the attention kernel, not stored in the cache) vs PEFT's own ``generate`` (prefix in the KV
    cache) vs the base model. Before timing, the KV cache each holds after one generate
    (``return_dict_in_generate=True``) is measured: bytes of every layer's key and value tensors,
    next to the analytic B * (L + new - 1) slots per layer for ours and B * (P + L + new - 1) for
    PEFT (the last new token is never fed back), and the cache of PEFT's prefill forward
    (B * (P + L)). The row's ``shape["kv_cache"]`` holds the numbers, its notes say them.

``llama_prefix_patch`` (``row="prefix_patch"``): one prefix-tuning ``PeftModel`` on a GQA Llama
    (CPU: 4 layers, hidden 256, 8 heads / 2 KV heads; B8 L512): ours = ``peft_kernels.patch`` of a
    copy vs PEFT's own forward, ``fwd`` (logits) and ``fwd+bwd`` (a training step: the prefix
    parameters' gradients are compared too), with peak memory.

Correctness gate, before any timing. prefill / decode rows: the harness compares ours' logits
with PEFT's per row group (one tensor per adapter; max |diff| / max |ours| within 1e-3 in fp32,
5e-2 in 16-bit). generate rows: PEFT's own generate of prefix- and prompt-tuned models is wrong
with recent transformers (PEFT loses the prefix / prompt; the row's notes say how many of its
tokens match ours), so it is timed but not used as the reference: ours' tokens are checked against
PEFT's *forward* instead, teacher-forced on ours' sequences (every generated token must be the
argmax of PEFT's logits, up to the same tolerance relative to max |logit|); a mismatch fails the row.

Per row, :func:`derived` gives tokens/s of each implementation, the speed-up over PEFT, ours'
throughput over the base model's, and the adapter overhead ratio (PEFT's added time over the base
model / ours' added time); :func:`summary` renders them as markdown.
"""
from __future__ import annotations

import copy
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from ...cache_utils import cache_kw as _cache_kw, cache_of as _cache_of, cache_stats, crop as _crop
from .. import costs
from ..harness import Case, Impl
from . import backend_of

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MODELS = {
    "llama8x1024": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                        num_attention_heads=16, num_key_value_heads=4),
    "llama4x256": dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=8),
    "llama4x256gqa": dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=2),
}
RANKS = {"cuda": (8, 16, 32, 64), "cpu": (4, 6, 8, 10, 12, 14, 16, 16)}  # cycled over the adapters
MIXED_LORA = 8  # LoRA adapters in a mixed-kind batch
MIXED_BASE = 4  # base-model rows per 16 rows of a mixed-kind batch
BASE_ROW = "__base__"  # PEFT's adapter_names entry for "no adapter"


def specs(quick: bool, device: torch.device) -> list[dict]:
    gpu = device.type == "cuda"
    if gpu:
        m, B, L, ctx, P = "llama8x1024", 32, 256, 256, 64
        kinds = dict(prefix=(64, 32), prompt=32, ptuning=16)
    else:  # the CPU criterion: 16 rows, decode 16 x 1 after 32 tokens, prefill 16 x 128
        m, B, L, ctx, P = "llama4x256", 16, 128, 32, 16
        kinds = dict(prefix=(16, 24), prompt=16, ptuning=8)
    new = 16
    gen_L = L if gpu else 16
    ragged = (16, 256)
    out = [
        dict(mode="fwd", row="lora", phase="prefill", model=m, T=8, B=B, L=L),
        dict(mode="fwd", row="lora", phase="decode", model=m, T=8, B=B, L=1, ctx=ctx),
    ]
    if gpu or not quick:
        out += [dict(mode="fwd", row="lora", phase="prefill", model=m, T=128, B=B, L=L),
                dict(mode="fwd", row="lora", phase="decode", model=m, T=128, B=B, L=1, ctx=ctx)]
    out += [
        dict(mode="fwd", row="mixed", phase="prefill", model=m, B=B, L=L, **kinds),
        dict(mode="fwd", row="mixed", phase="prefill", model=m, B=B, L=ragged[1], lengths=ragged, **kinds),
        dict(mode="fwd", row="mixed", phase="generate", model=m, B=B, L=gen_L, new=new, **kinds),
        dict(mode="fwd", row="mixed", phase="generate", model=m, B=B, L=ragged[1], lengths=ragged, new=new, **kinds),
        dict(mode="fwd", row="prefix_cache", phase="generate", model=m, B=B if gpu else 4, L=gen_L if gpu else 32,
             P=P, new=new),
    ]
    # patch() of a PEFT prefix-tuning model vs PEFT's own forward, inference and a training step
    pm, pB, pL = (m, 8, 1024) if gpu else ("llama4x256gqa", 8, 512 if not quick else 64)
    out += [dict(mode=mode, row="prefix_patch", phase="prefill", model=pm, B=pB, L=pL, P=20)
            for mode in ("fwd", "fwd+bwd")]
    if not quick:
        if gpu:  # longer sequences, fewer rows
            out += [dict(mode="fwd", row="lora", phase="prefill", model=m, T=8, B=8, L=1024),
                    dict(mode="fwd", row="lora", phase="decode", model=m, T=8, B=8, L=1, ctx=1024),
                    dict(mode="fwd", row="mixed", phase="prefill", model=m, B=8, L=1024, **kinds),
                    dict(mode="fwd", row="prefix_cache", phase="generate", model=m, B=8, L=1024, P=128, new=64)]
        else:
            out += [dict(mode="fwd", row="lora", phase="prefill", model=m, T=8, B=4, L=256),
                    dict(mode="fwd", row="mixed", phase="prefill", model=m, B=8, L=128, **kinds)]
    return out


def _ranks(s: dict, n: int) -> list[int]:
    cyc = RANKS["cuda" if s["model"] == "llama8x1024" else "cpu"]
    return [cyc[t % len(cyc)] for t in range(n)]


def _model_label(s: dict) -> str:
    c = MODELS[s["model"]]
    return f"llama {c['num_hidden_layers']}x{c['hidden_size']}"


def label(s: dict) -> str:
    m = _model_label(s)
    if s["row"] == "lora":
        rk = _ranks(s, s["T"])
        what = f"{s['B']}x1 ctx{s['ctx']}" if s["phase"] == "decode" else f"{s['B']}x{s['L']}"
        return f"{m} LoRA T{s['T']} r{min(rk)}-{max(rk)} {s['phase']} {what}"
    if s["row"] == "mixed":
        L = f"L{s['lengths'][0]}-{s['lengths'][1]}" if s.get("lengths") else f"{s['L']}"
        what = f"{s['B']}x{L} +{s['new']} new" if s["phase"] == "generate" else f"{s['B']}x{L}"
        P = "/".join(str(p) for p in s["prefix"])
        return (f"{m} LoRA x{MIXED_LORA}+prefix P{P}+prompt+ptuning+base "
                f"{'ragged ' if s.get('lengths') else ''}{s['phase']} {what}")
    if s["row"] == "prefix_patch":
        return f"{m} patch(prefix P{s['P']}) {'train step' if s['mode'] == 'fwd+bwd' else 'forward'} {s['B']}x{s['L']}"
    return f"{m} prefix P{s['P']} generate {s['B']}x{s['L']} +{s['new']} new"


def row_lengths(s: dict) -> Optional[list[int]]:
    """Each row's real length in a ragged row (drawn in ``s["lengths"]``, the first row the longest), else None."""
    if not s.get("lengths"):
        return None
    lo, hi = s["lengths"]
    n = torch.randint(lo, hi + 1, (s["B"],), generator=torch.Generator().manual_seed(7))
    n[0] = hi
    return n.tolist()


def tokens(s: dict) -> int:
    """Real tokens one call processes (prefill, decode B) or produces (generate B x new)."""
    if s["phase"] == "prefill":
        return sum(row_lengths(s)) if s.get("lengths") else s["B"] * s["L"]
    if s["phase"] == "decode":
        return s["B"]
    return s["B"] * s["new"]


# ----------------------------------------------------------------------------- helpers


def _quiet() -> None:
    # PEFT's routes use transformers arguments that newer versions deprecate (the consequence for
    # PEFT's prefix generate is in the rows' notes); the bench's output stays readable.
    warnings.filterwarnings("ignore", category=FutureWarning, message=r"`past_key_values` is deprecated")
    warnings.filterwarnings("ignore", message="Position ids are not supported")


def greedy_gap(seq: Tensor, L: int, logits: Tensor) -> float:
    """How far ``seq``'s generated tokens are from greedy under ``logits`` (teacher-forced on ``seq``).

    ``seq`` [b, L + new]; ``logits`` [b, L + new - 1, V], the reference model's forward over
    ``seq[:, :-1]``. Returns max over rows and steps of (max logit - logit of the generated token),
    relative to max |logit|: 0 when every token is the reference's argmax.
    """
    pred = logits[:, L - 1:].double()
    chosen = pred.gather(-1, seq[:, L:, None].to(pred.device))[..., 0]
    return ((pred.max(-1).values - chosen).max() / pred.abs().max().clamp_min(1e-30)).item()


def _groups(names: list) -> dict:
    """{adapter name or None: row indices}, in first-use order."""
    return {n: [b for b, m in enumerate(names) if m == n] for n in dict.fromkeys(names)}


def _split(groups: dict, device) -> Callable[[list], list]:
    idx = [torch.tensor(rows, device=device) for rows in groups.values()]
    return lambda outs: [outs[0][i] for i in idx]


# ----------------------------------------------------------------------------- models


_BUNDLE: dict = {}  # the last built models, shared by the rows that use the same ones


def _base(s: dict, device, dtype, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**MODELS[s["model"]], max_position_embeddings=4096, pad_token_id=0, eos_token_id=None)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, None
    return model


def _lora_config(r: int):
    import peft

    return peft.LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=2 * r, target_modules=list(TARGETS),
                           lora_dropout=0.0, init_lora_weights=False)  # random A and B: the adapters change the logits


def _bundle(s: dict, device, dtype, seed) -> dict:
    """Base model, PEFT models and ours for a row kind; reused while the next row needs the same."""
    key = (s["row"], s["model"], s.get("T"), s.get("P"), s.get("prefix"), s.get("prompt"), s.get("ptuning"),
           str(device), dtype, seed)
    if _BUNDLE.get("key") == key:
        return _BUNDLE["value"]
    _BUNDLE.clear()
    import peft

    from ...multi_adapter import MultiAdapterModel

    _quiet()
    base = _base(s, device, dtype, seed)
    out = {"base": base}
    if s["row"] in ("prefix_cache", "prefix_patch"):
        from ... import patch

        torch.manual_seed(seed + 1)
        ref = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                               num_virtual_tokens=s["P"]))
        with torch.no_grad():
            for p in ref.prompt_encoder.parameters():
                p.normal_(0, 0.5)
        ref = ref.eval()
        out.update(peft=ref, ours=patch(copy.deepcopy(ref)))
        _BUNDLE.update(key=key, value=out)
        return out

    ours = MultiAdapterModel(copy.deepcopy(base))
    n_lora = s["T"] if s["row"] == "lora" else MIXED_LORA
    lora_names = [f"lora{t}" for t in range(n_lora)]
    torch.manual_seed(seed + 1)
    lora_model = None
    for name, r in zip(lora_names, _ranks(s, n_lora)):
        if lora_model is None:
            lora_model = peft.get_peft_model(copy.deepcopy(base), _lora_config(r), adapter_name=name)
        else:
            lora_model.add_adapter(name, _lora_config(r))
    lora_model = lora_model.eval()
    others = {}
    if s["row"] == "mixed":
        hidden = MODELS[s["model"]]["hidden_size"]
        configs = {
            **{f"prefix{p}": peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=p)  # P-tuning v2
               for p in s["prefix"]},
            "prompt": peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=s["prompt"]),
            "ptuning": peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=s["ptuning"],
                                                encoder_hidden_size=hidden // 4),
        }
        for i, (name, config) in enumerate(configs.items()):
            torch.manual_seed(seed + 10 + i)
            m = peft.get_peft_model(copy.deepcopy(base), config)
            if name.startswith("prefix"):
                with torch.no_grad():
                    for p in m.prompt_encoder.parameters():
                        p.normal_(0, 0.5)
            others[name] = m.eval()
    with tempfile.TemporaryDirectory() as tmp:  # PEFT adapter directories, loaded as a server would
        lora_model.save_pretrained(tmp, selected_adapters=lora_names)  # -> tmp/<name>/ each
        for name in lora_names:
            ours.load_adapter(Path(tmp) / name, name)
        for name, m in others.items():
            m.save_pretrained(Path(tmp) / name)
            ours.load_adapter(Path(tmp) / name, name)
    if s["row"] == "lora":
        from ... import patch

        out["patched"] = patch(copy.deepcopy(lora_model))  # the PEFT model on our ops, in place
    out.update(ours=ours.eval(), lora=lora_model, lora_names=lora_names, others=others)
    _BUNDLE.update(key=key, value=out)
    return out


# ----------------------------------------------------------------------------- rows


def build(s: dict, device: torch.device, dtype: torch.dtype, seed: int) -> Case:
    tol = 5e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-3
    if s["row"] == "prefix_cache":
        return _prefix_cache_case(s, device, dtype, seed, tol)
    if s["row"] == "prefix_patch":
        return _prefix_patch_case(s, device, dtype, seed, tol)
    b = _bundle(s, device, dtype, seed)
    V = MODELS[s["model"]]["vocab_size"]
    g = torch.Generator(device="cpu").manual_seed(seed)
    L_in = s["ctx"] + 1 if s["phase"] == "decode" else s["L"]
    ids = torch.randint(3, V, (s["B"], L_in), generator=g).to(device)
    lengths = row_lengths(s)
    mask = None
    if lengths is not None:  # left padding, as batched generation pads
        mask = (torch.arange(L_in)[None] >= L_in - torch.tensor(lengths)[:, None]).long().to(device)
        ids = ids.masked_fill(mask == 0, 0)
    if s["row"] == "lora":
        T = s["T"]
        names = [b["lora_names"][r % T] for r in range(s["B"])]
    else:
        cycle = b["lora_names"] + list(b["others"]) + [None] * MIXED_BASE
        names = [cycle[r % len(cycle)] for r in range(s["B"])]
    groups = _groups(names)
    ours_m, lora_m, base_m = b["ours"], b["lora"], b["base"]
    split = _split(groups, device)
    # PEFT's route: LoRA + base rows in one adapter_names= call, then each prompt-learning adapter.
    lb_rows = [r for r, n in enumerate(names) if n is None or n in b["lora_names"]]
    lb_names = [names[r] or BASE_ROW for r in lb_rows]
    lb_groups = {n: [lb_rows.index(r) for r in rows] for n, rows in groups.items() if n is None or n in b["lora_names"]}
    pl_groups = {n: rows for n, rows in groups.items() if n is not None and n not in b["lora_names"]}
    lb_idx = [torch.tensor(rows, device=device) for rows in lb_groups.values()]
    order = list(lb_groups) + list(pl_groups)  # PEFT route output order -> ours' group order

    def peft_canon(outs):
        per = dict(zip(order, [outs[0][i] for i in lb_idx] + list(outs[1:])))
        return [per[n] for n in groups]

    kinds = "LoRA" if s["row"] == "lora" else "LoRA, prefix, prompt, P-tuning"
    notes = [f"{_model_label(s)}: {MODELS[s['model']]['num_attention_heads']} heads / "
             f"{MODELS[s['model']]['num_key_value_heads']} KV heads, vocabulary {V}; {kinds} adapters saved by "
             f"PEFT and loaded from their directories into ours (MultiAdapterModel)"]
    lb_ids, pl_ids = ids[lb_rows], {n: ids[rows] for n, rows in pl_groups.items()}

    if s["phase"] in ("prefill", "decode"):
        if s["phase"] == "prefill":
            ours_fn = lambda: ours_m(ids, mask, adapter_names=names).logits  # noqa: E731
            ours_padded_fn = lambda: ours_m(ids, mask, adapter_names=names, packed=False).logits  # noqa: E731
            base_fn = lambda: base_m(input_ids=ids, attention_mask=mask).logits  # noqa: E731
            lb_mask = None if mask is None else mask[lb_rows]
            pl_mask = {n: None if mask is None else mask[rows] for n, rows in pl_groups.items()}

            def peft_fn():
                outs = [lora_m(input_ids=lb_ids, attention_mask=lb_mask, adapter_names=lb_names).logits]
                for n, x in pl_ids.items():
                    outs.append(b["others"][n](input_ids=x, attention_mask=pl_mask[n]).logits[:, -x.shape[1]:])
                return outs

            if "patched" in b:
                patched_fn = lambda: [b["patched"](input_ids=lb_ids, adapter_names=lb_names).logits]  # noqa: E731
            notes.append("prefill: one forward over B x L, logits of every token; checked per adapter group")
        else:
            ctx, ckw = s["ctx"], _cache_kw()
            prompt, step_ids = ids[:, :ctx], ids[:, ctx:]
            with torch.inference_mode():  # each implementation's own cache of the ctx-token prompt
                c_ours = _cache_of(ours_m(prompt, adapter_names=names, use_cache=True))
                c_peft = _cache_of(lora_m(input_ids=prompt[lb_rows], adapter_names=lb_names, use_cache=True))
                c_base = _cache_of(base_m(input_ids=prompt, use_cache=True))

            def stepper(fn, cache):
                def step():
                    try:
                        return fn(cache)
                    finally:
                        _crop(cache, ctx)
                return step

            ours_fn = stepper(lambda c: ours_m(step_ids, adapter_names=names, use_cache=True, **{ckw: c}).logits,
                              c_ours)
            base_fn = stepper(lambda c: base_m(input_ids=step_ids, use_cache=True, **{ckw: c}).logits, c_base)
            peft_step = step_ids[lb_rows]
            peft_one = stepper(lambda c: lora_m(input_ids=peft_step, adapter_names=lb_names, use_cache=True,
                                                **{ckw: c}).logits, c_peft)
            peft_fn = lambda: [peft_one()]  # noqa: E731
            if "patched" in b:
                with torch.inference_mode():
                    c_patched = _cache_of(b["patched"](input_ids=prompt[lb_rows], adapter_names=lb_names,
                                                       use_cache=True))
                patched_one = stepper(lambda c: b["patched"](input_ids=peft_step, adapter_names=lb_names,
                                                             use_cache=True, **{ckw: c}).logits, c_patched)
                patched_fn = lambda: [patched_one()]  # noqa: E731
            notes.append(f"decode: one step of B x 1 tokens after a {ctx}-token KV cache (each implementation's "
                         f"own, cropped back after every step); checked per adapter group")
        canon = split
        if mask is not None:  # compare real tokens only
            real = [mask[rows].bool() for rows in groups.values()]
            canon = lambda outs: [t[m] for t, m in zip(split(outs), real)]  # noqa: E731
        ours = Impl("ours", ours_fn, no_grad=True, canon=canon, backend=_backend(s), note="MultiAdapterModel")
        peft_impl = Impl("peft", peft_fn, no_grad=True, canon=peft_canon, tol=tol, check=mask is None,
                         note="PEFT: adapter_names= mixed batch (+ one call per prompt-learning adapter)"
                              + ("; not compared: under left padding PEFT's positions depend on the padding"
                                 if mask is not None else ""))
        floor = Impl("base_model", base_fn, no_grad=True, check=False)
        if s["phase"] == "prefill" and s["row"] == "mixed":
            padded = Impl("ours_padded", ours_padded_fn, no_grad=True, canon=canon, tol=tol,
                          note="MultiAdapterModel(packed=False): the padded batch, prompts right-aligned")
    else:
        new = s["new"]
        gen = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
        ours_fn = lambda: ours_m.generate(ids, mask, adapter_names=names, **gen)  # noqa: E731
        ours_padded_fn = lambda: ours_m.generate(ids, mask, adapter_names=names, packed=False, **gen)  # noqa: E731
        base_fn = lambda: base_m.generate(input_ids=ids, attention_mask=mask, **gen)  # noqa: E731
        lb_mask = None if mask is None else mask[lb_rows]
        pl_mask = {n: None if mask is None else mask[rows] for n, rows in pl_groups.items()}

        def peft_fn():
            outs = [lora_m.generate(input_ids=lb_ids, attention_mask=lb_mask, adapter_names=lb_names, **gen)]
            for n, x in pl_ids.items():
                outs.append(b["others"][n].generate(input_ids=x, attention_mask=pl_mask[n], **gen))
            return outs

        if mask is None:
            with torch.inference_mode():
                seq = ours_fn()
                try:  # PEFT's generate only feeds the notes here: its failure is the harness's to report
                    theirs, peft_err = peft_canon(peft_fn()), None
                except Exception as exc:
                    theirs, peft_err = [None] * len(groups), f"{type(exc).__name__}: {str(exc)[:150]}"
                gaps, match = {}, {}
                for (n, rows), got in zip(groups.items(), theirs):
                    x = seq[rows]
                    if n is None:
                        logits = base_m(input_ids=x[:, :-1]).logits
                    elif n in b["lora_names"]:
                        logits = lora_m(input_ids=x[:, :-1], adapter_names=[n] * len(rows)).logits
                    else:
                        logits = b["others"][n](input_ids=x[:, :-1]).logits[:, -(x.shape[1] - 1):]
                    gaps[str(n or "base")] = greedy_gap(x, s["L"], logits)
                    if got is not None:
                        same = int((got[:, -new:] == x[:, -new:]).sum().item()) if got.shape[1] >= new else 0
                        match[str(n or "base")] = f"{same}/{len(rows) * new}"
            worst = max(gaps.values())
            if not worst <= tol:
                raise AssertionError(f"ours' generated tokens are not PEFT-forward greedy (max relative logit gap "
                                     f"{worst:.3g} > {tol:g}): {gaps}")
            notes.append(f"generate: {new} new tokens (greedy) after the L-token prompt; ours checked against PEFT's "
                         f"forward teacher-forced on ours' tokens (greedy within tolerance)")
            notes.append(f"{label(s)}: ours vs PEFT-forward greedy, max relative logit gap {worst:.2g} (tol {tol:g}); "
                         + ("PEFT route generate tokens equal to ours: " + ", ".join(f"{n} {m}" for n, m in match.items())
                            if peft_err is None else f"PEFT route generate failed: {peft_err}"))
        else:
            notes.append("ragged generate: ours (packed) checked token for token against ours_padded (transformers' "
                         "generate on the left-padded batch, which counts positions from the mask)")
        ours = Impl("ours", ours_fn, no_grad=True, backend=_backend(s), note="MultiAdapterModel.generate")
        peft_impl = Impl("peft", peft_fn, no_grad=True, check=False,
                         note="not compared: PEFT's generate of prefix/prompt models is wrong with this transformers "
                              "(tokens equal to ours in the row's notes); ours checked against PEFT's forward")
        floor = Impl("base_model", base_fn, no_grad=True, check=False)
        if s["row"] == "mixed":
            padded = Impl("ours_padded", ours_padded_fn, no_grad=True,
                          note="MultiAdapterModel.generate(packed=False): transformers' generate on the padded batch")
    baselines = [peft_impl, floor]
    if s["row"] == "mixed":
        baselines.insert(1, padded)
    if "patched" in b and s["phase"] in ("prefill", "decode"):
        baselines.insert(1, Impl("peft_patched", patched_fn, no_grad=True, canon=peft_canon, tol=tol,
                                 note="the same PeftModel after peft_kernels.patch (its LoRA layers on multi_lora)"))
    if s["row"] == "lora":
        notes.append("peft (LoRA rows): one PeftModel with every adapter, model(input_ids, adapter_names=[...])")
    else:
        notes.append("peft (mixed rows): LoRA + base rows in one adapter_names= call ('__base__' for base rows), "
                     "then one call per prompt-learning adapter on its own PeftModel, one after another")
    notes.append("base_model: the model without adapters (a floor, not a numerical check)")
    shape = dict(s, tokens=tokens(s), groups={str(n): len(r) for n, r in groups.items()})
    if s["row"] == "lora":
        shape["ranks"] = _ranks(s, s["T"])
    op = "llama_multi_lora" if s["row"] == "lora" else "llama_mixed_kinds"
    return Case("e2e", op, s["mode"], shape, label(s), dtype, costs.NONE, ours, baselines, notes=notes)


def _backend(s: dict):
    if s["row"] == "lora":
        return backend_of("multi_lora")
    return backend_of("multi_lora", "prefix_attention_varlen", "soft_prompt_embed_varlen")  # packed: prompts


def _prefix_patch_case(s: dict, device, dtype, seed: int, tol: float) -> Case:
    """patch(peft prefix model) vs the same PEFT model: logits, and for fwd+bwd the prefix gradients."""
    b = _bundle(s, device, dtype, seed)
    ours_m, peft_m, base_m = b["ours"], b["peft"], b["base"]
    V = MODELS[s["model"]]["vocab_size"]
    ids = torch.randint(3, V, (s["B"], s["L"]), generator=torch.Generator().manual_seed(seed)).to(device)
    train = s["mode"] == "fwd+bwd"
    leaves = lambda m: [p for p in m.prompt_encoder.parameters()] if train else []  # noqa: E731
    ours = Impl("ours", lambda: ours_m(input_ids=ids).logits, leaves=leaves(ours_m), no_grad=not train,
                backend=backend_of("prefix_attention"), note="peft_kernels.patch(peft_model)")
    peft_impl = Impl("peft", lambda: peft_m(input_ids=ids).logits[:, -s["L"]:], leaves=leaves(peft_m),
                     no_grad=not train, tol=tol, note="PEFT's own forward (prefix as past_key_values)")
    baselines = [peft_impl]
    if not train:
        baselines.append(Impl("base_model", lambda: base_m(input_ids=ids).logits, no_grad=True, check=False))
    c = MODELS[s["model"]]
    notes = [f"{_model_label(s)} ({c['num_attention_heads']} heads / {c['num_key_value_heads']} KV heads) "
             f"prefix-tuned with P={s['P']}: ours = peft_kernels.patch(peft_model), peft = the same PEFT model; "
             + ("a training step: logits, then the gradients of the prefix parameters" if train else
                "one forward over B x L (logits)")]
    shape = dict(s, tokens=tokens(s))
    return Case("e2e", "llama_prefix_patch", s["mode"], shape, label(s), dtype, costs.NONE, ours, baselines,
                notes=notes)


def _prefix_cache_case(s: dict, device, dtype, seed: int, tol: float) -> Case:
    import transformers

    b = _bundle(s, device, dtype, seed)
    ours_m, peft_m, base_m = b["ours"], b["peft"], b["base"]
    B, L, P, new = s["B"], s["L"], s["P"], s["new"]
    c = MODELS[s["model"]]
    V, layers, Hkv = c["vocab_size"], c["num_hidden_layers"], c["num_key_value_heads"]
    D = c["hidden_size"] // c["num_attention_heads"]
    es = torch.empty((), dtype=dtype).element_size()
    ids = torch.randint(3, V, (B, L), generator=torch.Generator().manual_seed(seed)).to(device)
    gen = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
    with torch.inference_mode():
        o = ours_m.generate(input_ids=ids, return_dict_in_generate=True, **gen)
        ours_cache, seq = cache_stats(_cache_of(o)), o.sequences
        prefill_cache = cache_stats(_cache_of(peft_m(input_ids=ids, use_cache=True)))
        gap = greedy_gap(seq, L, peft_m(input_ids=seq[:, :-1]).logits[:, -(seq.shape[1] - 1):])
        try:  # PEFT's own generate: measured for the notes; its failure is the harness's to report
            p = peft_m.generate(input_ids=ids, return_dict_in_generate=True, **gen)
            peft_cache, peft_err = cache_stats(_cache_of(p)), None
            same = int((p.sequences[:, L:] == seq[:, L:]).sum().item())
            del p
        except Exception as exc:
            peft_cache, same = {"bytes": None, "slots_per_layer": None}, None
            peft_err = f"{type(exc).__name__}: {str(exc)[:150]}"
        del o
    if not gap <= tol:
        raise AssertionError(f"patched generate is not PEFT-forward greedy (max relative logit gap {gap:.3g} > "
                             f"{tol:g})")
    slot = layers * 2 * Hkv * D * es  # bytes per cached position per row, all layers, K and V
    kv = {
        "ours_bytes": ours_cache["bytes"], "ours_slots_per_layer": ours_cache["slots_per_layer"],
        "peft_generate_bytes": peft_cache["bytes"], "peft_generate_slots_per_layer": peft_cache["slots_per_layer"],
        "peft_prefill_bytes": prefill_cache["bytes"], "peft_prefill_slots_per_layer": prefill_cache["slots_per_layer"],
        "expected_ours_bytes": B * (L + new - 1) * slot, "expected_ours_slots_per_layer": B * (L + new - 1),
        "expected_peft_bytes": B * (P + L + new - 1) * slot, "expected_peft_slots_per_layer": B * (P + L + new - 1),
        "expected_peft_prefill_bytes": B * (P + L) * slot,
        "peft_generate_holds_prefix": (None if peft_err else peft_cache["slots_per_layer"] == B * (P + L + new - 1)),
        "peft_generate_tokens_equal_ours": None if peft_err else f"{same}/{B * new}",
        "peft_generate_error": peft_err,
    }
    lost = "" if kv["peft_generate_holds_prefix"] is not False else (
        f" - PEFT's generate LOST the prefix here (known PEFT bug with recent transformers, here "
        f"{transformers.__version__}: PEFT injects the prefix as `past_key_values`, which generate drops in favour of "
        f"its own `cache`; so its cache has no prefix slots and its tokens are not prefix-tuned)")
    kib = lambda n: f"{n / 1024:,.1f} KiB"  # noqa: E731
    notes = [
        f"{_model_label(s)} prefix-tuned with P={P}: generate {new} new tokens (greedy) for B x L prompts; ours = "
        f"peft_kernels.patch(peft_model) (prefix read by the attention kernel), peft = PEFT's own generate "
        f"(prefix in the KV cache), base_model = no adapter",
        f"{label(s)}: KV cache after generate: ours {kib(kv['ours_bytes'])} ({kv['ours_slots_per_layer']} slots/layer; "
        f"expected B*(L+new-1) = {kv['expected_ours_slots_per_layer']}: {kib(kv['expected_ours_bytes'])}); PEFT "
        + (f"generate FAILED ({peft_err}), expected B*(P+L+new-1) = {kv['expected_peft_slots_per_layer']} slots/layer: "
           f"{kib(kv['expected_peft_bytes'])}" if peft_err else
           f"generate {kib(kv['peft_generate_bytes'])} ({kv['peft_generate_slots_per_layer']} slots/layer; expected "
           f"B*(P+L+new-1) = {kv['expected_peft_slots_per_layer']}: {kib(kv['expected_peft_bytes'])}){lost}")
        + "; PEFT "
        f"prefill forward cache {kib(kv['peft_prefill_bytes'])} ({kv['peft_prefill_slots_per_layer']} slots/layer = "
        f"B*(P+L))",
        f"{label(s)}: ours vs PEFT-forward greedy, max relative logit gap {gap:.2g} (tol {tol:g}); PEFT generate "
        f"tokens equal to ours: {kv['peft_generate_tokens_equal_ours'] or 'n/a (it failed)'}",
    ]
    ours = Impl("ours", lambda: ours_m.generate(input_ids=ids, **gen), no_grad=True,
                backend=backend_of("prefix_attention"), note="peft_kernels.patch(peft_model).generate")
    peft_impl = Impl("peft", lambda: peft_m.generate(input_ids=ids, **gen), no_grad=True, check=False,
                     note="PEFT's own generate (not compared: see the row's notes)")
    floor = Impl("base_model", lambda: base_m.generate(input_ids=ids, **gen), no_grad=True, check=False)
    shape = dict(s, tokens=tokens(s), kv_cache=kv)
    return Case("e2e", "llama_prefix_generate", s["mode"], shape, label(s), dtype, costs.NONE, ours,
                [peft_impl, floor], notes=notes)


# ----------------------------------------------------------------------------- derived numbers


def derived(row: dict) -> Optional[dict]:
    """Throughput numbers of an e2e row (from its JSON): tokens/s, speed-up, ratio vs base, overhead ratio.

    ``overhead_ratio`` = (PEFT ms - base ms) / (ours ms - base ms): how many times more time PEFT
    adds to the base model than ours; None when ours is not slower than the base model (within
    noise the ratio means nothing).
    """
    shape, o = row["shape"], row["ours"]
    if row.get("suite") != "e2e" or "tokens" not in shape or not o.get("median_ms"):
        return None
    ms = {"ours": o["median_ms"]}
    for n in ("peft", "base_model", "ours_padded"):
        e = row["baselines"].get(n, {})
        ms[n] = e.get("median_ms") if e.get("status") == "ok" else None
    tps = {n: (shape["tokens"] / (v * 1e-3) if v else None) for n, v in ms.items()}
    out = {"tokens": shape["tokens"], "ms": ms, "tokens_per_s": tps,
           "speedup_vs_peft": ms["peft"] / ms["ours"] if ms["peft"] else None,
           "ratio_vs_base": ms["base_model"] / ms["ours"] if ms["base_model"] else None,
           "speedup_vs_padded": ms["ours_padded"] / ms["ours"] if ms["ours_padded"] else None,
           "overhead_ratio": None}
    if ms["peft"] and ms["base_model"] and ms["ours"] > ms["base_model"]:
        out["overhead_ratio"] = (ms["peft"] - ms["base_model"]) / (ms["ours"] - ms["base_model"])
    return out


def summary(rows: list[dict]) -> str:
    """Markdown: one line per e2e row with :func:`derived`'s numbers, then the KV cache rows."""
    def f(x, fmt=",.0f"):
        return "" if x is None else format(x, fmt)

    lines = ["| shape | tokens/call | ours tok/s | peft tok/s | base tok/s | speed-up vs PEFT | ours / base "
             "throughput | speed-up vs ours padded | overhead ratio (PEFT added / ours added) |", "|" + "---|" * 9]
    cache = []
    for r in rows:
        d = derived(r)
        if d is None:
            continue
        t = d["tokens_per_s"]
        lines.append(f"| {r['shape_label']} | {d['tokens']} | {f(t['ours'])} | {f(t['peft'])} | {f(t['base_model'])} "
                     f"| {f(d['speedup_vs_peft'], '.2f')} | {f(d['ratio_vs_base'], '.2f')} "
                     f"| {f(d['speedup_vs_padded'], '.2f')} "
                     f"| {f(d['overhead_ratio'], '.2f') or 'n/a (ours not above base)'} |")
        kv = r["shape"].get("kv_cache")
        if kv:
            holds = {True: "yes", False: "NO (prefix lost)", None: "n/a (PEFT generate failed)"}
            peft_gen = ("failed" if kv["peft_generate_bytes"] is None else
                        f"{kv['peft_generate_bytes']:,} ({kv['peft_generate_slots_per_layer']})")
            cache.append(f"| {r['shape_label']} | {kv['ours_bytes']:,} ({kv['ours_slots_per_layer']}) | "
                         f"{kv['expected_ours_bytes']:,} ({kv['expected_ours_slots_per_layer']}) | {peft_gen} | "
                         f"{kv['expected_peft_bytes']:,} ({kv['expected_peft_slots_per_layer']}) | "
                         f"{kv['peft_prefill_bytes']:,} ({kv['peft_prefill_slots_per_layer']}) | "
                         f"{holds[kv['peft_generate_holds_prefix']]} |")
    if cache:
        lines += ["", "| KV cache after generate, bytes (slots/layer) | ours | ours expected B(L+new-1) "
                  "| PEFT generate | PEFT expected B(P+L+new-1) | PEFT prefill forward B(P+L) "
                  "| PEFT generate holds the prefix |",
                  "|" + "---|" * 7] + cache
    return "\n".join(lines) + "\n"
