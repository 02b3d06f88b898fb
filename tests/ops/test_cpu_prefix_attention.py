"""prefix_attention on the ``cpp`` backend (csrc/cpu/prefix_attention.cpp) against the reference:
outputs, lse and gradients over the whole contract, fp64 gradcheck, NaN planted in every masked
slot, opcheck, and a peak-memory probe showing that nothing Lq x Lk is allocated."""
from __future__ import annotations


import pytest
import torch

import peft_kernels
from conftest import backends_for
from peft_kernels.ops.prefix_attention import prefix_attention

pytestmark = pytest.mark.skipif(
    "cpp" not in backends_for("prefix_attention") or "cpp" not in backends_for("prefix_attention_backward"),
    reason="the cpp backend of prefix_attention is not built",
)

# Max |got - want| / max(1, max |want|) per tensor.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _padding(kind: str, B: int, Lk: int):
    """[B, Lk] bool key masks: left / right padding, and a row with every key masked."""
    if kind == "none":
        return None
    m = torch.ones(B, Lk, dtype=torch.bool)
    m[0, : Lk // 3] = False  # left padding
    if B > 1:
        m[1, Lk - Lk // 2 :] = False  # right padding
    if B > 2:
        m[2] = False  # no real key at all
    return m


# (id, B, Hq, Hkv, Lq, Lk, P, D, T, prefix_index, prefix_lens, padding)
CASES = [
    ("basic", 2, 4, 4, 8, 8, 4, 16, 1, None, None, "none"),
    ("oddD_LqltLk_neg1", 3, 4, 2, 5, 11, 3, 13, 2, [1, -1, 0], [3, 1], "none"),
    ("decode_Lq1", 4, 8, 2, 1, 17, 5, 24, 3, [2, 0, -1, 2], None, "none"),
    ("P1", 2, 4, 2, 6, 6, 1, 8, 2, None, None, "none"),
    ("gqa8_2_lens0", 4, 8, 2, 7, 7, 4, 20, 3, [0, -1, 2, 1], [4, 0, 2], "none"),
    ("mqa", 2, 6, 1, 9, 12, 3, 16, 1, None, [2], "none"),
    ("padding_all_masked_row", 3, 4, 2, 6, 10, 3, 16, 2, [0, 1, -1], [3, 2], "lr"),
    ("LqgtLk", 2, 4, 2, 9, 5, 2, 8, 1, None, None, "none"),
    ("decode_padding", 3, 4, 2, 1, 9, 2, 8, 3, [2, -1, 0], [1, 2, 2], "lr"),
    ("gqa_padding_D33", 3, 8, 2, 12, 12, 5, 33, 4, [3, 3, -1], [5, 5, 5, 2], "lr"),
    # Row b uses entry b % T (one folded call over the whole bank), and the same with unequal lengths.
    ("periodic_bank", 8, 8, 2, 6, 9, 4, 16, 4, [0, 1, 2, 3, 0, 1, 2, 3], None, "none"),
    ("periodic_bank_lens", 8, 4, 2, 6, 6, 4, 16, 4, [0, 1, 2, 3, 0, 1, 2, 3], [4, 3, 4, 1], "lr"),
]
IDS = [c[0] for c in CASES]


def _inputs(case, dtype, causal, seed=0):
    _, B, Hq, Hkv, Lq, Lk, P, D, T, index, lens, pad = case
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    tensors = [rnd(B, Hq, Lq, D), rnd(B, Hkv, Lk, D), rnd(B, Hkv, Lk, D), rnd(T, Hkv, P, D), rnd(T, Hkv, P, D)]
    kwargs = dict(
        prefix_index=None if index is None else torch.tensor(index),
        prefix_lens=None if lens is None else torch.tensor(lens, dtype=torch.int32),
        key_padding_mask=_padding(pad, B, Lk),
        causal=causal,
    )
    return tensors, kwargs


def _run(backend, tensors, kwargs, grad=True, seed=1):
    leaves = [t.clone().requires_grad_(grad) for t in tensors]
    with peft_kernels.use_backend(backend):
        out, lse = prefix_attention(*leaves, return_lse=True, **kwargs)
        assert peft_kernels.last_backend("prefix_attention") == backend
        if not grad:
            return [out, lse]
        g = torch.Generator().manual_seed(seed)
        dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
        grads = torch.autograd.grad(out, leaves, dout)
        assert peft_kernels.last_backend("prefix_attention_backward") == backend
    return [out, lse, *grads]


def _assert_close(got, want, dtype, names):
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
        if name == "lse":  # -inf exactly where the query sees no key
            assert torch.equal(torch.isneginf(a), torch.isneginf(b)), name
            a, b = a.masked_fill(torch.isneginf(a), 0), b.masked_fill(torch.isneginf(b), 0)
        assert torch.isfinite(a).all(), name
        err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
        scale = max(1.0, b.double().abs().max().item() if b.numel() else 0.0)
        assert err <= TOL[dtype] * scale, f"{name}: max err {err:.3g} > {TOL[dtype]} * {scale:.3g}"


NAMES = ["out", "lse", "dq", "dk", "dv", "dprefix_k", "dprefix_v"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_matches_reference(case, causal, dtype):
    tensors, kwargs = _inputs(case, dtype, causal)
    _assert_close(_run("cpp", tensors, kwargs, grad=False), _run("reference", tensors, kwargs, grad=False), dtype, NAMES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradients_match_reference(case, causal, dtype):
    tensors, kwargs = _inputs(case, dtype, causal)
    _assert_close(_run("cpp", tensors, kwargs), _run("reference", tensors, kwargs), dtype, NAMES)


def test_rows_without_any_key_are_zero():
    case = next(c for c in CASES if c[0] == "padding_all_masked_row")  # row 2: no prefix, every key padded
    tensors, kwargs = _inputs(case, torch.float32, True)
    out, lse, dq, *_ = _run("cpp", tensors, kwargs)
    assert torch.equal(out[2], torch.zeros_like(out[2])) and torch.isneginf(lse[2]).all()
    assert torch.equal(dq[2], torch.zeros_like(dq[2]))


def test_forward_float64_matches_reference():
    for case in CASES:
        tensors, kwargs = _inputs(case, torch.float64, True)
        _assert_close(_run("cpp", tensors, kwargs), _run("reference", tensors, kwargs), torch.float64, NAMES)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("name", ["oddD_LqltLk_neg1", "padding_all_masked_row", "LqgtLk", "decode_padding",
                                  "periodic_bank"])
def test_gradcheck_float64(name, causal):
    case = next(c for c in CASES if c[0] == name)
    tensors, kwargs = _inputs(case, torch.float64, causal)
    leaves = [t.clone().requires_grad_() for t in tensors]

    def fn(*xs):
        out = prefix_attention(*xs, **kwargs)
        assert peft_kernels.last_backend("prefix_attention") == "cpp"
        return out

    with peft_kernels.use_backend("cpp"):
        assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


def _plant_nan(tensors, kwargs):
    """NaN in every slot the contract masks: padded keys' k/v, prefix slots past prefix_lens,
    the entry -1 rows would read if they read any (entry 0, past its length), unused entries."""
    q, k, v, pk, pv = (t.clone() for t in tensors)
    pad = kwargs["key_padding_mask"]
    if pad is not None:
        k.masked_fill_(~pad[:, None, :, None], float("nan"))
        v.masked_fill_(~pad[:, None, :, None], float("inf"))
    T, P = pk.shape[0], pk.shape[2]
    lens = kwargs["prefix_lens"]
    index = kwargs["prefix_index"]
    used = set(range(T)) if index is None else {int(t) for t in index if t >= 0}
    for t in range(T):
        n = P if lens is None else int(lens[t])
        if t not in used:
            n = 0
        pk[t, :, n:] = float("nan")
        pv[t, :, n:] = float("-inf")
    return [q, k, v, pk, pv]


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("name", ["gqa8_2_lens0", "padding_all_masked_row", "decode_padding", "gqa_padding_D33",
                                  "periodic_bank_lens"])
def test_nan_in_masked_slots_never_leaks(name, causal, backend):
    case = next(c for c in CASES if c[0] == name)
    tensors, kwargs = _inputs(case, torch.float32, causal)
    dirty = _plant_nan(tensors, kwargs)
    assert any(not torch.isfinite(t).all() for t in dirty)
    clean = _run(backend, tensors, kwargs)
    got = _run(backend, dirty, kwargs)
    for n, a, b in zip(NAMES, got, clean):
        if n == "lse":
            a, b = a.masked_fill(torch.isneginf(a), 0), b.masked_fill(torch.isneginf(b), 0)
        assert torch.isfinite(a).all(), n
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=n)


@pytest.mark.parametrize("name", ["oddD_LqltLk_neg1", "padding_all_masked_row", "decode_Lq1", "periodic_bank"])
def test_opcheck_cpp(name):
    case = next(c for c in CASES if c[0] == name)
    (q, k, v, pk, pv), kw = _inputs(case, torch.float32, True)
    leaves = [t.requires_grad_() for t in (q, k, v, pk, pv)]
    args = (*leaves, kw["prefix_index"], kw["prefix_lens"], kw["key_padding_mask"], True, q.shape[-1] ** -0.5)
    with peft_kernels.use_backend("cpp"):
        torch.library.opcheck(torch.ops.peft_kernels.prefix_attention.default, args)
        out, lse = torch.ops.peft_kernels.prefix_attention(*args)
        assert peft_kernels.last_backend("prefix_attention") == "cpp"
        bargs = (torch.randn_like(out), *(t.detach() for t in leaves), *args[5:], out.detach(), lse.detach())
        torch.library.opcheck(torch.ops.peft_kernels.prefix_attention_backward.default, bargs)
        assert peft_kernels.last_backend("prefix_attention_backward") == "cpp"


def _peak_bytes(backend: str, L: int) -> int:
    """Peak bytes the CPU allocator holds during a forward + backward (the profiler's allocation events)."""
    from peft_kernels.bench.harness import cpu_peak_bytes

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, L, 16, requires_grad=True) for _ in range(3))
    pk, pv = (torch.randn(1, 4, 8, 16, requires_grad=True) for _ in range(2))
    mask = torch.ones(1, L, dtype=torch.bool)
    mask[0, :5] = False

    def step():
        out = peft_kernels.prefix_attention(q, k, v, pk, pv, key_padding_mask=mask)
        out.backward(torch.ones_like(out))

    with peft_kernels.use_backend(backend):
        peak = cpu_peak_bytes(step)
        assert peft_kernels.last_backend("prefix_attention_backward") == backend
    return peak


def test_no_lq_by_lk_allocation():
    """Forward + backward at Lq = Lk = 2048, 4 heads, D = 16: one head's Lq x Lk fp32 score matrix
    is 16 MiB (64 MiB for the 4 heads); inputs, outputs, grads and the padded-key K/V copies are
    a few MiB. The reference (which builds the score matrices) must allocate more than one head's
    matrix at its peak, the cpp kernel less than it."""
    L = 2048
    one_score_matrix = L * L * 4
    ref, cpp = _peak_bytes("reference", L), _peak_bytes("cpp", L)
    assert ref > one_score_matrix, ref  # the measurement sees an Lq x Lk allocation
    assert cpp < one_score_matrix, (cpp, ref)
