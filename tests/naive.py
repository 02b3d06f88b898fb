"""Per-row Python loops written straight from the op contracts: the oracle the reference is checked against.

Deliberately slow and obvious: one row, one head, one query at a time, in float64.
"""
from __future__ import annotations

import torch


def _entry(index, b, entries):
    if index is None:
        return 0 if entries == 1 else b
    return int(index[b])


def prefix_attention(q, k, v, prefix_k, prefix_v, prefix_index=None, prefix_lens=None,
                     key_padding_mask=None, causal=True, softmax_scale=None):
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    T, _, P, _ = prefix_k.shape
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    out = torch.zeros(B, Hq, Lq, D, dtype=torch.float64)
    lse = torch.full((B, Hq, Lq), float("-inf"), dtype=torch.float64)
    for b in range(B):
        t = _entry(prefix_index, b, T)
        n_prefix = 0 if t < 0 else (P if prefix_lens is None else int(prefix_lens[t]))
        for h in range(Hq):
            g = h // (Hq // Hkv)
            for i in range(Lq):
                keys, vals = [], []
                for p in range(n_prefix):
                    keys.append(prefix_k[t, g, p]); vals.append(prefix_v[t, g, p])
                for j in range(Lk):
                    if key_padding_mask is not None and not bool(key_padding_mask[b, j]):
                        continue
                    if causal and j > i + Lk - Lq:
                        continue
                    keys.append(k[b, g, j]); vals.append(v[b, g, j])
                if not keys:
                    continue
                s = torch.stack([q[b, h, i].double() @ key.double() for key in keys]) * scale
                row_lse = torch.logsumexp(s, 0)
                w = torch.exp(s - row_lse)
                lse[b, h, i] = row_lse
                out[b, h, i] = sum(wi * val.double() for wi, val in zip(w, vals))
    return out, lse


def multi_lora(x, lora_a, lora_b, adapter_index, scaling, ranks=None, base=None):
    N = x.shape[0]
    T, R, _ = lora_a.shape
    H_out = lora_b.shape[1]
    y = torch.zeros(N, H_out, dtype=torch.float64)
    for n in range(N):
        if base is not None:
            y[n] = base[n].double()
        t = _entry(adapter_index, n, T)
        if t < 0:
            continue
        r = R if ranks is None else int(ranks[t])
        h = lora_a[t, :r].double() @ x[n].double()
        y[n] += float(scaling[t]) * (lora_b[t, :, :r].double() @ h)
    return y


def soft_prompt_concat(embeds, prompts, prompt_index=None, prompt_lens=None, insert_at=0, replace=False):
    B, L, H = embeds.shape
    T, P, _ = prompts.shape
    rows = []
    for b in range(B):
        t = _entry(prompt_index, b, T)
        n = 0 if t < 0 else (P if prompt_lens is None else int(prompt_lens[t]))
        seq = [embeds[b, s] for s in range(insert_at)]
        seq += [prompts[t, p] if p < n else torch.zeros(H, dtype=prompts.dtype) for p in range(P)]
        seq += [embeds[b, s] for s in range(insert_at + (P if replace else 0), L)]
        rows.append(torch.stack(seq))
    return torch.stack(rows)


def soft_prompt_embed(input_ids, weight, prompts, prompt_index=None, prompt_lens=None, insert_at=0):
    embeds = torch.stack([torch.stack([weight[int(i)] for i in row]) for row in input_ids])
    return soft_prompt_concat(embeds, prompts, prompt_index, prompt_lens, insert_at)


def soft_prompt_mask(attention_mask, prompt_len, num_prompts=1, prompt_index=None, prompt_lens=None,
                     insert_at=0, replace=False):
    B, L = attention_mask.shape
    rows = []
    for b in range(B):
        t = _entry(prompt_index, b, num_prompts)
        n = 0 if t < 0 else (prompt_len if prompt_lens is None else int(prompt_lens[t]))
        row = [int(attention_mask[b, s]) for s in range(insert_at)]
        row += [1 if p < n else 0 for p in range(prompt_len)]
        row += [int(attention_mask[b, s]) for s in range(insert_at + (prompt_len if replace else 0), L)]
        rows.append(row)
    return torch.tensor(rows, dtype=attention_mask.dtype)
