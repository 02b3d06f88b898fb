"""The C++ (CPU) soft-prompt kernels vs ``peft_kernels.reference``.

All four kernels (``soft_prompt_embed`` / ``soft_prompt_concat`` forward and backward) run through
the public API with the ``cpp`` backend forced, and the test checks the dispatcher really ran
``cpp``. fp32/fp64/fp16/bf16; odd H and H above the kernels' 1024-element chunk; insert_at 0, 1, in
the middle and at L; replace; -1 rows; prompt_lens below P and 0; unused prompts; index None
(shared, per row); int32/int64 indices; strided embeds; weight requiring grad or not; empty
shapes. Gradients: fp64 gradcheck on the cpp path; dprompts/dweight are the same bits for 1 and 2
threads. NaN/Inf planted in masked places (slots past prompt_lens, -1 rows, unused prompts,
overwritten embeds, their grads) must leave every backend's results finite and equal to a clean run.
"""
from __future__ import annotations

import pytest
import torch

import peft_kernels as pk
from conftest import backends_for, tolerances
from peft_kernels import _ext
from peft_kernels import reference as R

pytestmark = pytest.mark.skipif(
    not (_ext.CPU.loaded and hasattr(torch.ops.peft_kernels, "soft_prompt_concat_bwd")),
    reason=f"peft_kernels._C with the soft-prompt kernels not built: {_ext.CPU.error}",
)

I32, I64 = torch.int32, torch.int64
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
OPS = ("soft_prompt_embed", "soft_prompt_concat")

# id, B, L, H, T, P, index, lens, insert_at
CASES = [
    ("shared-at0-h7", 3, 5, 7, 1, 4, None, None, 0),
    ("per-row-lens-at1-h33", 3, 6, 33, 3, 4, None, [4, 0, 2], 1),
    ("idx-neg-lens0-at1", 4, 6, 33, 3, 3, [2, -1, 0, 2], [3, 1, 0], 1),
    ("idx32-unused-mid-h130", 3, 7, 130, 4, 2, [0, 2, 0], [2, 2, 1, 2], 3),
    ("idx-all-neg-atL", 2, 4, 5, 2, 2, [-1, -1], None, 4),
    ("big-h1031-at1", 6, 150, 1031, 2, 20, [0, 1, -1, 1, 0, 0], [20, 13], 1),
]
EMPTY_CASES = [
    ("L0", 2, 0, 5, 1, 3, None, None, 0),
    ("P0", 2, 4, 5, 2, 0, [1, 0], None, 2),
    ("B0", 0, 4, 5, 1, 3, None, None, 1),
]


def _dname(d):
    return str(d).replace("torch.", "")


def _case_ids(cases):
    return [c[0] for c in cases]


def _bank(case, dtype, seed=0):
    """(prompts, index, lens) with the index dtype the case id asks for."""
    cid, B, L, H, T, P, index, lens, at = case
    g = torch.Generator().manual_seed(seed + H)
    idt = I32 if "idx32" in cid else I64
    prompts = torch.randn(T, P, H, generator=g, dtype=torch.float64).to(dtype)
    idx = None if index is None else torch.tensor(index, dtype=idt)
    ln = None if lens is None else torch.tensor(lens, dtype=idt)
    return prompts, idx, ln, g


def _slot_valid(B, T, P, idx, lens):
    """[B, P] bool: which prompt slots of each row are real (the op's contract, spelled out)."""
    rows = idx.long() if idx is not None else (torch.zeros(B, dtype=I64) if T == 1 else torch.arange(B))
    length = lens.long() if lens is not None else torch.full((max(T, 1),), P)
    return torch.stack([
        torch.arange(P) < (length[t] if t >= 0 else 0) for t in rows.tolist()
    ]) if B else torch.zeros(0, P, dtype=torch.bool)


def _close(got, want, dtype, what):
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, want.dtype, got.shape, want.shape)
    torch.testing.assert_close(got, want, **tolerances(dtype), msg=lambda m: f"{what}: {m}")


