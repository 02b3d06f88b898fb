"""prefix_attention_varlen on every CPU backend (reference, cpp, Triton under the interpreter when
registered) against the reference, and the reference against each sequence run alone through
prefix_attention: outputs, lse and gradients over the packed contract (GQA, odd D, empty sequences,
Lq_s < Lk_s, decode, -1 entries, prefix_lens < P, index None, non-causal, strided views), fp64
gradcheck, opcheck, torch.compile, and the bad inputs the wrapper refuses."""
from __future__ import annotations

import re

import pytest
import torch

import peft_kernels
from peft_kernels import reference
from peft_kernels.ops import _dispatch
from peft_kernels.ops.prefix_attention_varlen import prefix_attention_varlen

OP, BWD = "prefix_attention_varlen", "prefix_attention_varlen_backward"
# Max |got - want| / max(1, max |want|) per tensor.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
NAMES = ("out", "lse", "dq", "dk", "dv", "dprefix_k", "dprefix_v")


def _backends() -> list[str]:
    usable = _dispatch.status("cpu")
    return [b for b in _dispatch.kernels(OP) if usable[b][0] and b in _dispatch.kernels(BWD)]


# (id, Hq, Hkv, D, P, T, [(Lq_s, Lk_s) per sequence], prefix_index, prefix_lens)
CASES = [
    ("one_seq_T1", 4, 4, 16, 4, 1, [(7, 7)], None, None),
    ("gqa_T_eq_S", 8, 2, 16, 3, 3, [(5, 5), (9, 9), (1, 1)], None, None),
    ("oddD24_neg1_lens", 4, 2, 24, 5, 2, [(6, 6), (3, 3), (8, 8)], [1, -1, 0], [5, 2]),
    ("oddD40_cache_like", 6, 3, 40, 4, 3, [(3, 10), (1, 7), (5, 12)], [2, 0, 1], [4, 1, 3]),
    ("empty_sequences", 4, 2, 16, 3, 2, [(0, 0), (4, 4), (0, 5), (3, 3), (0, 0)], [0, 1, -1, 1, 0], [3, 2]),
    ("decode", 8, 2, 24, 5, 3, [(1, 17), (1, 3), (1, 1), (1, 9)], [2, -1, 0, 1], None),
    ("decode_no_keys", 4, 2, 16, 2, 1, [(1, 0), (1, 4)], [0, -1], None),
    ("mqa_lens0", 6, 1, 16, 4, 2, [(9, 9), (4, 4)], [0, 1], [0, 4]),
    ("Lq_gt_Lk", 4, 2, 8, 2, 1, [(9, 5), (3, 3)], None, None),
    ("long_blocks", 4, 2, 32, 7, 2, [(70, 70), (40, 150), (1, 130)], [1, 0, -1], [7, 3]),
]
IDS = [c[0] for c in CASES]


def _packed(Ls, H, D, dtype, g, strided):
    N = sum(Ls)
    if strided:  # a [1, H, N, D] tensor's [0].transpose(0, 1): token stride D, head stride N * D
        return torch.randn(1, H, N, D, generator=g, dtype=torch.float64).to(dtype)[0].transpose(0, 1)
    return torch.randn(N, H, D, generator=g, dtype=torch.float64).to(dtype)


def _cu(lengths):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32)


def _inputs(case, dtype, causal=True, strided=False, index_dtype=torch.int64, seed=0):
    _, Hq, Hkv, D, P, T, seqs, index, lens = case
    g = torch.Generator().manual_seed(seed)
    Lq, Lk = [s[0] for s in seqs], [s[1] for s in seqs]
    q = _packed(Lq, Hq, D, dtype, g, strided)
    k = _packed(Lk, Hkv, D, dtype, g, strided)
    v = _packed(Lk, Hkv, D, dtype, g, strided)
    pk = torch.randn(T, Hkv, P, D, generator=g, dtype=torch.float64).to(dtype)
    pv = torch.randn(T, Hkv, P, D, generator=g, dtype=torch.float64).to(dtype)
    kwargs = dict(
        cu_seqlens_q=_cu(Lq), cu_seqlens_k=_cu(Lk), max_seqlen_q=max(Lq), max_seqlen_k=max(Lk),
        prefix_index=None if index is None else torch.tensor(index, dtype=index_dtype),
        prefix_lens=None if lens is None else torch.tensor(lens, dtype=index_dtype), causal=causal,
    )
    return [q, k, v, pk, pv], kwargs


