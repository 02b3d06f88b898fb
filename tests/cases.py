"""Small, odd-shaped argument sets per op, shared by the reference, gradient, opcheck,
compile and backend-parity tests. Each case is (id, args) with args in the reference
function's positional order (which is also the registered op's order)."""
from __future__ import annotations

import torch

I32, I64 = torch.int32, torch.int64


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen, *shape, dtype):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def prefix_attention(dtype=torch.float32):
    """(id, (q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, key_padding_mask, causal, scale))."""
    specs = [
        # id, B, Hq, Hkv, Lq, Lk, D, T, P, index, lens, padding, causal
        ("mha-shared", 2, 2, 2, 5, 5, 8, 1, 3, None, None, None, True),
        ("gqa-per-row-rightpad", 2, 4, 2, 4, 4, 6, 2, 4, None, [2, 4], "right", True),
        ("mqa-indexed-leftpad-bidir", 3, 3, 1, 3, 6, 5, 3, 2, [2, -1, 0], [0, 2, 1], "left", False),
        ("decode-lq1", 2, 4, 2, 1, 7, 8, 2, 1, [1, 0], None, "left", True),
        ("empty-queries", 2, 2, 1, 4, 2, 4, 1, 2, [-1, 0], None, None, True),
        ("lq-lt-lk-int32", 2, 2, 2, 2, 5, 3, 2, 3, [1, -1], [3, 1], "right", True),
    ]
    out = []
    for n, (cid, B, Hq, Hkv, Lq, Lk, D, T, P, index, lens, pad, causal) in enumerate(specs):
        g = _g(n)
        q = _randn(g, B, Hq, Lq, D, dtype=dtype)
        k = _randn(g, B, Hkv, Lk, D, dtype=dtype)
        v = _randn(g, B, Hkv, Lk, D, dtype=dtype)
        pk = _randn(g, T, Hkv, P, D, dtype=dtype)
        pv = _randn(g, T, Hkv, P, D, dtype=dtype)
        idx_dtype = I32 if "int32" in cid else I64
        index_t = None if index is None else torch.tensor(index, dtype=idx_dtype)
        lens_t = None if lens is None else torch.tensor(lens, dtype=idx_dtype)
        mask = None
        if pad is not None:
            mask = torch.ones(B, Lk, dtype=torch.bool)
            if pad == "right":
                mask[0, Lk - 1 :] = False
            else:
                mask[-1, :2] = False
        out.append((cid, (q, k, v, pk, pv, index_t, lens_t, mask, causal, D**-0.5 * (1.5 if n == 2 else 1.0))))
    return out


def multi_lora(dtype=torch.float32):
    """(id, (x, lora_a, lora_b, adapter_index, scaling, ranks, base))."""
    specs = [
        # id, N, H_in, H_out, T, R, index, ranks, base
        ("single-adapter", 5, 8, 6, 1, 4, None, None, False),
        ("one-per-row", 3, 7, 9, 3, 2, None, None, True),
        ("mixed-ranks-neg-rows", 7, 6, 5, 3, 4, [0, 2, -1, 1, 0, 2, 2], [4, 2, 3], True),
        ("idle-adapter-int32", 6, 9, 4, 4, 3, [3, 3, 3, 0, 0, 3], [1, 3, 2, 3], False),
        ("all-none", 4, 5, 3, 2, 2, [-1, -1, -1, -1], None, True),
        ("empty-batch", 0, 5, 3, 2, 2, [], [2, 1], True),
    ]
    out = []
    for n, (cid, N, H_in, H_out, T, R, index, ranks, base) in enumerate(specs):
        g = _g(100 + n)
        idx_dtype = I32 if "int32" in cid else I64
        args = (
            _randn(g, N, H_in, dtype=dtype),
            _randn(g, T, R, H_in, dtype=dtype),
            _randn(g, T, H_out, R, dtype=dtype),
            None if index is None else torch.tensor(index, dtype=idx_dtype),
            torch.tensor([0.5, 2.0, 1.0, 0.25][:T], dtype=torch.float32),
            None if ranks is None else torch.tensor(ranks, dtype=idx_dtype),
            _randn(g, N, H_out, dtype=dtype) if base else None,
        )
        out.append((cid, args))
    return out


