"""Packed (varlen) soft-prompt ops on CPU: reference vs a per-sequence loop, cpp vs reference.

``soft_prompt_varlen_cu_seqlens`` vs a Python loop; ``soft_prompt_embed_varlen`` /
``soft_prompt_concat_varlen`` forward (exact: a copy) and backward (dprompts, dweight, dembeds)
through the public API on every CPU backend (the Triton interpreter is in tests/triton), checking
the dispatcher really ran the forced backend. Ragged lengths with empty sequences, -1 entries,
prompt_lens < P (and 0), unused entries, index None with T == 1 and T == S, S == 0, N == 0,
P == 0, int32 / int64 ids and indices, H odd and above the cpp kernels' 1024-element chunk,
strided embeds. fp64 gradcheck on reference and cpp; opcheck; torch.compile(fullgraph=True);
cpp dprompts / dweight bits independent of the thread count; bad inputs.
"""
from __future__ import annotations

import pytest
import torch

import peft_kernels as pk
from conftest import backends_for, tolerances
from peft_kernels import reference as R

I32, I64 = torch.int32, torch.int64
CPU_BACKENDS = [b for b in backends_for("soft_prompt_concat_varlen") if b != "triton"]

# id, sequence lengths, H, T, P, prompt_index, prompt_lens
CASES = [
    ("shared-T1-empty-seq", [3, 0, 5], 7, 1, 4, None, None),
    ("per-seq-TS-lens", [2, 4, 1], 33, 3, 4, None, [4, 0, 2]),
    ("idx-neg-empty", [0, 3, 5, 0, 2], 16, 3, 3, [2, -1, 0, -1, 2], [3, 1, 0]),
    ("idx32-unused-h130", [4, 4, 1], 130, 4, 2, [0, 2, 0], [2, 2, 1, 2]),
    ("all-neg", [2, 3], 5, 2, 2, [-1, -1], None),
    ("big-h1031", [150, 7, 0, 60], 1031, 2, 20, [0, 1, -1, 1], [20, 13]),
    ("S0", [], 5, 1, 3, None, None),
    ("N0-prompts-only", [0, 0], 4, 2, 3, [1, 0], None),
    ("P0", [2, 3], 4, 2, 0, [1, 0], None),
]
CASE_IDS = [c[0] for c in CASES]


def _dname(d):
    return str(d).replace("torch.", "")


def make(case, dtype=torch.float32, id_dtype=I64, seed=0, vocab=50):
    """A dict of the case's tensors (embeds, input_ids, weight, prompts, cu_seqlens, index, lens)."""
    cid, lengths, H, T, P, index, lens = case
    g = torch.Generator().manual_seed(seed + H)
    idt = I32 if "idx32" in cid else I64
    N = sum(lengths)
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return dict(
        embeds=torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype),
        input_ids=torch.randint(0, vocab, (N,), generator=g).to(id_dtype),
        weight=torch.randn(vocab, H, generator=g, dtype=torch.float64).to(dtype),
        prompts=torch.randn(T, P, H, generator=g, dtype=torch.float64).to(dtype),
        cu_seqlens=torch.tensor(bounds, dtype=I32),
        prompt_index=None if index is None else torch.tensor(index, dtype=idt),
        prompt_lens=None if lens is None else torch.tensor(lens, dtype=idt),
    )


def _entries(t):
    """Each sequence's entry (or -1) and each entry's prompt length, spelled out from the contract."""
    S, (T, P) = t["cu_seqlens"].numel() - 1, t["prompts"].shape[:2]
    idx = t["prompt_index"]
    entries = idx.tolist() if idx is not None else [0 if T == 1 else s for s in range(S)]
    lens = t["prompt_lens"].tolist() if t["prompt_lens"] is not None else [P] * T
    return entries, lens


def naive_cu_seqlens(t):
    entries, lens = _entries(t)
    cu = t["cu_seqlens"].tolist()
    out = [0]
    for s, e in enumerate(entries):
        out.append(out[-1] + cu[s + 1] - cu[s] + (lens[e] if e >= 0 else 0))
    return torch.tensor(out, dtype=I32)