def _run_concat(embeds, prompts, idx, lens, at, replace, grad, backend="cpp"):
    """(out, dembeds, dprompts) through the public op and autograd on ``backend``."""
    e = embeds.clone().requires_grad_()
    p = prompts.clone().requires_grad_()
    with pk.use_backend(backend):
        out = pk.soft_prompt_concat(e, p, prompt_index=idx, prompt_lens=lens, insert_at=at, replace=replace)
        assert pk.last_backend("soft_prompt_concat") == backend
        out.backward(grad)
        assert pk.last_backend("soft_prompt_concat_backward") == backend
    return out.detach(), e.grad, p.grad


def _run_embed(ids, weight, prompts, idx, lens, at, grad, weight_grad=True, backend="cpp"):
    """(out, dweight or None, dprompts) through the public op and autograd on ``backend``."""
    w = weight.clone().requires_grad_(weight_grad)
    p = prompts.clone().requires_grad_()
    with pk.use_backend(backend):
        out = pk.soft_prompt_embed(ids, w, p, prompt_index=idx, prompt_lens=lens, insert_at=at)
        assert pk.last_backend("soft_prompt_embed") == backend
        out.backward(grad)
        assert pk.last_backend("soft_prompt_embed_backward") == backend
    return out.detach(), w.grad, p.grad


def _concat_inputs(case, dtype, replace):
    cid, B, L, H, T, P, index, lens, at = case
    prompts, idx, ln, g = _bank(case, dtype)
    embeds = torch.randn(B, L, H, generator=g, dtype=torch.float64).to(dtype)
    S = L if replace else L + P
    grad = torch.randn(B, S, H, generator=g, dtype=torch.float64).to(dtype)
    return embeds, prompts, idx, ln, at, grad


def _embed_inputs(case, dtype, V=50):
    cid, B, L, H, T, P, index, lens, at = case
    prompts, idx, ln, g = _bank(case, dtype)
    ids = torch.randint(0, V, (B, L), generator=g).to(I32 if "idx32" in cid else I64)
    if ids.numel() > 2:
        ids.view(-1)[:2] = 3  # a repeated id: dweight sums several rows
    weight = torch.randn(V, H, generator=g, dtype=torch.float64).to(dtype)
    grad = torch.randn(B, L + P, H, generator=g, dtype=torch.float64).to(dtype)
    return ids, weight, prompts, idx, ln, at, grad


def _concat_params(cases, dtypes):
    for case in cases:
        for replace in (False, True):
            if replace and case[8] + case[5] > case[2]:
                continue
            for dtype in dtypes:
                if case[0].startswith("big") and dtype in (torch.float64, torch.float16):
                    continue
                yield pytest.param(case, replace, dtype, id=f"{case[0]}-{'replace' if replace else 'insert'}-{_dname(dtype)}")


def _embed_params(cases, dtypes):
    for case in cases:
        for dtype in dtypes:
            if case[0].startswith("big") and dtype in (torch.float64, torch.float16):
                continue
            yield pytest.param(case, dtype, id=f"{case[0]}-{_dname(dtype)}")


# --------------------------------------------------------------------------- cpp vs reference


@pytest.mark.parametrize("case,replace,dtype", list(_concat_params(CASES + EMPTY_CASES, DTYPES)))
def test_concat_matches_reference(case, replace, dtype):
    embeds, prompts, idx, lens, at, grad = _concat_inputs(case, dtype, replace)
    out, dembeds, dprompts = _run_concat(embeds, prompts, idx, lens, at, replace, grad)
    want = R.soft_prompt_concat(embeds, prompts, idx, lens, at, replace)
    assert torch.equal(out, want), "the forward is a copy: it must be exact"
    want_de, want_dp = R.soft_prompt_concat_backward(grad, prompts.shape[0], prompts.shape[1], idx, lens, at, replace)
    assert torch.equal(dembeds, want_de), "dembeds is a copy: it must be exact"
    _close(dprompts, want_dp, dtype, "dprompts")