def _ref_args(tensors, kw):
    return (*tensors, kw["cu_seqlens_q"], kw["cu_seqlens_k"], kw["max_seqlen_q"], kw["max_seqlen_k"],
            kw["prefix_index"], kw["prefix_lens"], kw["causal"], tensors[0].shape[-1] ** -0.5)


def _dout(q, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(q.shape, generator=g, dtype=torch.float64).to(q.dtype)


def _run(backend, tensors, kw, grads=True):
    """out, lse (and the five grads) through the public op on ``backend``."""
    leaves = [t.detach().clone().requires_grad_(grads) for t in tensors]  # clone keeps the strides
    with peft_kernels.use_backend(backend):
        out, lse = prefix_attention_varlen(*leaves, **kw, return_lse=True)
        if not grads:
            return [out, lse]
        got = torch.autograd.grad(out, leaves, _dout(out))
    return [out.detach(), lse, *got]


def _want(tensors, kw):
    args = _ref_args(tensors, kw)
    out, lse = reference.prefix_attention_varlen(*args)
    return [out, lse, *reference.prefix_attention_varlen_backward(_dout(out), *args)]


def _assert_close(got, want, dtype, names=NAMES):
    for n, a, b in zip(names, got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, (n, a.shape, b.shape, a.dtype, b.dtype)
        if n == "lse":
            assert torch.equal(torch.isneginf(a), torch.isneginf(b)), n
            a, b = a.masked_fill(torch.isneginf(a), 0), b.masked_fill(torch.isneginf(b), 0)
        a, b = a.double(), b.double()
        err = (a - b).abs().max().item() if a.numel() else 0.0
        scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
        assert err <= TOL[dtype] * scale, f"{n}: max error {err:.3g} > {TOL[dtype]:.0e} x {scale:.3g}"


# ----------------------------------------------------------------- the reference is the padded op per sequence


def _alone(tensors, kw, causal):
    """out, lse and grads of each sequence run alone as a batch of one through prefix_attention."""
    q, k, v, pk, pv = tensors
    cq, ck = kw["cu_seqlens_q"].tolist(), kw["cu_seqlens_k"].tolist()
    S, T = len(cq) - 1, pk.shape[0]
    index = kw["prefix_index"]
    entries = index.tolist() if index is not None else [0 if T == 1 else s for s in range(S)]
    out, lse = torch.zeros(q.shape, dtype=q.dtype), torch.full((q.shape[1], q.shape[0]), float("-inf"))
    dq, dk, dv = (torch.zeros(t.shape, dtype=t.dtype) for t in (q, k, v))
    dpk, dpv = torch.zeros(pk.shape, dtype=torch.float64), torch.zeros(pv.shape, dtype=torch.float64)
    dout = _dout(q)
    for s in range(S):
        if cq[s + 1] == cq[s]:
            continue
        parts = [x[a:b].transpose(0, 1)[None].detach().clone().requires_grad_()
                 for x, (a, b) in ((q, cq[s:s + 2]), (k, ck[s:s + 2]), (v, ck[s:s + 2]))]
        bank = [t.detach().clone().requires_grad_() for t in (pk, pv)]
        o, l = peft_kernels.prefix_attention(*parts, *bank, prefix_index=torch.tensor([entries[s]]),
                                             prefix_lens=kw["prefix_lens"], causal=causal, return_lse=True)
        gs = torch.autograd.grad(o, parts + bank, dout[cq[s]:cq[s + 1]].transpose(0, 1)[None])
        out[cq[s]:cq[s + 1]] = o[0].detach().transpose(0, 1)
        lse[:, cq[s]:cq[s + 1]] = l[0]
        dq[cq[s]:cq[s + 1]] = gs[0][0].transpose(0, 1)
        dk[ck[s]:ck[s + 1]] = gs[1][0].transpose(0, 1)
        dv[ck[s]:ck[s + 1]] = gs[2][0].transpose(0, 1)
        dpk += gs[3].double()
        dpv += gs[4].double()
    return [out, lse, dq, dk, dv, dpk.to(pk.dtype), dpv.to(pv.dtype)]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reference_is_each_sequence_alone(case, causal):
    tensors, kw = _inputs(case, torch.float64, causal)
    _assert_close(_want(tensors, kw), _alone(tensors, kw, causal), torch.float64)


# ----------------------------------------------------------------- every backend vs the reference


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_backend_matches_reference(case, causal, dtype, backend):
    tensors, kw = _inputs(case, dtype, causal)
    _assert_close(_run(backend, tensors, kw), _want(tensors, kw), dtype)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("oddD40_cache_like", "decode", "empty_sequences")],
                         ids=lambda c: c[0])