def naive_concat(embeds, t):
    """The baseline: per sequence, torch.cat of its prompt and its tokens; then torch.cat of the sequences."""
    entries, lens = _entries(t)
    cu = t["cu_seqlens"].tolist()
    parts = [embeds[:0]]
    for s, e in enumerate(entries):
        if e >= 0:
            parts.append(t["prompts"][e, : lens[e]].to(embeds.dtype))
        parts.append(embeds[cu[s] : cu[s + 1]])
    return torch.cat(parts)


def _kwargs(t, **extra):
    return dict(cu_seqlens=t["cu_seqlens"], prompt_index=t["prompt_index"], prompt_lens=t["prompt_lens"], **extra)


def _close(got, want, dtype, what):
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, want.dtype, got.shape, want.shape)
    torch.testing.assert_close(got, want, **tolerances(dtype), msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------- boundaries


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cu_seqlens_matches_loop(case):
    t = make(case)
    want = naive_cu_seqlens(t)
    got = pk.soft_prompt_varlen_cu_seqlens(t["cu_seqlens"], t["prompts"], prompt_index=t["prompt_index"],
                                           prompt_lens=t["prompt_lens"])
    assert got.dtype == I32 and torch.equal(got, want), (got, want)
    got_p = pk.soft_prompt_varlen_cu_seqlens(t["cu_seqlens"], t["prompts"].shape[1], prompt_index=t["prompt_index"],
                                             prompt_lens=t["prompt_lens"])
    assert torch.equal(got_p, want)


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=_dname)
def test_reference_matches_loop(case, dtype):
    t = make(case, dtype)
    with pk.use_backend("reference"):
        cat = pk.soft_prompt_concat_varlen(t["embeds"], t["prompts"], **_kwargs(t))
        emb = pk.soft_prompt_embed_varlen(t["input_ids"], t["weight"], t["prompts"], **_kwargs(t))
    assert torch.equal(cat, naive_concat(t["embeds"], t))
    assert torch.equal(emb, naive_concat(t["weight"][t["input_ids"].long()], t))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=_dname)
@pytest.mark.parametrize("id_dtype", [I32, I64], ids=_dname)
def test_forward_matches_reference(backend, case, dtype, id_dtype):
    t = make(case, dtype, id_dtype)
    co = naive_cu_seqlens(t)
    with pk.use_backend(backend):
        cat = pk.soft_prompt_concat_varlen(t["embeds"], t["prompts"], **_kwargs(t))
        assert pk.last_backend("soft_prompt_concat_varlen") == backend
        emb = pk.soft_prompt_embed_varlen(t["input_ids"], t["weight"], t["prompts"], **_kwargs(t))
        assert pk.last_backend("soft_prompt_embed_varlen") == backend
        given = pk.soft_prompt_concat_varlen(t["embeds"], t["prompts"], **_kwargs(
            t, cu_seqlens_out=co, total_out=int(co[-1]), validate=False))
    args = (t["cu_seqlens"], co, int(co[-1]), t["prompt_index"], t["prompt_lens"])
    assert torch.equal(cat, R.soft_prompt_concat_varlen(t["embeds"], t["prompts"], *args))
    assert torch.equal(emb, R.soft_prompt_embed_varlen(t["input_ids"], t["weight"], t["prompts"], *args))
    assert torch.equal(given, cat)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_strided_embeds_and_weight(backend):
    t = make(CASES[2])
    wide = torch.randn(t["embeds"].shape[0], 40)
    embeds = wide[:, 3:19]  # row stride 40, unit last stride
    table = torch.randn(50, 40)[:, 5:21]
    bank = torch.randn(3, 3, 16)
    with pk.use_backend(backend):
        cat = pk.soft_prompt_concat_varlen(embeds, bank, **_kwargs(t))
        emb = pk.soft_prompt_embed_varlen(t["input_ids"], table, bank, **_kwargs(t))
    t["prompts"] = bank
    assert torch.equal(cat, naive_concat(embeds, t))
    assert torch.equal(emb, naive_concat(table[t["input_ids"]], t))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_masked_slots_never_read(backend):
    """NaN past prompt_lens and in unused entries cannot reach the output or the grads."""
    t = make(CASES[3])  # entry 1 unused, entry 2 has length 1 of P = 2
    prompts = t["prompts"].clone()
    prompts[1] = float("nan")
    prompts[2, 1] = float("inf")
    prompts.requires_grad_()
    embeds = t["embeds"].clone().requires_grad_()
    with pk.use_backend(backend):
        out = pk.soft_prompt_concat_varlen(embeds, prompts, **_kwargs(t))
        out.backward(torch.ones_like(out))
    assert torch.isfinite(out).all() and torch.isfinite(prompts.grad).all()
    assert (prompts.grad[1] == 0).all() and (prompts.grad[2, 1] == 0).all()


