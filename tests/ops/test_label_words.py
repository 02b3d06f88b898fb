"""``label_word_logits`` (KPT verbalizer head) on every CPU backend vs the reference and a plain version.

The plain version builds the full ``[N, V]`` logits, takes log_softmax, gathers the label words,
divides by the calibration and aggregates class by class in a Python loop: an implementation
independent of the reference's streamed, segmented one. Backends: reference, cpp, Triton under
TRITON_INTERPRET=1 (fp32/fp16; its backward runs on the next backend). Odd H and V (not multiples
of any block), a class with one word, repeated word ids, no calibration, no bias, N = 0.
Gradients: fp64 gradcheck on reference and cpp, every backend's grads vs the plain version's,
weight frozen (fast case) or trained (dense dweight). opcheck, bad inputs, and the cpp path's
peak CPU memory for V = 30000 compared to one [N, V] fp32 tensor.
"""
from __future__ import annotations

import pytest
import torch

import peft_kernels as pk
import peft_kernels.triton.label_words  # noqa: F401  (registers the Triton backend of this op)
from conftest import backends_for, tolerances
from peft_kernels import _ext
from peft_kernels.bench.harness import cpu_peak_bytes
from peft_kernels.ops import _dispatch
from peft_kernels.ops.label_words import _lw_backward_op, _lw_op

OP = "label_word_logits"
HAS_CPP = _ext.CPU.loaded and hasattr(torch.ops.peft_kernels, "label_word_logits_fwd")
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason=f"peft_kernels._C without label_word_logits: {_ext.CPU.error}")

# id, N, H, V, class word lists
CASES = [
    ("small", 3, 5, 11, [[1, 4], [4], [7, 2, 10]]),
    ("odd-hv", 7, 37, 1031, [[3, 900, 17], [1030], [5, 5, 64, 200]]),
    ("one-class-one-word", 4, 16, 64, [[9]]),
    ("many-tiles", 5, 19, 9000, [[0, 8999], [4096, 4097, 12], [8191]]),
]


def _inputs(case, dtype, bias=True, seed=0):
    _, N, H, V, words = case
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5 * 2
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    ids = torch.tensor([w for ws in words for w in ws])
    offsets = torch.tensor([0] + [len(ws) for ws in words]).cumsum(0)
    ww = torch.randn(ids.shape[0], generator=g, dtype=torch.float64)
    cal = torch.rand(ids.shape[0], generator=g, dtype=torch.float64) * 0.01 + 1e-4
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(hidden), cast(weight), cast(b), ids, offsets, ww, cal