def _prompt_specs():
    # id, B, L, H, T, P, index, lens, insert_at
    return [
        ("shared-front", 2, 4, 5, 1, 3, None, None, 0),
        ("per-row-middle", 3, 5, 7, 3, 2, None, [2, 0, 1], 2),
        ("indexed-neg-end-int32", 3, 3, 4, 2, 4, [1, -1, 0], [4, 2], 3),
        ("cls-slot", 2, 6, 3, 3, 2, [2, 2], None, 1),
    ]


def soft_prompt_embed(dtype=torch.float32, V=11):
    """(id, (input_ids, weight, prompts, prompt_index, prompt_lens, insert_at))."""
    out = []
    for n, (cid, B, L, H, T, P, index, lens, at) in enumerate(_prompt_specs()):
        g = _g(200 + n)
        idx_dtype = I32 if "int32" in cid else I64
        ids = torch.randint(0, V, (B, L), generator=g).to(idx_dtype)
        out.append((cid, (
            ids, _randn(g, V, H, dtype=dtype), _randn(g, T, P, H, dtype=dtype),
            None if index is None else torch.tensor(index, dtype=idx_dtype),
            None if lens is None else torch.tensor(lens, dtype=idx_dtype), at,
        )))
    return out


def soft_prompt_concat(dtype=torch.float32):
    """(id, (embeds, prompts, prompt_index, prompt_lens, insert_at, replace))."""
    out = []
    for n, (cid, B, L, H, T, P, index, lens, at) in enumerate(_prompt_specs()):
        for replace in (False, True):
            if replace and at + P > L:
                continue
            g = _g(300 + n)
            idx_dtype = I32 if "int32" in cid else I64
            out.append((f"{cid}-{'replace' if replace else 'insert'}", (
                _randn(g, B, L, H, dtype=dtype), _randn(g, T, P, H, dtype=dtype),
                None if index is None else torch.tensor(index, dtype=idx_dtype),
                None if lens is None else torch.tensor(lens, dtype=idx_dtype), at, replace,
            )))
    return out


def soft_prompt_mask():
    """(id, (attention_mask, prompt_len, num_prompts, prompt_index, prompt_lens, insert_at, replace))."""
    out = []
    for cid, B, L, H, T, P, index, lens, at in _prompt_specs():
        mask = torch.ones(B, L, dtype=torch.long)
        mask[0, 0] = 0  # left padding on row 0
        for replace in (False, True):
            if replace and at + P > L:
                continue
            idx = None if index is None else torch.tensor(index)
            out.append((f"{cid}-{replace}", (mask, P, T, idx, None if lens is None else torch.tensor(lens), at, replace)))
    return out


def ids(cases):
    return [c[0] for c in cases]


def call_public(op: str, args, **extra):
    """Call the validated public API of ``op`` with a case's positional args."""
    import peft_kernels as pk

    if op == "prefix_attention":
        q, k, v, pk_, pv, index, lens, mask, causal, scale = args
        return pk.prefix_attention(q, k, v, pk_, pv, prefix_index=index, prefix_lens=lens,
                                   key_padding_mask=mask, causal=causal, softmax_scale=scale, **extra)
    if op == "multi_lora":
        x, a, b, index, scaling, ranks, base = args
        return pk.multi_lora(x, a, b, index, scaling, ranks=ranks, base=base, **extra)
    if op == "soft_prompt_embed":
        ids_, w, prompts, index, lens, at = args
        return pk.soft_prompt_embed(ids_, w, prompts, prompt_index=index, prompt_lens=lens, insert_at=at, **extra)
    if op == "soft_prompt_concat":
        e, prompts, index, lens, at, replace = args
        return pk.soft_prompt_concat(e, prompts, prompt_index=index, prompt_lens=lens, insert_at=at,
                                     replace=replace, **extra)
    if op == "soft_prompt_mask":
        m, P, T, index, lens, at, replace = args
        return pk.soft_prompt_mask(m, P, num_prompts=T, prompt_index=index, prompt_lens=lens, insert_at=at,
                                   replace=replace, **extra)
    raise KeyError(op)


# Differentiable ops: which positional args are floating inputs that get gradients.
DIFF_ARGS = {
    "prefix_attention": (0, 1, 2, 3, 4),
    "multi_lora": (0, 1, 2, 6),
    "soft_prompt_embed": (1, 2),
    "soft_prompt_concat": (0, 1),
}
CASES = {
    "prefix_attention": prefix_attention,
    "multi_lora": multi_lora,
    "soft_prompt_embed": soft_prompt_embed,
    "soft_prompt_concat": soft_prompt_concat,
}