# --------------------------------------------------------------------------- backward


def _grads(op, t, backend, grad_seed=1):
    """(out, grads of the differentiable inputs) through the public API under ``backend``."""
    prompts = t["prompts"].clone().requires_grad_()
    if op == "concat":
        first = t["embeds"].clone().requires_grad_()
        run = lambda: pk.soft_prompt_concat_varlen(first, prompts, **_kwargs(t))  # noqa: E731
    else:
        first = t["weight"].clone().requires_grad_()
        run = lambda: pk.soft_prompt_embed_varlen(t["input_ids"], first, prompts, **_kwargs(t))  # noqa: E731
    with pk.use_backend(backend):
        out = run()
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
        out.backward(g.to(out.dtype))
        assert pk.last_backend(f"soft_prompt_{op}_varlen_backward") == backend
    zero = lambda x: torch.zeros_like(x) if x.grad is None else x.grad  # noqa: E731
    return out, zero(first), zero(prompts)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=_dname)
@pytest.mark.parametrize("op", ["concat", "embed"])
def test_backward_matches_reference(backend, case, dtype, op):
    t = make(case, dtype)
    want = _grads(op, t, "reference")
    got = _grads(op, t, backend)
    for name, a, b in zip(("out", "d" + ("embeds" if op == "concat" else "weight"), "dprompts"), got, want):
        _close(a, b, dtype, f"{op} {name}")


def test_reference_grads_match_autograd_of_loop():
    """The reference backward equals autograd through the per-sequence torch.cat baseline."""
    t = make(CASES[2], torch.float64)
    for op in ("concat", "embed"):
        prompts = t["prompts"].clone().requires_grad_()
        first = (t["embeds"] if op == "concat" else t["weight"]).clone().requires_grad_()
        rows = first if op == "concat" else first[t["input_ids"]]
        out = naive_concat(rows, {**t, "prompts": prompts})
        g = torch.randn_like(out)
        out.backward(g)
        _, d_first, d_prompts = _grads(op, t, "reference")
        co = naive_cu_seqlens(t)
        if op == "concat":
            de, dp = R.soft_prompt_concat_varlen_backward(g, t["cu_seqlens"], co, first.shape[0], 3, 3,
                                                          t["prompt_index"], t["prompt_lens"])
        else:
            de, dp = R.soft_prompt_embed_varlen_backward(g, t["input_ids"], t["cu_seqlens"], co, 50, 3, 3,
                                                         t["prompt_index"], t["prompt_lens"], True)
        torch.testing.assert_close(de, first.grad)
        torch.testing.assert_close(dp, prompts.grad)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_weight_without_grad(backend):
    t = make(CASES[2])
    prompts = t["prompts"].clone().requires_grad_()
    with pk.use_backend(backend):
        out = pk.soft_prompt_embed_varlen(t["input_ids"], t["weight"], prompts, **_kwargs(t))
        out.sum().backward()
    assert t["weight"].grad is None and prompts.grad is not None


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[7]], ids=[CASES[1][0], CASES[2][0], CASES[7][0]])
def test_gradcheck_fp64(backend, case):
    t = make(case, torch.float64, vocab=9)
    prompts = t["prompts"].clone().requires_grad_()
    embeds = t["embeds"].clone().requires_grad_()
    weight = t["weight"].clone().requires_grad_()
    with pk.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda e, p: pk.soft_prompt_concat_varlen(e, p, **_kwargs(t)), (embeds, prompts))
        assert torch.autograd.gradcheck(
            lambda w, p: pk.soft_prompt_embed_varlen(t["input_ids"], w, p, **_kwargs(t)), (weight, prompts))


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="cpp backend not built")
def test_cpp_sums_independent_of_threads():
    t = make(("many", [40, 0, 33, 17, 25, 9, 31, 4], 300, 2, 12, [0, 1, 0, 0, -1, 1, 0, 0], [12, 7]),
             torch.float32, vocab=6)  # few ids: long dweight sums
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(_grads("embed", t, "cpp"))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(results[0], results[1]):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- opcheck / compile


