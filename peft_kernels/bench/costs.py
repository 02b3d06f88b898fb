"""Bytes and FLOPs each benchmarked call must move / compute at minimum (the roofline's work).

The same numbers are used for ours and for every baseline of a row, so "achieved TB/s" is the
work done per second, not the traffic an implementation happened to cause: a baseline that
copies the prefix per batch row moves more bytes than this model counts, and shows a lower
achieved TB/s for it. ``es`` is the element size in bytes.

prefix_attention (fwd)
    FLOPs = 4 * B * Hq * Lq * (P_used + Lk_visible) * D: QK^T and PV, 2 FLOPs per MAC.
    Lk_visible is the mean number of sequence keys a query sees: Lk when not causal; with the
    bottom-right causal mask query i sees i + Lk - Lq + 1 keys, so Lk - (Lq - 1) / 2.
    Bytes = (q + out) * B*Hq*Lq*D*es + (k + v) * B*Hkv*Lk*D*es + the distinct prefix bank
    entries read once: 2 * n_distinct * Hkv * P * D * es (the softmax lse is not counted).
prefix_attention (fwd+bwd)
    FLOPs = 3.5 x fwd (backward = 2.5 x forward: five matmuls instead of two, the
    FlashAttention convention; recomputing the scores is not counted as useful work).
    Bytes = fwd + backward's reads (q, k, v, out, dout) and writes (dq, dk, dv, the distinct
    prefix entries' grads).
multi_lora (fwd)
    FLOPs = sum over rows of 2 * r_row * (H_in + H_out) (r_row = the row's adapter's real rank;
    rank padding and -1 rows cost nothing).
    Bytes = distinct adapters' weights at their real ranks: sum_t r_t * (H_in + H_out) * es,
    + x (N*H_in*es) + y (N*H_out*es) + base (N*H_out*es, read once when given).
multi_lora (fwd+bwd)
    FLOPs = 3 x fwd (dx, dA, dB: each as many MACs as the forward's two products).
    Bytes = fwd + dy read, x read again, dx written, the distinct adapters' weights read again
    and their grads written.
soft_prompt_embed / soft_prompt_concat (fwd)
    FLOPs = 0 (a copy; TFLOP/s and FLOP % stay empty, the roofline % is the bandwidth %).
    Bytes = token rows read (B*L*H*es: embedding rows, or ``embeds``) + the distinct prompts'
    rows read (n_distinct * P * H * es) + the output written (B * S * H * es, S = L + P, or L
    with replace=True) + token ids (B*L*8, embed only).
soft_prompt_* (fwd+bwd)
    Bytes = fwd + the prompt slots of dout read (B*P*H*es) + dprompts written (n_distinct*P*H*es)
    (+ dembeds for concat: B*L*H*es read and written); FLOPs: the prompt-grad sums, B*P*H adds.
e2e (a whole model step)
    No model: time only (ratios are still exact, % of peak is left empty).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Cost:
    bytes: Optional[int]
    flops: Optional[int]
    model: str  # which formula (shown in the JSON)


def _visible(Lq: int, Lk: int, causal: bool) -> float:
    if not causal:
        return float(Lk)
    # mean over i in [0, Lq) of clamp(i + Lk - Lq + 1, 0, Lk)
    total = sum(min(max(i + Lk - Lq + 1, 0), Lk) for i in range(Lq)) if Lq <= 4096 else Lq * (Lk - (Lq - 1) / 2)
    return total / Lq


def prefix_attention(B, Hq, Hkv, Lq, Lk, P, D, es, n_distinct, causal=True, backward=False) -> Cost:
    fwd_flops = 4 * B * Hq * Lq * (P + _visible(Lq, Lk, causal)) * D
    q_bytes = B * Hq * Lq * D * es
    kv_bytes = B * Hkv * Lk * D * es
    bank = 2 * n_distinct * Hkv * P * D * es
    fwd_bytes = 2 * q_bytes + 2 * kv_bytes + bank
    if not backward:
        return Cost(int(fwd_bytes), int(fwd_flops), "prefix fwd: 4*B*Hq*Lq*(P+Lk_visible)*D; q,k,v,out + distinct prefixes")
    bwd_bytes = 3 * q_bytes + 2 * kv_bytes + q_bytes + 2 * kv_bytes + 2 * bank  # reads q,out,dout,k,v; writes dq,dk,dv; bank+grads
    return Cost(int(fwd_bytes + bwd_bytes), int(3.5 * fwd_flops),
                "prefix fwd+bwd: 3.5x fwd FLOPs; fwd bytes + (q,out,dout,k,v read; dq,dk,dv written; prefixes + grads)")


def multi_lora(row_ranks: list[int], distinct_ranks: list[int], H_in, H_out, es, has_base=True, backward=False) -> Cost:
    N = len(row_ranks)
    fwd_flops = sum(2 * r * (H_in + H_out) for r in row_ranks)
    weights = sum(r * (H_in + H_out) for r in distinct_ranks) * es
    fwd_bytes = weights + N * H_in * es + N * H_out * es + (N * H_out * es if has_base else 0)
    if not backward:
        return Cost(fwd_bytes, fwd_flops, "lora fwd: 2*r_row*(H_in+H_out) per row; distinct adapters (real ranks) + x + y + base")
    bwd_bytes = N * H_out * es + 2 * N * H_in * es + 2 * weights
    return Cost(fwd_bytes + bwd_bytes, 3 * fwd_flops,
                "lora fwd+bwd: 3x fwd FLOPs; fwd bytes + dy, x, dx, weights read again, weight grads written")


def soft_prompt(B, L, P, H, es, n_distinct, replace=False, embed=True, backward=False) -> Cost:
    S = L if replace else L + P
    fwd_bytes = B * L * H * es + n_distinct * P * H * es + B * S * H * es + (B * L * 8 if embed else 0)
    if not backward:
        return Cost(fwd_bytes, 0, "prompt fwd: token rows read + distinct prompt rows + output written")
    bwd_bytes = B * P * H * es + n_distinct * P * H * es + (0 if embed else 2 * B * L * H * es)
    return Cost(fwd_bytes + bwd_bytes, B * P * H,
                "prompt fwd+bwd: fwd bytes + prompt slots of dout read + dprompts written (+ dembeds)")


NONE = Cost(None, None, "no bytes/FLOPs model (whole-model time only)")
