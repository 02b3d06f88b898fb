"""Triton ``multi_lora`` kernels (interpreter on CPU) vs ``peft_kernels.reference``.

Forward and the three gradients (dx, dlora_a, dlora_b via autograd through the public op)
over: N in {1, 4, 33}; banks of T in {1, 3, 8} with mixed real ranks 0..16 in one bank; H_in /
H_out in {40, 130} and H_in 2049 for a tiny batch (split-K path); -1 rows, an adapter owning
every row, adapters owning none, index None (shared T == 1 and per-row T == N), int32 and int64
indices, strided (non-contiguous) x and base, 3-D x with a per-sequence index. Also: garbage
(NaN / huge) in the rank padding changes nothing, the backward is bitwise deterministic, the
segment metadata cache is reused and invalidated by an in-place index change, fp64 falls back.
fp32 and fp16 only (bf16 ``tl.dot`` is wrong in the interpreter: tests/gpu). Shapes are tiny.
"""
from __future__ import annotations

import pytest
import torch

import peft_kernels
from peft_kernels import reference

tm = pytest.importorskip("peft_kernels.triton.multi_lora")

I32, I64 = torch.int32, torch.int64
DTYPES = [torch.float32, torch.float16]

# id: (N, H_in, H_out, T, R, index, ranks, base)
#   index: list (int64), "i32:" + list, None (T == 1 shared or T == N per row)
CASES = {
    "n1-shared-T1-40x130": (1, 40, 130, 1, 8, None, None, True),
    "n4-T3-neg-rows-mixed-130x40": (4, 130, 40, 3, 16, [2, -1, 0, 2], [16, 1, 5], True),
    "n33-T8-mixed-ranks-idle-adapters": (33, 40, 40, 8, 16, "mixed8", [1, 16, 3, 8, 0, 12, 5, 2], False),
    "n33-T3-one-owner-i32-130x130": (33, 130, 130, 3, 8, "i32:owner1", [8, 3, 2], True),
    "n4-per-row-None-T==N": (4, 40, 130, 4, 8, None, [1, 2, 8, 5], False),
    "n4-h2049-splitK-decode": (4, 2049, 40, 3, 16, [0, 2, 2, -1], [16, 4, 9], True),
    "n33-shared-T1-row-chunks": (33, 130, 40, 1, 16, None, [11], True),
    "n4-all-neg": (4, 40, 40, 3, 4, [-1, -1, -1, -1], None, True),
}


