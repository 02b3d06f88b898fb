"""``lora_shrink`` / ``lora_expand`` on every backend (reference, cpp, Triton under the interpreter)
vs ``peft_kernels.reference``: forward and backward, mixed ranks (rank 0 too), -1 rows, adapters
without rows, T = 1, N = 1, odd sizes, index None; exact zeros in h's rank padding and -1 rows; the
composition equals ``multi_lora``; NaN/Inf planted where no result may look changes nothing;
gradcheck in fp64 (reference, cpp); opcheck; bad inputs raise naming the argument.
"""
from __future__ import annotations

import pytest
import torch

import peft_kernels as pk
from conftest import backends_for, tolerances
from peft_kernels import reference

BACKENDS = backends_for("lora_shrink")


def _ids(v):
    return str(v).replace("torch.", "")


def _dtypes(backend):
    # bf16 tl.dot is wrong in the Triton interpreter: bf16 runs on the GPU tests only; fp64 is reference.
    if backend == "triton":
        return [torch.float32, torch.float16]
    return [torch.float32, torch.float64, torch.float16, torch.bfloat16]


CASES = [(backend, dtype) for backend in BACKENDS for dtype in _dtypes(backend)]


def make_case(N, T, H_in, H_out, dtype, *, R=8, index="random", seed=0, poison=False):
    """Dict of inputs; ``poison``: NaN/Inf in the rank padding, in adapter 2 (no rows), in -1 rows."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.randint(1, R + 1, (T,), generator=g)
    ranks[0] = R
    if T > 1:
        ranks[1] = 1
    if T > 3:
        ranks[3] = 0
    a = torch.randn(T, R, H_in, generator=g, dtype=torch.float64) / H_in**0.5
    b = torch.randn(T, H_out, R, generator=g, dtype=torch.float64) / 2
    x = torch.randn(N, H_in, generator=g, dtype=torch.float64)
    h = torch.randn(N, R, generator=g, dtype=torch.float64)
    gh = torch.randn(N, R, generator=g, dtype=torch.float64)
    gy = torch.randn(N, H_out, generator=g, dtype=torch.float64)
    base = torch.randn(N, H_out, generator=g, dtype=torch.float64)
    idx = None
    if index == "random":
        idx = torch.randint(-1, T, (N,), generator=g)
        if N > 2:
            idx[0], idx[1] = -1, 0
        if T > 2:
            idx[idx == 2] = 0
    pad = torch.arange(R)[None, :] >= ranks[:, None]  # [T, R]
    rows = (idx if idx is not None else torch.zeros(N, dtype=torch.long) if T == 1 else torch.arange(N))
    row_pad = (rows[:, None] < 0) | pad[rows.clamp(min=0)]
    fill = (float("nan"), float("inf")) if poison else (0.0, 0.0)
    a = a.masked_fill(pad[:, :, None], fill[0])
    b = b.masked_fill(pad[:, None, :], fill[1])
    h, gh = h.masked_fill(row_pad, fill[0]), gh.masked_fill(row_pad, fill[1])
    if poison:
        if T > 2:
            a[2], b[2] = float("inf"), float("nan")
        if idx is not None:
            x[idx == -1], gy[idx == -1] = float("nan"), float("-inf")
    scaling = (torch.rand(T, generator=g) * 2 + 0.25).float()
    cast = lambda t: t.to(dtype)  # noqa: E731
    return dict(x=cast(x), a=cast(a), b=cast(b), h=h.float() if dtype != torch.float64 else h, gh=gh.float() if
                dtype != torch.float64 else gh, gy=cast(gy), base=cast(base), idx=idx, scaling=scaling,
                ranks=ranks.to(torch.int32))


def close(got, want, dtype, what=""):
    assert got.dtype == want.dtype and got.shape == want.shape, what
    assert torch.isfinite(got).all(), f"non-finite {what}"
    tol = tolerances(dtype)
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got, want, atol=tol["atol"] * scale, rtol=tol["rtol"], msg=what)


GRID = [(1, 1, 5, 3), (1, 4, 17, 9), (6, 1, 33, 20), (37, 5, 40, 19), (300, 3, 24, 130), (0, 3, 8, 5)]


@pytest.mark.parametrize("backend,dtype", CASES, ids=_ids)
@pytest.mark.parametrize("N,T,H_in,H_out", GRID)
def test_forward_and_backward_match_reference(backend, dtype, N, T, H_in, H_out):
    c = make_case(N, T, H_in, H_out, dtype, seed=N + T)
    with pk.use_backend(backend):
        h = pk.lora_shrink(c["x"], c["a"], c["idx"], ranks=c["ranks"], scaling=c["scaling"])
        assert pk.last_backend("lora_shrink") == backend
        y = pk.lora_expand(c["h"], c["b"], c["idx"], c["scaling"], ranks=c["ranks"], base=c["base"])
        assert pk.last_backend("lora_expand") == backend
        x, a, hh, b, base = (c[k].clone().requires_grad_(True) for k in ("x", "a", "h", "b", "base"))
        gx, ga = torch.autograd.grad(
            pk.lora_shrink(x, a, c["idx"], ranks=c["ranks"], scaling=c["scaling"]), (x, a), c["gh"])
        assert pk.last_backend("lora_shrink_backward") == backend
        gh_, gb, gbase = torch.autograd.grad(
            pk.lora_expand(hh, b, c["idx"], c["scaling"], ranks=c["ranks"], base=base), (hh, b, base), c["gy"])
        assert pk.last_backend("lora_expand_backward") == backend
    close(h, reference.lora_shrink(c["x"], c["a"], c["idx"], c["ranks"], c["scaling"]), dtype, "h")
    close(y, reference.lora_expand(c["h"], c["b"], c["idx"], c["scaling"], c["ranks"], c["base"]), dtype, "y")
    want_dx, want_da = reference.lora_shrink_backward(c["gh"], c["x"], c["a"], c["idx"], c["ranks"], c["scaling"])
    close(gx, want_dx, dtype, "dx")
    close(ga, want_da, dtype, "dlora_a")
    want_dh, want_db = reference.lora_expand_backward(c["gy"], c["h"], c["b"], c["idx"], c["scaling"], c["ranks"])
    close(gh_, want_dh, dtype, "dh")
    close(gb, want_db, dtype, "dlora_b")
    assert torch.equal(gbase, c["gy"])


@pytest.mark.parametrize("backend,dtype", CASES, ids=_ids)
def test_rank_space_zeros_and_composition(backend, dtype):
    c = make_case(29, 5, 21, 11, dtype, seed=2)
    with pk.use_backend(backend):
        h = pk.lora_shrink(c["x"], c["a"], c["idx"], ranks=c["ranks"])
        y = pk.lora_expand(h, c["b"], c["idx"], c["scaling"], ranks=c["ranks"], base=c["base"])
    assert h.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert not h[c["idx"] == -1].any()
    rows = c["idx"].clamp(min=0)
    pad = torch.arange(h.shape[1])[None, :] >= c["ranks"].long()[rows][:, None]
    assert not h[pad].any()
    close(y, reference.multi_lora(c["x"], c["a"], c["b"], c["idx"], c["scaling"], c["ranks"], c["base"]), dtype, "y")
    assert torch.equal(y[c["idx"] == -1], c["base"][c["idx"] == -1])


@pytest.mark.parametrize("backend,dtype", CASES, ids=_ids)
@pytest.mark.parametrize("N,T", [(1, 1), (9, 1), (9, 9)])
def test_index_none(backend, dtype, N, T):
    c = make_case(N, T, 13, 7, dtype, index=None, seed=4)
    with pk.use_backend(backend):
        h = pk.lora_shrink(c["x"], c["a"], None, ranks=c["ranks"], scaling=c["scaling"])
        y = pk.lora_expand(c["h"], c["b"], None, c["scaling"], ranks=c["ranks"])
    close(h, reference.lora_shrink(c["x"], c["a"], None, c["ranks"], c["scaling"]), dtype, "h")
    close(y, reference.lora_expand(c["h"], c["b"], None, c["scaling"], c["ranks"]), dtype, "y")


@pytest.mark.parametrize("backend,dtype", CASES, ids=_ids)
def test_nan_where_no_result_looks_changes_nothing(backend, dtype):
    clean, bad = (make_case(40, 5, 19, 12, dtype, seed=6, poison=p) for p in (False, True))

    def run(c):
        with pk.use_backend(backend):
            out = [pk.lora_shrink(c["x"], c["a"], c["idx"], ranks=c["ranks"], scaling=c["scaling"]),
                   pk.lora_expand(c["h"], c["b"], c["idx"], c["scaling"], ranks=c["ranks"], base=c["base"])]
            x, a, h, b = (c[k].clone().requires_grad_(True) for k in ("x", "a", "h", "b"))
            out += torch.autograd.grad(pk.lora_shrink(x, a, c["idx"], ranks=c["ranks"], scaling=c["scaling"]),
                                       (x, a), c["gh"])
            out += torch.autograd.grad(pk.lora_expand(h, b, c["idx"], c["scaling"], ranks=c["ranks"]), (h, b), c["gy"])
        return out

    for name, got, want in zip(("h", "y", "dx", "dlora_a", "dh", "dlora_b"), run(bad), run(clean)):
        # -1 rows of dx / y / dh: zeros or base; the poisoned x / grad_y rows must not leak anywhere.
        assert torch.isfinite(got).all(), f"{backend}: non-finite {name}"
        assert torch.equal(got, want), f"{backend}: {name} changed"


@pytest.mark.parametrize("backend", [b for b in ("reference", "cpp") if b in BACKENDS])
def test_gradcheck_fp64(backend):
    c = make_case(8, 3, 6, 5, torch.float64, R=4, seed=8)
    x, a, h, b, base = (c[k].clone().requires_grad_(True) for k in ("x", "a", "h", "b", "base"))
    with pk.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda x_, a_: pk.lora_shrink(x_, a_, c["idx"], ranks=c["ranks"], scaling=c["scaling"]), (x, a))
        assert torch.autograd.gradcheck(
            lambda h_, b_, base_: pk.lora_expand(h_, b_, c["idx"], c["scaling"], ranks=c["ranks"], base=base_),
            (h, b, base))
        assert pk.last_backend("lora_expand_backward") == backend


def test_opcheck():
    c = make_case(10, 3, 9, 6, torch.float32, seed=9)
    ops = torch.ops.peft_kernels
    torch.library.opcheck(ops.lora_shrink, (c["x"], c["a"], c["idx"], c["ranks"], c["scaling"]))
    torch.library.opcheck(ops.lora_expand, (c["h"], c["b"], c["idx"], c["scaling"], c["ranks"], c["base"]))
    if hasattr(ops, "lora_shrink_fwd"):
        torch.library.opcheck(ops.lora_shrink_fwd, (c["x"], c["a"], c["idx"], c["ranks"], None))
        torch.library.opcheck(ops.lora_shrink_bwd, (c["gh"], c["x"], c["a"], c["idx"], c["ranks"], c["scaling"]))
        torch.library.opcheck(ops.lora_expand_fwd, (c["h"], c["b"], c["idx"], c["scaling"], c["ranks"], c["base"]))
        torch.library.opcheck(ops.lora_expand_bwd, (c["gy"], c["h"], c["b"], c["idx"], c["scaling"], c["ranks"]))


def test_bad_inputs_name_the_argument():
    c = make_case(6, 3, 8, 5, torch.float32)
    x, a, b, h, idx, s, ranks = c["x"], c["a"], c["b"], c["h"], c["idx"], c["scaling"], c["ranks"]
    bad_shrink = [
        (dict(x=x[:, :5]), ValueError, "H_in"),
        (dict(x=x[0]), ValueError, "x must have 2 dims"),
        (dict(lora_a=a.double()), TypeError, "lora_a"),
        (dict(adapter_index=torch.full((6,), 3)), ValueError, "adapter_index"),
        (dict(adapter_index=idx[:4]), ValueError, "adapter_index"),
        (dict(ranks=torch.tensor([1, 2, 9])), ValueError, "ranks"),
        (dict(scaling=s[:2]), ValueError, "scaling"),
    ]
    for change, exc, match in bad_shrink:
        kw = dict(x=x, lora_a=a, adapter_index=idx, ranks=ranks, scaling=s, **{})
        kw.update(change)
        with pytest.raises(exc, match=match):
            pk.lora_shrink(kw.pop("x"), kw.pop("lora_a"), kw.pop("adapter_index"), **kw)
    bad_expand = [
        (dict(h=h[:, :5]), ValueError, "R"),
        (dict(h=h.to(torch.int32)), TypeError, "h"),
        (dict(h=h.half()), TypeError, "h must be"),
        (dict(base=c["base"][:, :3]), ValueError, "base"),
        (dict(base=c["base"].double()), TypeError, "base"),
        (dict(adapter_index=torch.full((6,), -2)), ValueError, "adapter_index"),
        (dict(scaling=s[:1]), ValueError, "scaling"),
        (dict(ranks=torch.tensor([1.0, 2.0, 3.0])), TypeError, "ranks"),
    ]
    for change, exc, match in bad_expand:
        kw = dict(h=h, lora_b=b, adapter_index=idx, scaling=s, ranks=ranks, base=c["base"])
        kw.update(change)
        with pytest.raises(exc, match=match):
            pk.lora_expand(kw.pop("h"), kw.pop("lora_b"), kw.pop("adapter_index"), kw.pop("scaling"), **kw)
