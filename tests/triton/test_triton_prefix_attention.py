"""Triton ``prefix_attention`` kernels (interpreter on CPU) vs ``peft_kernels.reference``.

Forward (out, lse) and all five gradients through the public op, over GQA / MQA / MHA, Lq != Lk,
decode (split-K), odd head dims, per-row prefix banks with -1 rows and short (incl. 0) lengths,
shared / per-row banks with index None, left / right key padding, causal or not, and query rows
that see no key at all. Shapes are tiny: the interpreter is slow.
"""
from __future__ import annotations

import pytest
import torch

import peft_kernels
from peft_kernels import reference
from peft_kernels.ops import _dispatch

tp = pytest.importorskip("peft_kernels.triton.prefix_attention")

CPU = torch.device("cpu")

# id: (B, Hq, Hkv, Lq, Lk, D, T, P, index, lens, padding, causal)
CASES = {
    "gqa-shared-T1-causal": (2, 4, 2, 7, 9, 24, 1, 5, None, None, None, True),
    "mqa-indexed-neg-len0-leftpad": (2, 4, 1, 5, 8, 40, 3, 5, [2, -1], [5, 0, 3], "left", True),
    "mha-T==B-rightpad-bidir": (2, 2, 2, 9, 9, 64, 2, 1, None, None, "right", False),
    "decode-lq1-gqa-leftpad": (2, 4, 2, 1, 9, 64, 2, 5, [1, 0], [0, 4], "left", True),
    "decode-lq1-mqa-P1-bidir": (1, 4, 1, 1, 7, 24, 1, 1, None, None, None, False),
    "lq-gt-lk-neg-row-empty-queries": (2, 4, 2, 9, 4, 40, 2, 5, [0, -1], [2, 5], None, True),
    "lq-lt-lk-int32-rightpad": (2, 2, 1, 3, 9, 24, 1, 5, "int32:[0, 0]", [3], "right", True),
    "lq2-decode-split-causal": (2, 4, 2, 2, 6, 24, 2, 5, [-1, 1], None, "right", True),
    "head-dim-8-padded": (1, 2, 1, 4, 5, 8, 1, 3, None, [2], "left", False),
}


def _randn(dtype, seed):
    """randn(*shape) in ``dtype``, drawn in fp32 from a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(dtype)
    return randn


def _bank_args(index, lens):
    """(prefix_index, prefix_lens) of a case: int64 tensors (int32 for an index written "int32:[...]") or None."""
    idx_dtype = torch.int64
    if isinstance(index, str):
        idx_dtype, index = torch.int32, eval(index.split(":", 1)[1])
    index_t = None if index is None else torch.tensor(index, dtype=idx_dtype)
    lens_t = None if lens is None else torch.tensor(lens, dtype=idx_dtype)
    return index_t, lens_t


def _make(case, dtype, seed=0):
    B, Hq, Hkv, Lq, Lk, D, T, P, index, lens, pad, causal = case
    randn = _randn(dtype, seed)
    q, k, v = randn(B, Hq, Lq, D), randn(B, Hkv, Lk, D), randn(B, Hkv, Lk, D)
    pk, pv = randn(T, Hkv, P, D), randn(T, Hkv, P, D)
    index_t, lens_t = _bank_args(index, lens)
    mask = None
    if pad == "right":
        mask = torch.ones(B, Lk, dtype=torch.bool)
        mask[0, Lk - 2:] = False
    elif pad == "left":
        mask = torch.ones(B, Lk, dtype=torch.bool)
        mask[B - 1, :3] = False
    return (q, k, v, pk, pv, index_t, lens_t, mask, causal, D**-0.5)


def _fwd_tol(dtype):
    return dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)


def _grad_tol(dtype):
    return dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)


def _assert_grads_close(grads, ref_grads, dtype, tag):
    """dq, dk, dv, dprefix_k, dprefix_v against the reference's: same dtype and shape, close."""
    for name, got, want in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, ref_grads):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        torch.testing.assert_close(got, want, **_grad_tol(dtype), msg=lambda m: f"{tag} {name}: {m}")


def _assert_backward_deterministic(run_public, args, grad_out):
    """Two backward runs through ``run_public`` give bitwise-equal grads; of a 3-entry bank only entry 2
    is used: entries 0 and 1 get zero prefix grads, entry 2 nonzero ones."""
    first = run_public(args, grad_out)[2]
    second = run_public(args, grad_out)[2]
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert torch.all(first[3][:2] == 0) and torch.all(first[4][:2] == 0)  # unused bank entries
    assert first[3][2].abs().sum() > 0


