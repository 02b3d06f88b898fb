"""Triton packed (varlen) soft-prompt kernels vs ``peft_kernels.reference`` (interpreter on CPU tensors).

Every test runs inside the ``triton_interpret`` fixture (which forces the triton backend), calls
the public API (forward and autograd backward) and checks that the dispatcher really picked the
triton kernels. fp32 and fp16 (fp64 once; bf16 only in tests/gpu). Ragged lengths with empty
sequences, -1 entries, prompt_lens < P, unused entries, index None (T == 1, T == S), int32 / int64
ids, more rows than one program's block, more sequences than one binary-search step. Shapes are
small: the interpreter runs one Python call per program.
"""
from __future__ import annotations

import pytest
import torch

import peft_kernels as pk
from conftest import tolerances
from peft_kernels import reference as R

I32, I64 = torch.int32, torch.int64

# id, sequence lengths, H, T, P, prompt_index, prompt_lens
CASES = [
    ("shared-T1", [3, 0, 5], 7, 1, 4, None, None),
    ("per-seq-TS-lens", [2, 4, 1], 33, 3, 4, None, [4, 0, 2]),
    ("idx-neg-empty", [0, 3, 5, 0, 2], 16, 3, 3, [2, -1, 0, -1, 2], [3, 1, 0]),
    ("idx32-unused", [4, 4, 1], 20, 4, 2, [0, 2, 0], [2, 2, 1, 2]),
    ("many-seqs-rows", [9, 0, 31, 17, 0, 25, 3, 40, 1, 12, 0, 6], 24, 3, 5,
     [0, 1, 2, -1, 0, 0, 2, 1, -1, 0, 2, 1], [5, 2, 4]),
    ("N0-prompts-only", [0, 0], 4, 2, 3, [1, 0], None),
    ("all-neg", [2, 3], 5, 2, 2, [-1, -1], None),
]
CASE_IDS = [c[0] for c in CASES]


def _dname(d):
    return str(d).replace("torch.", "")


def _make(case, dtype, id_dtype=I64, vocab=11):
    cid, lengths, H, T, P, index, lens = case
    g = torch.Generator().manual_seed(H + len(lengths))
    idt = I32 if "idx32" in cid else I64
    bounds = torch.tensor([0] + lengths, dtype=torch.long).cumsum(0).to(I32)
    N = int(bounds[-1])
    return dict(
        embeds=torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype),
        input_ids=torch.randint(0, vocab, (N,), generator=g).to(id_dtype),
        weight=torch.randn(vocab, H, generator=g, dtype=torch.float64).to(dtype),
        prompts=torch.randn(T, P, H, generator=g, dtype=torch.float64).to(dtype),
        cu_seqlens=bounds,
        prompt_index=None if index is None else torch.tensor(index, dtype=idt),
        prompt_lens=None if lens is None else torch.tensor(lens, dtype=idt),
    )


def _kw(t):
    return dict(cu_seqlens=t["cu_seqlens"], prompt_index=t["prompt_index"], prompt_lens=t["prompt_lens"])


def _run(op, t, grad_seed=3):
    """(out, d first input, dprompts) through the public API under the backend already forced."""
    prompts = t["prompts"].clone().requires_grad_()
    first = (t["embeds"] if op == "concat" else t["weight"]).clone().requires_grad_()
    if op == "concat":
        out = pk.soft_prompt_concat_varlen(first, prompts, **_kw(t))
    else:
        out = pk.soft_prompt_embed_varlen(t["input_ids"], first, prompts, **_kw(t))
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    out.backward(g.to(out.dtype))
    zero = lambda x: torch.zeros_like(x) if x.grad is None else x.grad  # noqa: E731
    return out.detach(), zero(first), zero(prompts)


def _close(got, want, dtype, what):
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, want.dtype, got.shape, want.shape)
    torch.testing.assert_close(got, want, **tolerances(dtype), msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=_dname)
@pytest.mark.parametrize("op", ["concat", "embed"])
def test_forward_backward_match_reference(triton_interpret, case, dtype, op):
    t = _make(case, dtype)
    got = _run(op, t)
    assert pk.last_backend(f"soft_prompt_{op}_varlen") == "triton"
    assert pk.last_backend(f"soft_prompt_{op}_varlen_backward") == "triton"
    with pk.use_backend("reference"):
        want = _run(op, t)
    assert torch.equal(got[0], want[0]), "the forward is a copy: exact"
    _close(got[1], want[1], dtype, f"{op} d{'embeds' if op == 'concat' else 'weight'}")
    _close(got[2], want[2], dtype, f"{op} dprompts")


@pytest.mark.parametrize("id_dtype", [I32, I64], ids=_dname)
def test_embed_int32_ids_fp64_and_given_bounds(triton_interpret, id_dtype):
    t = _make(CASES[4], torch.float64, id_dtype)
    co = pk.soft_prompt_varlen_cu_seqlens(t["cu_seqlens"], t["prompts"], prompt_index=t["prompt_index"],
                                          prompt_lens=t["prompt_lens"])
    out = pk.soft_prompt_embed_varlen(t["input_ids"], t["weight"], t["prompts"], **_kw(t), cu_seqlens_out=co,
                                      total_out=int(co[-1]), validate=False)
    assert pk.last_backend("soft_prompt_embed_varlen") == "triton"
    want = R.soft_prompt_embed_varlen(t["input_ids"], t["weight"], t["prompts"], t["cu_seqlens"], co, int(co[-1]),
                                      t["prompt_index"], t["prompt_lens"])
    assert torch.equal(out, want)
    got = _run("embed", t)
    with pk.use_backend("reference"):
        ref = _run("embed", t)
    for a, b, what in zip(got, ref, ("out", "dweight", "dprompts")):
        _close(a, b, torch.float64, what)


def test_embed_without_dweight_and_strided_embeds(triton_interpret):
    t = _make(CASES[2], torch.float32)
    prompts = t["prompts"].clone().requires_grad_()
    out = pk.soft_prompt_embed_varlen(t["input_ids"], t["weight"], prompts, **_kw(t))
    out.sum().backward()
    assert t["weight"].grad is None
    with pk.use_backend("reference"):
        p2 = t["prompts"].clone().requires_grad_()
        pk.soft_prompt_embed_varlen(t["input_ids"], t["weight"], p2, **_kw(t)).sum().backward()
    _close(prompts.grad, p2.grad, torch.float32, "dprompts")
    wide = torch.randn(t["embeds"].shape[0], 40)[:, 4:20]
    got = pk.soft_prompt_concat_varlen(wide, t["prompts"], **_kw(t))
    co = pk.soft_prompt_varlen_cu_seqlens(t["cu_seqlens"], t["prompts"], prompt_index=t["prompt_index"],
                                          prompt_lens=t["prompt_lens"])
    assert torch.equal(got, R.soft_prompt_concat_varlen(wide, t["prompts"], t["cu_seqlens"], co, int(co[-1]),
                                                        t["prompt_index"], t["prompt_lens"]))


def test_masked_slots_never_read_and_deterministic(triton_interpret):
    t = _make(CASES[3], torch.float32)  # entry 1 unused, entry 2 has 1 of 2 slots
    t["prompts"][1] = float("nan")
    t["prompts"][2, 1] = float("inf")
    first = _run("concat", t)
    second = _run("concat", t)
    assert all(torch.isfinite(x).all() for x in first)
    assert (first[2][1] == 0).all() and (first[2][2, 1] == 0).all()
    for a, b in zip(first, second):
        assert torch.equal(a, b)