def test_strided_views_and_int32_index(case, backend):
    """q, k, v as ``x[0].transpose(0, 1)`` views of [1, H, N, D] tensors, int32 bank indices."""
    tensors, kw = _inputs(case, torch.float32, True, strided=True, index_dtype=torch.int32)
    assert tensors[0].stride(0) == tensors[0].shape[-1] and not tensors[0].is_contiguous()
    _assert_close(_run(backend, tensors, kw), _want(tensors, kw), torch.float32)


@pytest.mark.parametrize("backend", _backends())
def test_lse_is_optional_and_out_contiguous(backend):
    tensors, kw = _inputs(CASES[2], torch.float32, strided=True)
    with peft_kernels.use_backend(backend):
        out = prefix_attention_varlen(*tensors, **kw)
    assert isinstance(out, torch.Tensor) and out.is_contiguous() and out.shape == tensors[0].shape
    torch.testing.assert_close(out, _want(tensors, kw)[0], atol=2e-5, rtol=2e-5)


# Small enough for numerical Jacobians: GQA, -1 entry, prefix_lens < P, an empty sequence, Lq_s < Lk_s,
# Lq_s > Lk_s, decode, odd D.
GRAD_CASES = [
    ("mixed", 4, 2, 5, 3, 2, [(3, 3), (0, 2), (2, 4), (3, 1)], [1, -1, 0, 1], [3, 1]),
    ("decode_T_eq_S", 2, 1, 3, 2, 3, [(1, 3), (1, 1), (1, 0)], None, None),
]


@pytest.mark.parametrize("backend", [b for b in _backends() if b in ("reference", "cpp")])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: c[0])
def test_gradcheck_fp64(case, causal, backend):
    tensors, kw = _inputs(case, torch.float64, causal)
    leaves = [t.clone().requires_grad_() for t in tensors]

    def f(*xs):
        return prefix_attention_varlen(*xs, **kw)

    with peft_kernels.use_backend(backend):  # the reference loops over sequences in Python: fast mode
        assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=backend == "reference")


@pytest.mark.parametrize("backend", _backends())
def test_masked_bank_slots_never_leak(backend):
    """NaN in the bank slots past prefix_lens and in an entry no sequence uses reaches nothing."""
    case = ("nan", 4, 2, 8, 5, 3, [(4, 4), (2, 6), (1, 3)], [0, -1, 0], [3, 5, 2])
    tensors, kw = _inputs(case, torch.float32)
    dirty = [t.clone() for t in tensors]
    for bank in dirty[3:]:
        bank[0, :, 3:] = float("nan")
        bank[1:] = float("nan")
    clean, got = _run(backend, tensors, kw), _run(backend, dirty, kw)
    for n, a, b in zip(NAMES, got, clean):
        assert not torch.isnan(a).any(), n
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=n)