def _index(spec, N, T):
    if spec is None:
        return None
    dtype = I64
    if isinstance(spec, str) and spec.startswith("i32:"):
        dtype, spec = I32, spec[4:]
    if spec == "mixed8":  # adapters 1, 4, 6 own no rows; -1 rows sprinkled in
        pool = [0, 2, 3, 5, 7, -1]
        spec = [pool[(n * 7 + n // 3) % len(pool)] for n in range(N)]
    elif spec == "owner1":
        spec = [1] * N
    return torch.tensor(spec, dtype=dtype)


def _make(case, dtype, seed=0):
    N, H_in, H_out, T, R, index, ranks, base = case
    g = torch.Generator().manual_seed(seed + N * 31 + H_in)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    x = randn(N, H_in)
    a = randn(T, R, H_in, scale=H_in**-0.5)
    b = randn(T, H_out, R, scale=R**-0.5)
    ranks_t = None if ranks is None else torch.tensor(ranks, dtype=I64)
    if ranks_t is not None:  # the contract: padding beyond the real rank is zero
        slot = torch.arange(R)
        keep = slot[None, :] < ranks_t[:, None]
        a = a * keep[:, :, None].to(dtype)
        b = b * keep[:, None, :].to(dtype)
    scaling = torch.linspace(0.5, 2.0, T, dtype=torch.float32)
    return (x, a, b, _index(index, N, T), scaling, ranks_t, randn(N, H_out) if base else None)


def _fwd_tol(dtype):
    return dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)


def _grad_tol(dtype):
    return dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)


def _run_public(args, grad_y=None):
    """Forward (and backward if grad_y) through ``peft_kernels.multi_lora``; (y, dx, dA, dB, dbase)."""
    x, a, b, index, scaling, ranks, base = args
    leaves = [None if t is None else t.detach().clone().requires_grad_(grad_y is not None) for t in (x, a, b, base)]
    y = peft_kernels.multi_lora(leaves[0], leaves[1], leaves[2], index, scaling, ranks=ranks, base=leaves[3])
    assert peft_kernels.last_backend("multi_lora") == "triton"
    grads = None
    if grad_y is not None:
        y.backward(grad_y)
        assert peft_kernels.last_backend("multi_lora_backward") == "triton"
        grads = [None if t is None else t.grad for t in leaves]
    return y.detach(), grads


def _check_grads(grads, grad_y, args, dtype, what):
    x, a, b, index, scaling, ranks, base = args
    want = reference.multi_lora_backward(grad_y, x, a, b, index, scaling, ranks)
    for name, got, ref in zip(("dx", "dlora_a", "dlora_b"), grads[:3], want):
        assert got.dtype == ref.dtype and got.shape == ref.shape, (what, name)
        torch.testing.assert_close(got, ref, **_grad_tol(dtype), msg=lambda m: f"{what} {name}: {m}")
    if base is not None:
        torch.testing.assert_close(grads[3], grad_y, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("cid", list(CASES))
def test_forward_backward_matches_reference(triton_interpret, cid, dtype):
    args = _make(CASES[cid], dtype)
    want = reference.multi_lora(*args)
    grad_y = torch.randn(want.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    y, grads = _run_public(args, grad_y)
    assert y.dtype == dtype and y.shape == want.shape
    torch.testing.assert_close(y, want, **_fwd_tol(dtype), msg=lambda m: f"{cid} y: {m}")
    _check_grads(grads, grad_y, args, dtype, cid)


_HS = [(40, 40), (40, 130), (130, 40), (130, 130)]


def _grid():
    n = 0
    for N in (1, 4, 33):
        for T in (1, 3, 8):
            for dtype in DTYPES:
                yield pytest.param(N, T, _HS[n % len(_HS)], dtype, n,
                                   id=f"N{N}-T{T}-{_HS[n % len(_HS)][0]}x{_HS[n % len(_HS)][1]}-{str(dtype)[6:]}")
                n += 1


@pytest.mark.parametrize("N,T,hs,dtype,seed", list(_grid()))
def test_serving_grid(triton_interpret, N, T, hs, dtype, seed):
    """Random per-row adapters (with -1 rows) over a bank of mixed ranks 1..16 (R = 16)."""
    g = torch.Generator().manual_seed(100 + seed)
    R = 16
    ranks = torch.randint(1, R + 1, (T,), generator=g)
    index = torch.randint(-1, T, (N,), generator=g)
    args = list(_make((N, hs[0], hs[1], T, R, None, ranks.tolist(), seed % 2 == 0), dtype, seed))
    args[3] = index.to(I32 if seed % 3 == 0 else I64)
    want = reference.multi_lora(*args)
    grad_y = torch.randn(want.shape, generator=g).to(dtype)
    y, grads = _run_public(args, grad_y)
    torch.testing.assert_close(y, want, **_fwd_tol(dtype))
    _check_grads(grads, grad_y, args, dtype, f"N{N} T{T}")


def test_rank_padding_garbage_is_never_read(triton_interpret):
    """NaN / huge values in the padding beyond each adapter's rank leave y and all grads unchanged
    (bitwise), and the padding of dlora_a / dlora_b, and unused adapters' grads, are exactly zero."""
    case = CASES["n33-T8-mixed-ranks-idle-adapters"]
    args = _make(case, torch.float32)
    x, a, b, index, scaling, ranks, base = args
    pad = torch.arange(a.shape[1])[None, :] >= ranks[:, None]  # [T, R]
    a_bad = a.clone()
    b_bad = b.clone()
    a_bad[pad] = float("nan")
    b_bad.permute(0, 2, 1)[pad] = 1e30
    grad_y = torch.randn(x.shape[0], b.shape[1], generator=torch.Generator().manual_seed(2))
    y, grads = _run_public(args, grad_y)
    y_bad, grads_bad = _run_public((x, a_bad, b_bad, index, scaling, ranks, base), grad_y)
    assert torch.equal(y, y_bad)
    for g, gb in zip(grads[:3], grads_bad[:3]):
        assert torch.equal(g, gb)
    dA, dB = grads_bad[1], grads_bad[2]
    assert (dA[pad] == 0).all() and (dB.permute(0, 2, 1)[pad] == 0).all()
    unused = [t for t in range(a.shape[0]) if not (index == t).any()]
    assert unused and (dA[unused] == 0).all() and (dB[unused] == 0).all()
    _check_grads(grads_bad, grad_y, args, torch.float32, "garbage padding")


@pytest.mark.parametrize("cid", ["n33-T3-one-owner-i32-130x130", "n33-shared-T1-row-chunks", "n4-h2049-splitK-decode"])
def test_backward_is_bitwise_deterministic(triton_interpret, cid):
    args = _make(CASES[cid], torch.float16)
    N, H_in, _, T, R = CASES[cid][:5]
    if "splitK" in cid:  # the cases really take the split-K / row-chunk paths
        assert tm._split_k(N, T, R, H_in, tm._block_m(N, T), torch.device("cpu")) > 1
    if "row-chunks" in cid:
        assert tm._row_chunks(N, T, R, H_in, torch.device("cpu")) > 1
    grad_y = torch.randn(args[0].shape[0], args[2].shape[1], generator=torch.Generator().manual_seed(3)).half()
    first = tm.multi_lora_backward(grad_y, *args[:6])
    second = tm.multi_lora_backward(grad_y, *args[:6])
    for p, q in zip(first, second):
        assert torch.equal(p, q)
    y1 = tm.multi_lora(*args)
    assert torch.equal(y1, tm.multi_lora(*args))


def test_segment_cache_reuse_and_invalidation(triton_interpret):
    N, T = 33, 3
    x, a, b, _, scaling, ranks, base = _make((N, 40, 40, T, 8, None, [8, 2, 5], True), torch.float32)
    index = torch.tensor([n % (T + 1) - 1 for n in range(N)], dtype=I64)
    tm.clear_segment_cache()
    meta = tm.segment_metadata(index, N, T, index.device)
    assert tm.segment_metadata(index, N, T, index.device) is meta  # same tensor, same version: hit

    hits = tm.CACHE_STATS["hits"]
    y1 = peft_kernels.multi_lora(x, a, b, index, scaling, ranks=ranks, base=base)
    y2 = peft_kernels.multi_lora(x * 2, a, b, index, scaling, ranks=ranks, base=base)  # "next layer"
    assert tm.CACHE_STATS["hits"] >= hits + 2
    assert peft_kernels.last_backend("multi_lora") == "triton"
    torch.testing.assert_close(y1, reference.multi_lora(x, a, b, index, scaling, ranks, base), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(y2, reference.multi_lora(x * 2, a, b, index, scaling, ranks, base), atol=2e-5, rtol=2e-5)

    index[::2] = 1  # in place: bumps the version counter, so the cached segments must not be used
    assert tm.segment_metadata(index, N, T, index.device) is not meta
    y3 = peft_kernels.multi_lora(x, a, b, index, scaling, ranks=ranks, base=base)
    torch.testing.assert_close(y3, reference.multi_lora(x, a, b, index, scaling, ranks, base), atol=2e-5, rtol=2e-5)

    index.copy_(torch.full((N,), 2, dtype=I64))
    y4 = peft_kernels.multi_lora(x, a, b, index, scaling, ranks=ranks, base=base)
    torch.testing.assert_close(y4, reference.multi_lora(x, a, b, index, scaling, ranks, base), atol=2e-5, rtol=2e-5)

    with torch.inference_mode():  # no version counter: never cached, still right
        inf_index = torch.tensor([0, 2, -1, 1], dtype=I64)
        xs = x[:4]
        y5 = peft_kernels.multi_lora(xs, a, b, inf_index, scaling, ranks=ranks, validate=False)
        inf_index[0] = 1
        y6 = peft_kernels.multi_lora(xs, a, b, inf_index, scaling, ranks=ranks, validate=False)
    torch.testing.assert_close(y5, reference.multi_lora(xs, a, b, torch.tensor([0, 2, -1, 1]), scaling, ranks))
    torch.testing.assert_close(y6, reference.multi_lora(xs, a, b, torch.tensor([1, 2, -1, 1]), scaling, ranks))


def test_strided_inputs_and_per_sequence_index(triton_interpret):
    g = torch.Generator().manual_seed(5)
    T, R, H_in, H_out = 3, 8, 40, 130
    a = torch.randn(T, R, H_in, generator=g) * H_in**-0.5
    b = torch.randn(T, H_out, R, generator=g) * R**-0.5
    ranks = torch.tensor([8, 3, 6], dtype=I32)
    scaling = torch.tensor([1.0, 0.5, 2.0])
    # strided 2-D x / base (column slices of wider buffers)
    xx = torch.randn(5, H_in + 7, generator=g)
    bb = torch.randn(5, H_out + 3, generator=g)
    x, base = xx[:, 2:2 + H_in], bb[:, 1:1 + H_out]
    index = torch.tensor([2, 0, -1, 1, 2], dtype=I32)
    y = peft_kernels.multi_lora(x, a, b, index, scaling, ranks=ranks, base=base)
    assert peft_kernels.last_backend("multi_lora") == "triton"
    torch.testing.assert_close(y, reference.multi_lora(x, a, b, index, scaling, ranks, base), atol=2e-5, rtol=2e-5)
    # 3-D x [B, L, H_in] with one adapter per sequence
    x3 = torch.randn(3, 4, H_in, generator=g)
    seq_index = torch.tensor([1, -1, 2])
    y3 = peft_kernels.multi_lora(x3, a, b, seq_index, scaling, ranks=ranks)
    want = reference.multi_lora(x3.reshape(12, H_in), a, b, seq_index.repeat_interleave(4), scaling, ranks)
    torch.testing.assert_close(y3, want.reshape(3, 4, H_out), atol=2e-5, rtol=2e-5)


def test_fp64_falls_back_with_a_reason(triton_interpret):
    args = _make(CASES["n4-T3-neg-rows-mixed-130x40"], torch.float64)
    reason = tm._supports_fwd(*args)
    assert reason and "float64" in reason
    y = peft_kernels.multi_lora(args[0], args[1], args[2], args[3], args[4], ranks=args[5], base=args[6])
    assert peft_kernels.last_backend("multi_lora") != "triton"
    torch.testing.assert_close(y, reference.multi_lora(*args))


def test_empty_and_degenerate_shapes(triton_interpret):
    a = torch.randn(2, 4, 6)
    b = torch.randn(2, 5, 4)
    scaling = torch.ones(2)
    y = peft_kernels.multi_lora(torch.randn(0, 6), a, b, torch.zeros(0, dtype=I64), scaling, base=torch.randn(0, 5))
    assert y.shape == (0, 5)
    dx, dA, dB = tm.multi_lora_backward(torch.randn(0, 5), torch.randn(0, 6), a, b, torch.zeros(0, dtype=I64), scaling)
    assert dx.shape == (0, 6) and (dA == 0).all() and (dB == 0).all()
    x = torch.randn(3, 6)
    zero_ranks = torch.zeros(2, dtype=I64)  # every adapter rank 0: y == base, grads zero
    base = torch.randn(3, 5)
    y = tm.multi_lora(x, a, b, torch.tensor([0, 1, -1]), scaling, zero_ranks, base)
    assert torch.equal(y, base)
