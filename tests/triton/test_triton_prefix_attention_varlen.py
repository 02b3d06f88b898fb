"""Triton ``prefix_attention_varlen`` kernels (interpreter on CPU) vs ``peft_kernels.reference``.

Forward (out, lse [Hq, Nq]) and all five gradients through the public op, over packed batches with
empty sequences, Lq_s < Lk_s and Lq_s > Lk_s, decode steps (split-K over ragged key lengths), GQA /
MQA / MHA, odd head dims, -1 sequences and short prefix lengths, banks with index None (T == 1 and
T == S), causal or not, and ``[1, H, N, D]`` tensors passed as ``[0].transpose(0, 1)`` views.
Shapes are tiny: the interpreter is slow.
"""
from __future__ import annotations

import pytest
import torch

import peft_kernels
from peft_kernels import reference
from peft_kernels.ops import _dispatch
from test_triton_prefix_attention import (
    _assert_backward_deterministic, _assert_grads_close, _bank_args, _fwd_tol, _randn,
)

tv = pytest.importorskip("peft_kernels.triton.prefix_attention_varlen")

CPU = torch.device("cpu")
OP = "prefix_attention_varlen"

# id: (per-sequence (Lq, Lk), Hq, Hkv, D, T, P, index, lens, causal)
CASES = {
    "gqa-d24-shared-T1-empty-seq": ([(3, 5), (0, 4), (4, 4), (1, 6)], 4, 2, 24, 1, 3, None, None, True),
    "mqa-d40-indexed-neg-lq-gt-lk": ([(2, 7), (5, 3), (0, 0)], 4, 1, 40, 3, 4, [2, -1, 0], [4, 0, 2], True),
    "mha-T==S-bidir": ([(3, 3), (2, 5)], 2, 2, 24, 2, 2, None, [1, 2], False),
    "decode-lq1-ragged-gqa": ([(1, 9), (1, 0), (1, 4), (0, 3)], 4, 2, 24, 2, 3, [1, -1, 0, 0], None, True),
    "decode-lq1-mqa-bidir-int32": ([(1, 6), (1, 2)], 4, 1, 40, 1, 2, "int32:[0, -1]", None, False),
    "lq2-decode-split-causal": ([(2, 5), (1, 1), (2, 2)], 4, 2, 24, 2, 3, [-1, 1, 0], [3, 1], True),
    "one-seq-empty-bank": ([(4, 6)], 2, 1, 24, 1, 0, None, None, True),
    "head-dim-8-no-visible-key": ([(3, 1), (2, 2)], 2, 1, 8, 1, 2, [-1, 0], [1], True),
}
DECODE = ("decode-lq1-ragged-gqa", "decode-lq1-mqa-bidir-int32", "lq2-decode-split-causal")


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32)


def _make(case, dtype, seed=0):
    """The custom op's forward arguments for a case (q, k, v contiguous packed tensors)."""
    seqs, Hq, Hkv, D, T, P, index, lens, causal = case
    randn = _randn(dtype, seed)
    lq, lk = [a for a, _ in seqs], [b for _, b in seqs]
    q, k, v = randn(sum(lq), Hq, D), randn(sum(lk), Hkv, D), randn(sum(lk), Hkv, D)
    pk, pv = randn(T, Hkv, P, D), randn(T, Hkv, P, D)
    index_t, lens_t = _bank_args(index, lens)
    return (q, k, v, pk, pv, _cu(lq), _cu(lk), max(lq), max(lk), index_t, lens_t, causal, D**-0.5)


def _run_public(args, grad_out=None, leaves=None):
    """Forward (and backward if grad_out) through the public op; returns out, lse, grads."""
    q, k, v, pk, pv, cu_q, cu_k, max_q, max_k, index, lens, causal, scale = args
    if leaves is None:
        leaves = [t.detach().clone().requires_grad_(grad_out is not None) for t in (q, k, v, pk, pv)]
    out, lse = peft_kernels.ops.prefix_attention_varlen(
        *leaves, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k, prefix_index=index,
        prefix_lens=lens, causal=causal, softmax_scale=scale, return_lse=True,
    )
    grads = None
    if grad_out is not None:
        out.backward(grad_out)
        grads = [t.grad for t in leaves]
    return out.detach(), lse, grads


def _check_against_reference(args, grad_out, dtype, tag=""):
    assert _dispatch.select(OP, CPU, *args)[0] == "triton"
    ref_out, ref_lse = reference.prefix_attention_varlen(*args)
    assert _dispatch.select(f"{OP}_backward", CPU, grad_out, *args, ref_out, ref_lse)[0] == "triton"
    out, lse, grads = _run_public(args, grad_out)
    assert out.dtype == dtype and out.is_contiguous() and lse.dtype == torch.float32
    assert lse.shape == (args[0].shape[1], args[0].shape[0])
    torch.testing.assert_close(out, ref_out, **_fwd_tol(dtype))
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5)  # -inf where nothing is seen
    _assert_grads_close(grads, reference.prefix_attention_varlen_backward(grad_out, *args), dtype, tag)
    return out, lse, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("cid", list(CASES))
def test_forward_backward_matches_reference(triton_interpret, cid, dtype):
    args = _make(CASES[cid], dtype)
    grad_out = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    _check_against_reference(args, grad_out, dtype, cid)


def test_no_visible_key_gives_zero_and_neg_inf(triton_interpret):
    """Sequence 0 (-1 prefix, Lq 3 > Lk 1, causal): its first two queries see nothing."""
    args = _make(CASES["head-dim-8-no-visible-key"], torch.float32)
    out, lse, _ = _run_public(args)
    assert torch.all(out[:2] == 0) and torch.all(torch.isneginf(lse[:, :2]))
    assert torch.all(torch.isfinite(lse[:, 2:]))