def _run_public(args, grad_out=None):
    """Forward (and backward if grad_out) through the public op; returns out, lse, grads."""
    q, k, v, pk, pv, index, lens, mask, causal, scale = args
    leaves = [t.detach().clone().requires_grad_(grad_out is not None) for t in (q, k, v, pk, pv)]
    out, lse = peft_kernels.prefix_attention(
        *leaves, prefix_index=index, prefix_lens=lens, key_padding_mask=mask, causal=causal,
        softmax_scale=scale, return_lse=True,
    )
    grads = None
    if grad_out is not None:
        out.backward(grad_out)
        grads = [t.grad for t in leaves]
    return out.detach(), lse, grads


def _assert_triton_selected(args, grad_out=None):
    assert _dispatch.select("prefix_attention", CPU, *args)[0] == "triton"
    if grad_out is not None:
        out, lse = reference.prefix_attention(*args)
        assert _dispatch.select("prefix_attention_backward", CPU, grad_out, *args, out, lse)[0] == "triton"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("cid", list(CASES))
def test_forward_backward_matches_reference(triton_interpret, cid, dtype):
    args = _make(CASES[cid], dtype)
    ref_out, ref_lse = reference.prefix_attention(*args)
    grad_out = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    _assert_triton_selected(args, grad_out)

    out, lse, grads = _run_public(args, grad_out)
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, **_fwd_tol(dtype))
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5)  # -inf where nothing is seen

    _assert_grads_close(grads, reference.prefix_attention_backward(grad_out, *args), dtype, cid)


_HEADS = {"gqa": (4, 2), "mqa": (4, 1), "mha": (2, 2)}
_BANKS = {  # T, P, index, lens (B = 2)
    "shared-T1": (1, 3, None, None),
    "per-row-T==B": (2, 2, None, [1, 2]),
    "indexed-neg": (3, 4, [-1, 2], [4, 0, 3]),
}
_LENGTHS = [(1, 6), (3, 8), (7, 5)]  # (Lq, Lk), rotated through the grid


def _grid():
    n = 0
    for heads in _HEADS:
        for bank in _BANKS:
            for pad in (None, "left", "right"):
                for causal in (True, False):
                    yield pytest.param(heads, bank, pad, causal, _LENGTHS[n % len(_LENGTHS)],
                                       id=f"{heads}-{bank}-{pad or 'nopad'}-{'causal' if causal else 'bidir'}")
                    n += 1


@pytest.mark.parametrize("heads,bank,pad,causal,lengths", list(_grid()))
def test_grid_fp32(triton_interpret, heads, bank, pad, causal, lengths):
    """Every combination of head layout x bank/index mode x padding x causality (fp32, fwd + bwd)."""
    (Hq, Hkv), (T, P, index, lens), (Lq, Lk) = _HEADS[heads], _BANKS[bank], lengths
    args = _make((2, Hq, Hkv, Lq, Lk, 24, T, P, index, lens, pad, causal), torch.float32, seed=Lq + Lk)
    ref_out, ref_lse = reference.prefix_attention(*args)
    grad_out = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(2))
    _assert_triton_selected(args, grad_out)
    out, lse, grads = _run_public(args, grad_out)
    torch.testing.assert_close(out, ref_out, **_fwd_tol(torch.float32))
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5)
    for got, want in zip(grads, reference.prefix_attention_backward(grad_out, *args)):
        torch.testing.assert_close(got, want, **_grad_tol(torch.float32))