@pytest.mark.parametrize("weight_grad", [True, False], ids=["weight-grad", "frozen-weight"])
@pytest.mark.parametrize("case,dtype", list(_embed_params(CASES + EMPTY_CASES, DTYPES)))
def test_embed_matches_reference(case, dtype, weight_grad):
    ids, weight, prompts, idx, lens, at, grad = _embed_inputs(case, dtype)
    out, dweight, dprompts = _run_embed(ids, weight, prompts, idx, lens, at, grad, weight_grad)
    assert torch.equal(out, R.soft_prompt_embed(ids, weight, prompts, idx, lens, at))
    want_dw, want_dp = R.soft_prompt_embed_backward(grad, ids, weight.shape[0], prompts.shape[0], idx, lens, at, True)
    _close(dprompts, want_dp, dtype, "dprompts")
    if weight_grad:
        _close(dweight, want_dw, dtype, "dweight")
    else:
        assert dweight is None


def test_embed_backward_skips_dweight():
    ids, weight, prompts, idx, lens, at, grad = _embed_inputs(CASES[2], torch.float32)
    dweight, dprompts = torch.ops.peft_kernels.soft_prompt_embed_bwd(grad, ids, weight.shape[0], prompts.shape[0],
                                                                     idx, lens, at, False)
    assert dweight.shape == (0, weight.shape[1]) and dweight.dtype == grad.dtype
    _close(dprompts, R.soft_prompt_embed_backward(grad, ids, weight.shape[0], prompts.shape[0], idx, lens, at,
                                                  False)[1], torch.float32, "dprompts")


@pytest.mark.parametrize("layout", ["strided-L", "strided-B", "last-dim-strided"])
def test_concat_strided_embeds(layout):
    case = CASES[2]
    embeds, prompts, idx, lens, at, _ = _concat_inputs(case, torch.float32, False)
    B, L, H = embeds.shape
    if layout == "strided-L":
        view = torch.zeros(B, 2 * L, H)[:, ::2]
    elif layout == "strided-B":
        view = torch.zeros(2 * B, L, H)[::2]
    else:
        view = torch.zeros(B, L, 2 * H)[:, :, ::2]
    view.copy_(embeds)
    assert not view.is_contiguous()
    with pk.use_backend("cpp"):
        out = pk.soft_prompt_concat(view, prompts, prompt_index=idx, prompt_lens=lens, insert_at=at)
        assert pk.last_backend("soft_prompt_concat") == "cpp"
    assert torch.equal(out, R.soft_prompt_concat(embeds, prompts, idx, lens, at, False))


def test_embed_strided_table():
    """A column slice of a wider table (row stride != H) and a transposed one give the same rows."""
    ids, weight, prompts, idx, lens, at, _ = _embed_inputs(CASES[2], torch.float32)
    V, H = weight.shape
    wide = torch.zeros(V, 3 * H)
    wide[:, H:2 * H] = weight
    transposed = weight.t().contiguous().t()
    want = R.soft_prompt_embed(ids, weight, prompts, idx, lens, at)
    for table in (wide[:, H:2 * H], transposed):
        assert not table.is_contiguous()
        got = torch.ops.peft_kernels.soft_prompt_embed_fwd(ids, table, prompts, idx, lens, at)
        assert torch.equal(got, want)


def test_eager_inference_uses_cpp():
    """Without autograd the public ops call the cpp kernel directly (no custom-op dispatch)."""
    ids, weight, prompts, idx, lens, at, _ = _embed_inputs(CASES[1], torch.float32)
    with pk.use_backend("cpp"), torch.no_grad():
        out = pk.soft_prompt_embed(ids, weight, prompts, prompt_index=idx, prompt_lens=lens, insert_at=at)
        assert pk.last_backend("soft_prompt_embed") == "cpp"
        emb = torch.nn.functional.embedding(ids, weight)
        cat = pk.soft_prompt_concat(emb, prompts, prompt_index=idx, prompt_lens=lens, insert_at=at)
        assert pk.last_backend("soft_prompt_concat") == "cpp"
    assert torch.equal(out, cat)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("replace", [False, True], ids=["insert", "replace"])