@pytest.mark.parametrize("backend", [b for b in _backends() if b != "triton"])
def test_prefix_grads_are_deterministic(backend):
    """Every sequence uses entry 0: the bank grads are the same bits on every run and thread count."""
    case = ("shared", 8, 2, 16, 6, 1, [(9, 9), (5, 20), (1, 7), (12, 12)] * 2, None, None)
    tensors, kw = _inputs(case, torch.float32)
    threads = torch.get_num_threads()
    try:
        runs = [_run(backend, tensors, kw) for _ in range(2)]
        torch.set_num_threads(1)
        runs.append(_run(backend, tensors, kw))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for n, a, b in zip(NAMES, other, runs[0]):
            assert torch.equal(a, b), n


# ----------------------------------------------------------------- opcheck, compile, validate=False


def _op_args(case, backward):
    tensors, kw = _inputs(case, torch.float32)
    args = _ref_args(tensors, kw)
    if not backward:
        return tuple(t.requires_grad_() if i < 5 else t for i, t in enumerate(args))
    out, lse = reference.prefix_attention_varlen(*args)
    return (_dout(out), *args, out, lse)


@pytest.mark.parametrize("backend", [b for b in _backends() if b != "triton"])  # interpreter: too slow here
@pytest.mark.parametrize("name", [OP, BWD])
@pytest.mark.parametrize("case", [CASES[2], CASES[4], CASES[5]], ids=lambda c: c[0])
def test_opcheck(case, name, backend):
    with peft_kernels.use_backend(backend):
        torch.library.opcheck(getattr(torch.ops.peft_kernels, name).default, _op_args(case, name == BWD))