def test_decode_cases_take_split_k_path():
    """The decode cases above run on the split-K kernels; a prefill case does not."""
    for cid in DECODE:
        seqs, Hq, Hkv, D, T, P = CASES[cid][:6]
        max_q, max_k, Nk = max(a for a, _ in seqs), max(b for _, b in seqs), sum(b for _, b in seqs)
        splits, split_len = tv.num_splits(len(seqs), Hkv, Hq // Hkv, P, max_q, max_k, Nk, CPU)
        assert splits > 1 and splits * split_len >= P + max_k, cid
    seqs, Hq, Hkv, D, T, P = CASES["gqa-d24-shared-T1-empty-seq"][:6]
    assert tv.num_splits(len(seqs), Hkv, Hq // Hkv, P, 4, 6, 19, CPU)[0] == 1


def test_split_length_follows_the_batch_not_the_longest_sequence():
    """Ragged decode: the split length comes from the total key count, so one long sequence among short
    ones gets many splits; many sequences (enough programs already) are not split."""
    one_long = tv.num_splits(4, 1, 1, 0, 1, 64, 64 + 3 * 4, CPU)
    assert one_long[0] >= 8 and one_long[0] * one_long[1] >= 64
    assert tv.num_splits(64, 2, 4, 8, 1, 64, 64 * 32, CPU) == (1, 72)
    assert tv.num_splits(2, 1, 1, 0, 3, 64, 128, CPU) == (1, 64)  # query blocks too long for the decode path


@pytest.mark.parametrize("cid", ["gqa-d24-shared-T1-empty-seq", "mqa-d40-indexed-neg-lq-gt-lk", "mha-T==S-bidir"])
def test_forced_split_k_matches_reference(triton_interpret, monkeypatch, cid):
    """Split-K on longer query blocks too (causal band, prefix cut, splits past short sequences' ends)."""
    monkeypatch.setattr(tv, "num_splits", lambda S, Hkv, G, P, mq, mk, Nk, dev: (-(-(P + mk) // 3), 3))
    args = _make(CASES[cid], torch.float32, seed=3)
    out, lse, _ = _run_public(args)
    ref_out, ref_lse = reference.prefix_attention_varlen(*args)
    torch.testing.assert_close(out, ref_out, **_fwd_tol(torch.float32))
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5)


def test_strided_views_of_padded_layout(triton_interpret):
    """q, k, v as ``x[0].transpose(0, 1)`` of [1, H, N, D] tensors (the model layer's call), a
    transposed bank: read through the strides, same results as contiguous inputs."""
    args = list(_make(CASES["gqa-d24-shared-T1-empty-seq"], torch.float32, seed=5))
    views = [t.transpose(0, 1).contiguous().unsqueeze(0)[0].transpose(0, 1) for t in args[:3]]
    assert all(not t.is_contiguous() and t.stride(-1) == 1 for t in views)
    views.append(args[3].transpose(0, 1).contiguous().transpose(0, 1))
    args[:4] = views
    args = tuple(args)
    grad_out = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(6))
    _check_against_reference(args, grad_out, torch.float32, "strided")
    out, lse = tv.prefix_attention_varlen_fwd(*args)  # the launcher itself, no copies before it
    torch.testing.assert_close(out, reference.prefix_attention_varlen(*args)[0], **_fwd_tol(torch.float32))


def test_no_queries_at_all(triton_interpret):
    """Every sequence empty on the query side: empty outputs, zero grads."""
    args = _make(([(0, 3), (0, 2)], 4, 2, 16, 1, 2, None, None, True), torch.float32)
    leaves = [t.detach().clone().requires_grad_() for t in args[:5]]
    out, lse, grads = _run_public(args, torch.zeros(0, 4, 16), leaves)
    assert out.shape == (0, 4, 16) and lse.shape == (4, 0)
    assert all(torch.all(g == 0) for g in grads)


def test_backward_deterministic(triton_interpret):
    """A prefix shared by several sequences and query heads: two backward runs give bitwise-equal grads."""
    case = ([(3, 4), (2, 6), (4, 4), (1, 5)], 4, 2, 40, 3, 5, [2, 2, -1, 2], [1, 2, 5], True)
    args = _make(case, torch.float16)
    grad_out = torch.randn(args[0].shape).to(torch.float16)
    _assert_backward_deterministic(_run_public, args, grad_out)


def test_supports_reasons(monkeypatch):
    cu = torch.tensor([0, 3], dtype=torch.int32)
    q, k, pk = torch.randn(3, 2, 320), torch.randn(3, 1, 320), torch.randn(1, 1, 2, 320)
    assert "head dim" in tv.supports(q, k, k, pk, pk, cu, cu, 3, 3, None, None, True, 1.0)
    q64, k64, pk64 = (t[..., :16].double() for t in (q, k, pk))
    assert "dtype" in tv.supports(q64, k64, k64, pk64, pk64, cu, cu, 3, 3, None, None, True, 1.0)
    many = torch.zeros(70000, dtype=torch.int32)
    q0, k0 = torch.randn(0, 2, 16), torch.randn(0, 1, 16)
    assert "grid" in tv.supports(q0, k0, k0, pk[..., :16], pk[..., :16], many, many, 0, 0, None, None, True, 1.0)
    q16, k16, pk16 = (t[..., :16].contiguous() for t in (q, k, pk))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET" in tv.supports(q16, k16, k16, pk16, pk16, cu, cu, 3, 3, None, None, True, 1.0)


def test_bf16_is_kept_off_the_interpreter(triton_interpret):
    args = _make(CASES["one-seq-empty-bank"], torch.bfloat16)
    with pytest.raises(_dispatch.BackendUnavailableError, match="bfloat16"):
        _dispatch.select(OP, CPU, *args)