def test_decode_cases_take_split_k_path():
    """The Lq = 1 (and, in the interpreter, Lq = 2) cases above run on the split-K decode kernels."""
    for cid in ("decode-lq1-gqa-leftpad", "decode-lq1-mqa-P1-bidir", "lq2-decode-split-causal"):
        B, Hq, Hkv, Lq, Lk, D, T, P = CASES[cid][:8]
        splits, split_len = tp._num_splits(B, Hkv, Lq, Hq // Hkv, P, Lk, CPU)
        assert splits > 1 and splits * split_len >= P + Lk, cid
    B, Hq, Hkv, Lq, Lk, D, T, P = CASES["gqa-shared-T1-causal"][:8]
    assert tp._num_splits(B, Hkv, Lq, Hq // Hkv, P, Lk, CPU)[0] == 1


@pytest.mark.parametrize("cid", ["gqa-shared-T1-causal", "lq-gt-lk-neg-row-empty-queries", "mqa-indexed-neg-len0-leftpad"])
def test_forced_split_k_matches_reference(triton_interpret, monkeypatch, cid):
    """Split-K on longer query blocks too (causal band, masks and prefix cut across splits)."""
    monkeypatch.setattr(tp, "_num_splits", lambda B, Hkv, Lq, G, P, Lk, dev: (-(-(P + Lk) // 3), 3))
    args = _make(CASES[cid], torch.float32, seed=3)
    out, lse = peft_kernels.prefix_attention(*args[:5], prefix_index=args[5], prefix_lens=args[6],
                                             key_padding_mask=args[7], causal=args[8], softmax_scale=args[9],
                                             return_lse=True)
    ref_out, ref_lse = reference.prefix_attention(*args)
    torch.testing.assert_close(out, ref_out, **_fwd_tol(torch.float32))
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5)


def test_fully_masked_query_rows(triton_interpret):
    """A row with no prefix (-1) and every key padded: out 0, lse -inf, zero grads; others unaffected."""
    args = list(_make((2, 4, 2, 3, 5, 24, 2, 4, [-1, 1], None, None, True), torch.float32))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0] = False
    args[7] = mask
    args = tuple(args)
    grad_out = torch.randn(2, 4, 3, 24)
    _assert_triton_selected(args, grad_out)
    out, lse, grads = _run_public(args, grad_out)
    assert torch.all(out[0] == 0) and torch.all(torch.isneginf(lse[0]))
    assert torch.all(torch.isfinite(lse[1]))
    assert torch.all(grads[0][0] == 0) and torch.all(grads[1][0] == 0) and torch.all(grads[2][0] == 0)
    ref_out, ref_lse = reference.prefix_attention(*args)
    torch.testing.assert_close(out, ref_out, **_fwd_tol(torch.float32))
    torch.testing.assert_close(lse, ref_lse)
    for got, want in zip(grads, reference.prefix_attention_backward(grad_out, *args)):
        torch.testing.assert_close(got, want, **_grad_tol(torch.float32))


def test_non_contiguous_inputs(triton_interpret):
    """[B, L, H, D] storage viewed as [B, H, L, D] (and a strided head dim): strides, no copies needed."""
    g = torch.Generator().manual_seed(7)
    B, Hq, Hkv, Lq, Lk, D, T, P = 2, 4, 2, 5, 6, 24, 2, 3
    q = torch.randn(B, Lq, Hq, D, generator=g).transpose(1, 2)
    k = torch.randn(B, Lk, Hkv, D, generator=g).transpose(1, 2)
    v = torch.randn(B, Lk, Hkv, 2 * D, generator=g)[..., ::2].transpose(1, 2)
    pk = torch.randn(Hkv, T, P, D, generator=g).transpose(0, 1)
    pv = torch.randn(T, Hkv, P, D, generator=g)
    mask = torch.ones(Lk, B, dtype=torch.bool).t()
    mask[1, :2] = False
    args = (q, k, v, pk, pv, torch.tensor([1, 0]), torch.tensor([3, 1]), mask, True, 0.3)
    grad_out = torch.randn(B, Hq, Lq, D, generator=g)
    _assert_triton_selected(args, grad_out)
    out, lse, grads = _run_public(args, grad_out)
    ref_out, ref_lse = reference.prefix_attention(*args)
    torch.testing.assert_close(out, ref_out, **_fwd_tol(torch.float32))
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5)
    for got, want in zip(grads, reference.prefix_attention_backward(grad_out, *args)):
        torch.testing.assert_close(got, want, **_grad_tol(torch.float32))


@pytest.mark.parametrize("Lk,P", [(0, 3), (5, 0)], ids=["no-sequence-keys", "empty-bank"])
def test_empty_key_sources(triton_interpret, Lk, P):
    args = _make((2, 4, 2, 3, Lk, 16, 1, P, None, None, None, True), torch.float32)
    grad_out = torch.randn(2, 4, 3, 16)
    out, lse, grads = _run_public(args, grad_out)
    ref_out, ref_lse = reference.prefix_attention(*args)
    torch.testing.assert_close(out, ref_out, **_fwd_tol(torch.float32))
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5)
    for got, want in zip(grads, reference.prefix_attention_backward(grad_out, *args)):
        torch.testing.assert_close(got, want, **_grad_tol(torch.float32))


def test_backward_deterministic(triton_interpret):
    """Shared prefix used by every row and query head: two backward runs give bitwise-equal grads."""
    args = _make((2, 4, 2, 6, 7, 40, 3, 5, [2, 2], [1, 2, 5], "left", True), torch.float16)
    grad_out = torch.randn(2, 4, 6, 40).to(torch.float16)
    _assert_backward_deterministic(_run_public, args, grad_out)


def test_supports_reasons():
    q = torch.randn(1, 2, 3, 320)
    k = torch.randn(1, 1, 3, 320)
    pk = torch.randn(1, 1, 2, 320)
    assert "head dim" in tp.supports(q, k, k, pk, pk, None, None, None, True, 1.0)
    q64 = torch.randn(1, 2, 3, 16, dtype=torch.float64)
    k64 = torch.randn(1, 1, 3, 16, dtype=torch.float64)
    assert "dtype" in tp.supports(q64, k64, k64, k64, k64, None, None, None, True, 1.0)
    # an unsupported call falls back to the next backend in order even with triton forced (cpp, else the reference)
    with peft_kernels.use_backend("triton") if _dispatch.status("cpu")["triton"][0] else _nullctx():
        assert _dispatch.select("prefix_attention", CPU, q, k, k, pk, pk, None, None, None, True, 1.0)[0] != "triton"


class _nullctx:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