@pytest.mark.skipif("cpp" not in _backends(), reason="the cpp backend is not built")
@pytest.mark.parametrize("native", ["prefix_flash_varlen_fwd", "prefix_flash_varlen_bwd"])
def test_opcheck_native_kernel(native):
    args = _op_args(CASES[4], native.endswith("bwd"))
    torch.library.opcheck(getattr(torch.ops.peft_kernels, native).default,
                          tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
                          test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph_forward_and_backward():
    tensors, kw = _inputs(CASES[4], torch.float32, strided=True)

    def f(q, k, v, pk, pv):
        out = peft_kernels.prefix_attention_varlen(q, k, v, pk, pv, **kw)
        return (out * out).sum()

    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    eager = f(*leaves)
    eager_grads = torch.autograd.grad(eager, leaves)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    loss = compiled(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    torch.testing.assert_close(loss, eager)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


def test_compile_dynamic_decode_steps_share_one_graph():
    """max_seqlen_k and the packed key count change every decode step: one dynamic graph serves them."""
    from torch._dynamo.testing import CompileCounter

    def f(q, k, v, pk, pv, cu_q, cu_k, max_q, max_k, index):
        return peft_kernels.prefix_attention_varlen(q, k, v, pk, pv, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                                    max_seqlen_q=max_q, max_seqlen_k=max_k, prefix_index=index)

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(f, backend=counter, dynamic=True, fullgraph=True)
    for step, lengths in enumerate(([5, 9, 2], [6, 10, 3], [7, 11, 4])):
        case = ("step", 4, 2, 8, 3, 2, [(1, n) for n in lengths], [0, -1, 1], None)
        tensors, kw = _inputs(case, torch.float32, seed=step)
        args = (*tensors, kw["cu_seqlens_q"], kw["cu_seqlens_k"], kw["max_seqlen_q"], kw["max_seqlen_k"],
                kw["prefix_index"])
        torch.testing.assert_close(compiled(*args), _want(tensors, kw)[0], atol=2e-5, rtol=2e-5)
    assert counter.frame_count == 1


def test_validate_false_gives_the_same_result():
    tensors, kw = _inputs(CASES[5], torch.float32)
    torch.testing.assert_close(prefix_attention_varlen(*tensors, **kw, validate=False),
                               prefix_attention_varlen(*tensors, **kw), atol=0, rtol=0)


# ----------------------------------------------------------------- bad inputs


def _bad(**change):
    """Inputs of a valid 3-sequence call with ``change`` applied (tensor names or keyword names)."""
    tensors, kw = _inputs(CASES[2], torch.float32)  # cu_q = cu_k = [0, 6, 9, 17], T = 2, P = 5
    named = dict(zip(("q", "k", "v", "prefix_k", "prefix_v"), tensors), **kw)
    named.update(change)
    return named


def _cu32(*xs):
    return torch.tensor(xs, dtype=torch.int32)


BAD = [
    ("cu_not_int32", dict(cu_seqlens_q=torch.tensor([0, 6, 9, 17])), TypeError, "cu_seqlens_q"),
    ("cu_float", dict(cu_seqlens_k=torch.tensor([0.0, 6, 9, 17])), TypeError, "cu_seqlens_k"),
    ("cu_wrong_length", dict(cu_seqlens_k=_cu32(0, 9, 17)), ValueError, "cu_seqlens_k"),
    ("cu_2d", dict(cu_seqlens_q=_cu32(0, 6, 9, 17)[None]), ValueError, "cu_seqlens_q"),
    ("cu_first_not_0", dict(cu_seqlens_q=_cu32(1, 6, 9, 17)), ValueError, "cu_seqlens_q[0]"),
    ("cu_decreasing", dict(cu_seqlens_k=_cu32(0, 9, 6, 17)), ValueError, "non-decreasing"),
    ("cu_last_not_total", dict(cu_seqlens_q=_cu32(0, 6, 9, 16)), ValueError, "cu_seqlens_q[-1]"),
    ("max_seqlen_small", dict(max_seqlen_q=7), ValueError, "max_seqlen_q"),
    ("max_seqlen_not_int", dict(max_seqlen_k=8.0), TypeError, "max_seqlen_k"),
    ("index_out_of_range", dict(prefix_index=torch.tensor([0, 2, -1])), ValueError, "prefix_index"),
    ("index_below_minus_1", dict(prefix_index=torch.tensor([0, -2, 1])), ValueError, "prefix_index"),
    ("index_wrong_length", dict(prefix_index=torch.tensor([0, 1])), ValueError, "prefix_index"),
    ("index_float", dict(prefix_index=torch.tensor([0.0, 1, 1])), TypeError, "prefix_index"),
    ("index_none_T_not_1_or_S", dict(prefix_index=None), ValueError, "prefix_index"),
    ("lens_above_P", dict(prefix_lens=torch.tensor([6, 1])), ValueError, "prefix_lens"),
    ("q_rank", dict(q=torch.randn(1, 17, 4, 24)), ValueError, "q"),
    ("hq_not_multiple", dict(q=torch.randn(17, 3, 24)), ValueError, "Hq=3"),
    ("k_v_mismatch", dict(v=torch.randn(17, 2, 23)), ValueError, "k and v"),
    ("bank_heads", dict(prefix_k=torch.randn(2, 1, 5, 24), prefix_v=torch.randn(2, 1, 5, 24)), ValueError, "prefix_k"),
    ("dtype_mix", dict(k=torch.randn(17, 2, 24, dtype=torch.float64)), TypeError, "k has dtype"),
    ("int_q", dict(q=torch.zeros(17, 4, 24, dtype=torch.int32)), TypeError, "q must have dtype"),
    ("device_mix", dict(cu_seqlens_q=_cu32(0, 6, 9, 17).to("meta")), ValueError, "cu_seqlens_q is on meta"),
    ("not_a_tensor", dict(prefix_v=[[0.0]]), TypeError, "prefix_v"),
    ("cu_not_a_tensor", dict(cu_seqlens_k=[0, 6, 9, 17]), TypeError, "cu_seqlens_k"),
    ("index_not_a_tensor", dict(prefix_index=[0, 1, -1]), TypeError, "prefix_index"),
]


@pytest.mark.parametrize("change,exc,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs_are_refused(change, exc, match):
    named = _bad(**change)
    tensors = [named.pop(n) for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    with pytest.raises(exc, match=re.escape(match)):
        prefix_attention_varlen(*tensors, **named)