@pytest.mark.parametrize("case", CASES[:4], ids=_case_ids(CASES[:4]))
def test_gradcheck_concat_cpp(case, replace):
    if replace and case[8] + case[5] > case[2]:
        pytest.skip("insert_at + P > L: no room to replace")
    embeds, prompts, idx, lens, at, _ = _concat_inputs(case, torch.float64, replace)
    e, p = embeds.requires_grad_(), prompts.requires_grad_()

    def fn(e, p):
        out = pk.soft_prompt_concat(e, p, prompt_index=idx, prompt_lens=lens, insert_at=at, replace=replace)
        assert pk.last_backend("soft_prompt_concat") == "cpp"
        return out

    with pk.use_backend("cpp"):
        assert torch.autograd.gradcheck(fn, (e, p))
        assert pk.last_backend("soft_prompt_concat_backward") == "cpp"


@pytest.mark.parametrize("case", CASES[:4], ids=_case_ids(CASES[:4]))
def test_gradcheck_embed_cpp(case):
    ids, weight, prompts, idx, lens, at, _ = _embed_inputs(case, torch.float64, V=9)
    w, p = weight.requires_grad_(), prompts.requires_grad_()

    def fn(w, p):
        out = pk.soft_prompt_embed(ids, w, p, prompt_index=idx, prompt_lens=lens, insert_at=at)
        assert pk.last_backend("soft_prompt_embed") == "cpp"
        return out

    with pk.use_backend("cpp"):
        assert torch.autograd.gradcheck(fn, (w, p))
        assert pk.last_backend("soft_prompt_embed_backward") == "cpp"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dname)
def test_backward_is_deterministic_across_thread_counts(dtype):
    """The sums run in row (token) order per output element: 1 and 2 threads give the same bits."""
    case = ("big", 16, 64, 1500, 1, 20, None, [17], 1)
    ids, weight, prompts, idx, lens, at, grad = _embed_inputs(case, dtype, V=40)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(torch.ops.peft_kernels.soft_prompt_embed_bwd(grad, ids, 40, 1, idx, lens, at, True))
            results.append(torch.ops.peft_kernels.soft_prompt_concat_bwd(grad, 1, 20, idx, lens, at, False))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(results[:2], results[2:]):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


@pytest.mark.parametrize("op", OPS)
def test_backward_keeps_the_forward_backend(op):
    """A forward forced to ``reference`` runs its backward on ``reference`` too, even after the block."""
    if op == "soft_prompt_concat":
        embeds, prompts, idx, lens, at, grad = _concat_inputs(CASES[2], torch.float32, False)
        leaves = [embeds.requires_grad_(), prompts.requires_grad_()]
        with pk.use_backend("reference"):
            out = pk.soft_prompt_concat(embeds, prompts, prompt_index=idx, prompt_lens=lens, insert_at=at)
    else:
        ids, weight, prompts, idx, lens, at, grad = _embed_inputs(CASES[2], torch.float32)
        leaves = [weight.requires_grad_(), prompts.requires_grad_()]
        with pk.use_backend("reference"):
            out = pk.soft_prompt_embed(ids, weight, prompts, prompt_index=idx, prompt_lens=lens, insert_at=at)
    assert pk.last_backend(op) == "reference"
    torch.autograd.grad(out, leaves, grad)
    assert pk.last_backend(f"{op}_backward") == "reference"


def test_double_backward_is_refused():
    """The backward is not itself differentiable: asking for a second derivative raises."""
    embeds, prompts, idx, lens, at, grad = _concat_inputs(CASES[2], torch.float64, False)
    prompts.requires_grad_()
    grad.requires_grad_()
    with pk.use_backend("cpp"):
        out = pk.soft_prompt_concat(embeds, prompts, prompt_index=idx, prompt_lens=lens, insert_at=at)
        (dprompts,) = torch.autograd.grad(out, [prompts], grad, create_graph=True)
        assert dprompts.requires_grad  # not a silently constant (zero) second derivative
        with pytest.raises(RuntimeError, match="differentiate twice"):
            dprompts.sum().backward()


# --------------------------------------------------------------------------- opcheck