def plain(hidden, weight, bias, ids, offsets, word_weights=None, calibration=None):
    """Full logits [N, V], log_softmax, gather, calibrate, aggregate per class (fp64)."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    logp = torch.log_softmax(z, dim=1)[:, ids]
    if calibration is not None:
        logp = logp - torch.log(calibration.double())
    out = []
    for c in range(offsets.shape[0] - 1):
        a, b = int(offsets[c]), int(offsets[c + 1])
        if word_weights is None:
            log_alpha = torch.full((b - a,), -torch.log(torch.tensor(float(b - a), dtype=torch.float64)).item(),
                                   dtype=torch.float64)
        else:
            log_alpha = torch.log_softmax(word_weights[a:b].double(), 0)
        out.append(torch.logsumexp(logp[:, a:b] + log_alpha, dim=1))
    return torch.stack(out, 1)


def _run(backend, *args, **kw):
    with pk.use_backend(backend):
        out = pk.label_word_logits(*args, **kw)
        assert pk.last_backend(OP) == backend
    return out


def _dtypes_for(backend):
    return [torch.float32, torch.float16] if backend == "triton" else [torch.float32, torch.float64, torch.bfloat16]


BACKENDS = backends_for(OP)


def _skip_slow(backend, case):
    if backend == "triton" and case[3] > 2048:
        pytest.skip("keeps the Triton interpreter run short: odd-hv (V = 1031, many V tiles) covers its tiling")


def test_backends_present():
    assert "reference" in BACKENDS
    if HAS_CPP:
        assert "cpp" in BACKENDS
    if _dispatch.status("cpu")["triton"][0]:
        assert "triton" in BACKENDS


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("mode", ["mean", "mean-cal", "weighted-cal", "weighted-nobias"])
def test_forward_matches_plain_and_reference(backend, case, mode):
    _skip_slow(backend, case)
    for dtype in _dtypes_for(backend):
        h, w, b, ids, off, ww, cal = _inputs(case, dtype, bias="nobias" not in mode)
        kw = {}
        if "cal" in mode:
            kw["calibration"] = cal.float()
        if mode.startswith("weighted"):
            kw.update(word_weights=ww.float(), aggregate="weighted")
        got = _run(backend, h, w, b, ids, off, **kw)
        assert got.shape == (h.shape[0], off.shape[0] - 1) and got.dtype == dtype
        want = plain(h, w, b, ids, off, kw.get("word_weights"), kw.get("calibration"))
        ref = _run("reference", h, w, b, ids, off, **kw)
        tol = dict(tolerances(dtype))
        if dtype in (torch.float16, torch.bfloat16):
            tol = dict(atol=3e-2, rtol=1e-2)  # the output is rounded to 16 bits; sums are fp32
        torch.testing.assert_close(got.double(), want, **tol)
        torch.testing.assert_close(got.double(), ref.double(), **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_indices_and_empty_batch(backend):
    case = CASES[1]
    h, w, b, ids, off, ww, cal = _inputs(case, torch.float32)
    a = _run(backend, h, w, b, ids.int(), off.int(), calibration=cal.float())
    c = _run(backend, h, w, b, ids, off, calibration=cal.float())
    torch.testing.assert_close(a, c)
    empty = _run(backend, h[:0], w, b, ids, off)
    assert empty.shape == (0, 3)


def _grads(backend, h, w, b, ids, off, ww, cal, train_weight):
    h = h.clone().requires_grad_(True)
    w = w.clone().requires_grad_(train_weight)
    b = b.clone().requires_grad_(True)
    ww = ww.clone().requires_grad_(True)
    if backend == "plain":
        y = plain(h, w, b, ids, off, ww, cal)
    else:
        with pk.use_backend(backend):
            y = pk.label_word_logits(h, w, b, ids, off, word_weights=ww, calibration=cal, aggregate="weighted")
    g = torch.Generator().manual_seed(5)
    (y.double() * torch.randn(y.shape, generator=g, dtype=torch.float64)).sum().backward()
    return [t.grad for t in (h, w, b, ww) if t.requires_grad]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train_weight", [False, True], ids=["frozen-head", "trained-head"])
@pytest.mark.parametrize("case", CASES[:2] + CASES[3:], ids=[c[0] for c in CASES[:2] + CASES[3:]])
def test_grads_match_plain(backend, train_weight, case):
    _skip_slow(backend, case)
    h, w, b, ids, off, ww, cal = _inputs(case, torch.float32)
    got = _grads(backend, h, w, b, ids, off, ww.float(), cal.float(), train_weight)
    want = _grads("plain", h.double(), w.double(), b.double(), ids, off, ww, cal, train_weight)
    assert len(got) == (4 if train_weight else 3)
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double(), e, atol=5e-5, rtol=5e-4)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("reference", "cpp")])
@pytest.mark.parametrize("aggregate", ["mean", "weighted"])
def test_gradcheck_fp64(backend, aggregate):
    h, w, b, ids, off, ww, cal = _inputs(("g", 3, 4, 23, [[1, 4], [20], [7, 2, 9, 2]]), torch.float64)
    args = [t.clone().requires_grad_(True) for t in (h, w, b)]
    wts = ww.clone().requires_grad_(True) if aggregate == "weighted" else None

    def fn(h, w, b, *rest):
        return pk.label_word_logits(h, w, b, ids, off, word_weights=rest[0] if rest else None, calibration=cal,
                                    aggregate=aggregate)

    with pk.use_backend(backend):
        inputs = (*args, wts) if wts is not None else tuple(args)
        assert torch.autograd.gradcheck(fn, inputs)
        assert pk.last_backend("label_word_logits_backward") == backend


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("reference", "cpp")])
def test_lse_gradient(backend):
    """The registered op's second output (the normaliser) has a correct gradient too."""
    h, w, b, ids, off, ww, cal = _inputs(CASES[0], torch.float64)
    h.requires_grad_(True)
    with pk.use_backend(backend):
        assert torch.autograd.gradcheck(lambda h: _lw_op(h, w, b, ids, off, None, cal)[1], (h,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    if backend == "triton":
        dtype = torch.float32
    else:
        dtype = torch.float64
    h, w, b, ids, off, ww, cal = _inputs(CASES[1], dtype)
    h.requires_grad_(True)
    fwd = (h, w, b, ids, off, ww.to(dtype), cal.to(dtype))
    with pk.use_backend(backend):
        torch.library.opcheck(_lw_op, fwd)
        y, lse = _lw_op(*[t.detach() if isinstance(t, torch.Tensor) else t for t in fwd])
        bwd = (torch.randn_like(y), torch.randn_like(lse), h.detach(), w, b, ids, off, ww.to(dtype), cal.to(dtype),
               lse, True, True)
        torch.library.opcheck(_lw_backward_op, bwd)


@needs_cpp
def test_native_ops_opcheck():
    h, w, b, ids, off, ww, cal = _inputs(CASES[0], torch.float32)
    torch.library.opcheck(torch.ops.peft_kernels.label_word_logits_fwd.default, (h, w, b, ids, off, ww.float(), None))
    y, lse = torch.ops.peft_kernels.label_word_logits_fwd(h, w, b, ids, off, None, cal.float())
    torch.library.opcheck(torch.ops.peft_kernels.label_word_logits_bwd.default,
                          (torch.randn_like(y), None, h, w, b, ids, off, None, cal.float(), lse, False, True))


@needs_cpp
def test_cpp_backward_thread_count_independent_grouping():
    """The vocabulary groups are fixed, so 1 and 2 threads sum the same partials in the same order
    (only BLAS's own blocking of each tile product may round differently)."""
    h, w, b, ids, off, ww, cal = _inputs(CASES[3], torch.float32)
    old = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append(_grads("cpp", h, w, b, ids, off, ww.float(), cal.float(), True))
    finally:
        torch.set_num_threads(old)
    for a, c in zip(*runs):
        torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-6)


@needs_cpp
def test_cpp_never_materialises_vocabulary_logits():
    N, H, V = 64, 32, 30000
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.2
    b = torch.randn(V, generator=g)
    ids = torch.tensor([5, 17, 29999, 12000, 8])
    off = torch.tensor([0, 2, 3, 5])
    full = N * V * 4
    with pk.use_backend("cpp"):
        peak = cpu_peak_bytes(lambda: pk.label_word_logits(h, w, b, ids, off))
        hr = h.clone().requires_grad_(True)

        def step():
            y = pk.label_word_logits(hr, w, b, ids, off)
            y.sum().backward()
            return hr.grad

        peak_bwd = cpu_peak_bytes(step)
    plain_peak = cpu_peak_bytes(lambda: plain(h.float(), w, b, ids, off))
    assert plain_peak >= full  # the measure sees an [N, V] tensor when there is one
    assert peak < full / 4, (peak, full)
    assert peak_bwd < full / 2, (peak_bwd, full)


def _bad(**over):
    h, w, b, ids, off, ww, cal = _inputs(CASES[0], torch.float32)
    args = dict(hidden=h, weight=w, bias=b, word_ids=ids, class_offsets=off)
    kw = {k: over.pop(k) for k in list(over) if k in ("word_weights", "calibration", "aggregate")}
    args.update(over)
    return lambda: pk.label_word_logits(args["hidden"], args["weight"], args["bias"], args["word_ids"],
                                        args["class_offsets"], **kw)


@pytest.mark.parametrize("over, exc, needle", [
    (dict(hidden=torch.randn(3, 4)), ValueError, "hidden.shape[1]"),
    (dict(hidden=torch.randn(3)), ValueError, "hidden must have 2 dims"),
    (dict(weight=torch.randn(11, 5).double()), TypeError, "weight has dtype"),
    (dict(bias=torch.randn(10)), ValueError, "bias.shape[0]"),
    (dict(word_ids=torch.tensor([1, 4, 4, 7, 2, 11])), ValueError, "word_ids holds values"),
    (dict(word_ids=torch.tensor([1.0, 4, 4, 7, 2, 10])), TypeError, "word_ids must have dtype"),
    (dict(class_offsets=torch.tensor([0, 2, 2, 6])), ValueError, "every class owns"),
    (dict(class_offsets=torch.tensor([0, 2, 3, 5])), ValueError, "class_offsets must rise"),
    (dict(class_offsets=torch.tensor([0])), ValueError, "C >= 1"),
    (dict(aggregate="max"), ValueError, "aggregate must be"),
    (dict(aggregate="weighted"), ValueError, "needs word_weights"),
    (dict(word_weights=torch.zeros(6)), ValueError, "aggregate='mean'"),
    (dict(word_weights=torch.zeros(5), aggregate="weighted"), ValueError, "word_weights.shape[0]"),
    (dict(calibration=torch.zeros(6)), ValueError, "positive priors"),
    (dict(calibration=torch.ones(6, 1)), ValueError, "calibration must have 1 dims"),
    (dict(weight=torch.randn(0, 5)), ValueError, "at least one vocabulary row"),
])
def test_bad_inputs(over, exc, needle):
    with pytest.raises(exc, match=None) as info:
        _bad(**over)()
    assert needle in str(info.value), str(info.value)