def _op_args(t, op):
    co = naive_cu_seqlens(t)
    total = int(co[-1])
    T, P = t["prompts"].shape[:2]
    tail = (t["prompt_index"], t["prompt_lens"])
    g = torch.randn(total, t["prompts"].shape[2])
    if op == "concat":
        fwd = (t["embeds"].clone().requires_grad_(), t["prompts"].clone().requires_grad_(), t["cu_seqlens"], co,
               total, *tail)
        bwd = (g, t["cu_seqlens"], co, t["embeds"].shape[0], T, P, *tail)
    else:
        fwd = (t["input_ids"], t["weight"].clone().requires_grad_(), t["prompts"].clone().requires_grad_(),
               t["cu_seqlens"], co, total, *tail)
        bwd = (g, t["input_ids"], t["cu_seqlens"], co, t["weight"].shape[0], T, P, *tail, True)
    return fwd, bwd


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", CASES[:4], ids=CASE_IDS[:4])
@pytest.mark.parametrize("op", ["concat", "embed"])
def test_opcheck(backend, case, op):
    fwd, bwd = _op_args(make(case), op)
    with pk.use_backend(backend):
        torch.library.opcheck(getattr(torch.ops.peft_kernels, f"soft_prompt_{op}_varlen").default, fwd)
        torch.library.opcheck(getattr(torch.ops.peft_kernels, f"soft_prompt_{op}_varlen_backward").default, bwd)


@pytest.mark.parametrize("validate", [True, False])
def test_compile_fullgraph(validate):
    t = make(CASES[2])
    co = naive_cu_seqlens(t)

    def step(ids, weight, prompts, cu, index, lens, total):
        cu_out = pk.soft_prompt_varlen_cu_seqlens(cu, prompts, prompt_index=index, prompt_lens=lens)
        kw = dict(cu_seqlens=cu, prompt_index=index, prompt_lens=lens, cu_seqlens_out=cu_out, total_out=total,
                  validate=validate)
        x = pk.soft_prompt_embed_varlen(ids, weight, prompts, **kw)
        return x + pk.soft_prompt_concat_varlen(2 * weight[ids.long()], prompts, **kw)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    grads = []
    for fn in (compiled, step):
        prompts = t["prompts"].clone().requires_grad_()
        weight = t["weight"].clone().requires_grad_()
        out = fn(t["input_ids"], weight, prompts, t["cu_seqlens"], t["prompt_index"], t["prompt_lens"], int(co[-1]))
        out.sum().backward()
        grads.append((out.detach(), weight.grad, prompts.grad))
    want = naive_concat(3 * t["weight"][t["input_ids"]], {**t, "prompts": 2 * t["prompts"]})
    torch.testing.assert_close(grads[0][0], want)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- bad inputs