def _opcheck_params():
    for case in (CASES[1], CASES[2], CASES[3]):
        for dtype in (torch.float32, torch.bfloat16):
            for replace in (False, True):
                if replace and case[8] + case[5] > case[2]:
                    continue
                yield pytest.param(case, dtype, replace, id=f"{case[0]}-{_dname(dtype)}-{replace}")


@pytest.mark.parametrize("case,dtype,replace", list(_opcheck_params()))
def test_opcheck_cpp(case, dtype, replace):
    embeds, prompts, idx, lens, at, grad = _concat_inputs(case, dtype, replace)
    T, P = prompts.shape[:2]
    with pk.use_backend("cpp"):
        torch.library.opcheck(torch.ops.peft_kernels.soft_prompt_concat.default,
                              (embeds.requires_grad_(), prompts.clone().requires_grad_(), idx, lens, at, replace))
        torch.library.opcheck(torch.ops.peft_kernels.soft_prompt_concat_backward.default,
                              (grad, T, P, idx, lens, at, replace))
        assert pk.last_backend("soft_prompt_concat_backward") == "cpp"
        if replace:
            return
        ids, weight, prompts, idx, lens, at, grad = _embed_inputs(case, dtype)
        torch.library.opcheck(torch.ops.peft_kernels.soft_prompt_embed.default,
                              (ids, weight.requires_grad_(), prompts.requires_grad_(), idx, lens, at))
        for need_dweight in (True, False):
            torch.library.opcheck(torch.ops.peft_kernels.soft_prompt_embed_backward.default,
                                  (grad, ids, weight.shape[0], T, idx, lens, at, need_dweight))
        assert pk.last_backend("soft_prompt_embed_backward") == "cpp"


# --------------------------------------------------------------------------- NaN/Inf in masked places

NAN_CASES = [CASES[2], CASES[3], CASES[1]]


def _poison_prompts(prompts, B, idx, lens):
    """NaN in slots past prompt_lens and in prompts no row uses; Inf in the -1 rows' would-be slot."""
    T, P, _ = prompts.shape
    bad = prompts.clone()
    length = lens.long().tolist() if lens is not None else [P] * T
    used = set(idx.long().tolist()) if idx is not None else set(range(T if T == B else 1))
    for t in range(T):
        bad[t, length[t]:] = float("nan")
        if t not in used:
            bad[t] = float("inf") if t % 2 else float("nan")
    return bad


def _poison_grad(grad, B, T, P, idx, lens, at):
    """NaN/-Inf in the grads of every masked prompt slot (past prompt_lens, and all of a -1 row's)."""
    bad = grad.clone()
    valid = _slot_valid(B, T, P, idx, lens)
    slots = bad[:, at:at + P]
    slots[~valid] = float("nan")
    if idx is not None and (idx < 0).any():
        slots[idx.long() < 0] = -float("inf")
    return bad


def _nan_params():
    for case in NAN_CASES:
        for backend in backends_for("soft_prompt_concat"):
            dtypes = [torch.float32] if backend == "triton" else [torch.float32, torch.bfloat16]
            for dtype in dtypes:
                yield pytest.param(case, backend, dtype, id=f"{case[0]}-{backend}-{_dname(dtype)}")


@pytest.mark.parametrize("replace", [False, True], ids=["insert", "replace"])
@pytest.mark.parametrize("case,backend,dtype", list(_nan_params()))
def test_concat_ignores_nan_in_masked_places(case, backend, dtype, replace):
    cid, B, L, H, T, P, index, lens_, at = case
    if replace and at + P > L:
        pytest.skip("insert_at + P > L: no room to replace")
    embeds, prompts, idx, lens, at, grad = _concat_inputs(case, dtype, replace)
    clean = _run_concat(embeds, prompts, idx, lens, at, replace, grad, backend)
    bad_embeds = embeds.clone()
    if replace:
        bad_embeds[:, at:at + P] = float("nan")  # overwritten by the prompt: never read
    bad = _run_concat(bad_embeds, _poison_prompts(prompts, B, idx, lens), idx, lens, at, replace,
                      _poison_grad(grad, B, T, P, idx, lens, at), backend)
    for name, x, y in zip(("out", "dembeds", "dprompts"), bad, clean):
        assert torch.isfinite(x).all(), f"{name} has NaN/Inf from a masked place on {backend}"
        assert torch.equal(x, y), f"{name} differs from the clean run on {backend}"