def _bad_calls():
    t = make(CASES[2])
    e, p, cu, idx, lens = t["embeds"], t["prompts"], t["cu_seqlens"], t["prompt_index"], t["prompt_lens"]
    ids, w = t["input_ids"], t["weight"]
    co = naive_cu_seqlens(t)
    cat = lambda **kw: pk.soft_prompt_concat_varlen(  # noqa: E731
        kw.pop("embeds", e), kw.pop("prompts", p),
        **{"cu_seqlens": cu, "prompt_index": idx, "prompt_lens": lens, **kw})
    emb = lambda **kw: pk.soft_prompt_embed_varlen(  # noqa: E731
        kw.pop("input_ids", ids), kw.pop("weight", w), p,
        **{"cu_seqlens": cu, "prompt_index": idx, "prompt_lens": lens, **kw})
    return [
        ("embeds-3d", ValueError, "embeds", lambda: cat(embeds=e[None])),
        ("cu-int64", TypeError, "cu_seqlens", lambda: cat(cu_seqlens=cu.long())),
        ("cu-end", ValueError, "cu_seqlens", lambda: cat(cu_seqlens=torch.tensor([0, 3, 5, 5, 8, 9], dtype=I32))),
        ("cu-start", ValueError, "cu_seqlens", lambda: cat(cu_seqlens=torch.tensor([1, 3, 8, 8, 8, 10], dtype=I32))),
        ("cu-decreasing", ValueError, "cu_seqlens",
         lambda: cat(cu_seqlens=torch.tensor([0, 5, 3, 8, 8, 10], dtype=I32))),
        ("cu-empty", ValueError, "cu_seqlens", lambda: cat(cu_seqlens=torch.zeros(0, dtype=I32))),
        ("index-len", ValueError, "prompt_index", lambda: cat(prompt_index=idx[:3])),
        ("index-range", ValueError, "prompt_index", lambda: cat(prompt_index=torch.tensor([0, 1, 3, -1, 0]))),
        ("index-below", ValueError, "prompt_index", lambda: cat(prompt_index=torch.tensor([0, 1, -2, -1, 0]))),
        ("index-float", TypeError, "prompt_index", lambda: cat(prompt_index=idx.float())),
        ("index-none-T", ValueError, "prompt_index", lambda: cat(prompt_index=None)),
        ("lens-range", ValueError, "prompt_lens", lambda: cat(prompt_lens=torch.tensor([4, 0, 0]))),
        ("lens-len", ValueError, "prompt_lens", lambda: cat(prompt_lens=lens[:2])),
        ("prompts-H", ValueError, "prompts", lambda: cat(prompts=torch.randn(3, 3, 5))),
        ("prompts-dtype", TypeError, "prompts", lambda: cat(prompts=p.double())),
        ("prompts-2d", ValueError, "prompts", lambda: cat(prompts=p[0])),
        ("cu-out-wrong", ValueError, "cu_seqlens_out", lambda: cat(cu_seqlens_out=co + 1)),
        ("cu-out-len", ValueError, "cu_seqlens_out", lambda: cat(cu_seqlens_out=co[:-1])),
        ("cu-out-int64", TypeError, "cu_seqlens_out", lambda: cat(cu_seqlens_out=co.long())),
        ("total-wrong", ValueError, "total_out", lambda: cat(total_out=int(co[-1]) + 1)),
        ("total-below-N", ValueError, "total_out", lambda: cat(total_out=3)),
        ("total-float", ValueError, "total_out", lambda: cat(total_out=float(co[-1]))),
        ("ids-2d", ValueError, "input_ids", lambda: emb(input_ids=ids[None])),
        ("ids-float", TypeError, "input_ids", lambda: emb(input_ids=ids.float())),
        ("ids-range", ValueError, "input_ids", lambda: emb(input_ids=ids + 50)),
        ("weight-1d", ValueError, "weight", lambda: emb(weight=w[0])),
        ("cu-meta-device", ValueError, "cu_seqlens", lambda: cat(cu_seqlens=cu.to("meta"))),
        ("P-negative", TypeError, "prompts_or_P", lambda: pk.soft_prompt_varlen_cu_seqlens(cu, -1)),
    ]


BAD = _bad_calls()


@pytest.mark.parametrize("cid,exc,name,call", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs(cid, exc, name, call):
    with pytest.raises(exc, match=name):
        call()