@pytest.mark.parametrize("case,backend,dtype", list(_nan_params()))
def test_embed_ignores_nan_in_masked_places(case, backend, dtype):
    cid, B, L, H, T, P, index, lens_, at = case
    ids, weight, prompts, idx, lens, at, grad = _embed_inputs(case, dtype)
    clean = _run_embed(ids, weight, prompts, idx, lens, at, grad, True, backend)
    bad_weight = weight.clone()
    unused = torch.ones(weight.shape[0], dtype=torch.bool)
    unused[ids.long().reshape(-1)] = False
    bad_weight[unused] = float("nan")  # table rows no token reads
    bad = _run_embed(ids, bad_weight, _poison_prompts(prompts, B, idx, lens), idx, lens, at,
                     _poison_grad(grad, B, T, P, idx, lens, at), True, backend)
    assert torch.isfinite(bad[0]).all() and torch.equal(bad[0], clean[0])
    assert torch.isfinite(bad[2]).all() and torch.equal(bad[2], clean[2])
    assert torch.equal(bad[1], clean[1])  # dweight: token slots only (the grad's masked slots never reach it)


# --------------------------------------------------------------------------- refusals of the native ops


def test_native_ops_refuse_bad_arguments():
    ops = torch.ops.peft_kernels
    embeds, prompts = torch.randn(2, 5, 4), torch.randn(3, 2, 4)
    with pytest.raises(RuntimeError, match="prompt_index"):
        ops.soft_prompt_concat_fwd(embeds, prompts, torch.tensor([0, 3]), None, 0, False)
    with pytest.raises(RuntimeError, match="insert_at"):
        ops.soft_prompt_concat_fwd(embeds, prompts, torch.tensor([0, 1]), None, 4, True)
    with pytest.raises(RuntimeError, match="prompts dtype"):
        ops.soft_prompt_concat_fwd(embeds, prompts.double(), None, None, 0, False)
    with pytest.raises(RuntimeError, match="T \\(3\\) must be 1 or B"):
        ops.soft_prompt_concat_bwd(torch.randn(2, 7, 4), 3, 2, None, None, 0, False)
    with pytest.raises(RuntimeError, match="input_ids"):
        ops.soft_prompt_embed_bwd(torch.randn(2, 7, 4), torch.tensor([[0, 1, 2, 3, 9]] * 2), 9, 1, None, None, 0, True)
    with pytest.raises(RuntimeError, match="input_ids"):
        ops.soft_prompt_embed_fwd(torch.tensor([[0, 9]]), torch.randn(9, 4), prompts[:1], None, None, 0)


def test_bf16_sums_round_like_torch():
    """dprompts in bf16: the fp32 sum rounded to nearest even, as ``.to(torch.bfloat16)`` does
    (overflow to Inf, NaN of a real slot kept), for H covering the vector and the scalar columns."""
    g = torch.Generator().manual_seed(5)
    B, L, P, H = 2, 3, 4, 37
    grad = (torch.randn(B, L + P, H, generator=g) * torch.logspace(-3, 3, H)).to(torch.bfloat16)
    grad[:, 0, :3] = 3e38  # 3e38 + 3e38 overflows float32 too
    grad[0, 1, 5] = float("nan")
    dweight, dprompts = torch.ops.peft_kernels.soft_prompt_embed_bwd(grad, torch.zeros(B, L, dtype=I64), 1, 1,
                                                                     None, None, 0, False)
    want = (grad[0, :P].float() + grad[1, :P].float()).to(torch.bfloat16)
    torch.testing.assert_close(dprompts[0], want, rtol=0, atol=0, equal_nan=True)  # NaN payloads may differ
    assert torch.isinf(dprompts[0, 0, :3]).all() and torch.isnan(dprompts[0, 1, 5])
