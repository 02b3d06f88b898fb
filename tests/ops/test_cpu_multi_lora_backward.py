"""The C++ (CPU) backward of ``multi_lora``: ``torch.ops.peft_kernels.multi_lora_bwd`` vs
``peft_kernels.reference.multi_lora_backward``, directly and through autograd with the ``cpp``
backend forced.

fp32/fp64/fp16/bf16; mixed ranks (rank 0 too), -1 rows, adapters without rows, T = 1, N = 1, odd
sizes, index None; adapters with more rows than one work item (chunked partial sums); NaN/Inf
planted in the rank padding, in unused adapters and in -1 rows must leave every result finite and
equal to the clean call; bitwise the same for 1 and 2 threads; gradcheck in fp64; opcheck; every
instruction-set copy in a subprocess.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import peft_kernels as pk
from conftest import tolerances
from peft_kernels import _ext, reference

pytestmark = pytest.mark.skipif(
    not (_ext.CPU.loaded and hasattr(torch.ops.peft_kernels, "multi_lora_bwd")),
    reason=f"peft_kernels._C with multi_lora_bwd not built: {_ext.CPU.error}",
)
BWD = getattr(torch.ops.peft_kernels, "multi_lora_bwd", None)
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _ids(v):
    return str(v).replace("torch.", "")


def make_case(N, T, H_in, H_out, dtype, *, R=16, index="random", seed=0, poison=False):
    """(grad_y, x, lora_a, lora_b, adapter_index, scaling, ranks); ``poison``: NaN/Inf where no result may look."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.randint(1, R + 1, (T,), generator=g)
    ranks[0] = R
    if T > 1:
        ranks[1] = 1
    if T > 3:
        ranks[3] = 0
    a = torch.randn(T, R, H_in, generator=g, dtype=torch.float64) / H_in**0.5
    b = torch.randn(T, H_out, R, generator=g, dtype=torch.float64) / 4
    x = torch.randn(N, H_in, generator=g, dtype=torch.float64)
    gy = torch.randn(N, H_out, generator=g, dtype=torch.float64)
    if index == "random":
        idx = torch.randint(-1, T, (N,), generator=g)
        if N > 2:
            idx[0], idx[1] = -1, 0
        if T > 2:
            idx[idx == 2] = 0  # adapter 2 has no rows
    else:
        idx = None
    pad_a = torch.arange(R)[None, :, None] >= ranks[:, None, None]
    pad_b = torch.arange(R)[None, None, :] >= ranks[:, None, None]
    if poison:
        a = a.masked_fill(pad_a, float("nan"))
        b = b.masked_fill(pad_b, float("inf"))
        if T > 2:
            a[2], b[2] = float("nan"), float("-inf")
        if idx is not None:
            x[idx == -1] = float("nan")
            gy[idx == -1] = float("inf")
    else:
        a, b = a.masked_fill(pad_a, 0), b.masked_fill(pad_b, 0)
    scaling = (torch.rand(T, generator=g) * 2 + 0.25).float()
    return gy.to(dtype), x.to(dtype), a.to(dtype), b.to(dtype), idx, scaling, ranks.to(torch.int32)


def check(got, want, dtype):
    for u, w, name in zip(got, want, ("dx", "dlora_a", "dlora_b")):
        assert u.dtype == w.dtype and u.shape == w.shape, name
        assert torch.isfinite(u).all(), f"non-finite {name}"
        tol = tolerances(dtype)  # sums over hundreds of rows: absolute error relative to the largest entry
        scale = max(1.0, w.abs().max().item()) if w.numel() else 1.0
        torch.testing.assert_close(u, w, atol=tol["atol"] * scale, rtol=tol["rtol"], msg=name)


GRID = [(N, T, H_in, H_out) for N, T in ((0, 3), (1, 1), (1, 4), (5, 8), (33, 3), (40, 1), (300, 2), (600, 1))
        for H_in, H_out in ((17, 130), (130, 40))]


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("N,T,H_in,H_out", GRID)
def test_kernel_matches_reference(dtype, N, T, H_in, H_out):
    args = make_case(N, T, H_in, H_out, dtype)
    check(BWD(*args), reference.multi_lora_backward(*args), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("N,T", [(1, 1), (7, 1), (7, 7)])
def test_index_none(dtype, N, T):
    args = make_case(N, T, 24, 9, dtype, index=None)
    check(BWD(*args), reference.multi_lora_backward(*args), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_ids)
@pytest.mark.parametrize("N,T", [(33, 5), (600, 4), (700, 1)])
def test_nan_where_no_result_looks_changes_nothing(dtype, N, T):
    clean = make_case(N, T, 40, 24, dtype, seed=3)
    poisoned = make_case(N, T, 40, 24, dtype, seed=3, poison=True)
    got = BWD(*poisoned)
    for u, w in zip(got, BWD(*clean)):
        assert torch.isfinite(u).all()
        assert torch.equal(u, w)
    # The reference obeys the same rule.
    for u, w in zip(reference.multi_lora_backward(*poisoned), reference.multi_lora_backward(*clean)):
        assert torch.isfinite(u).all()
        torch.testing.assert_close(u, w, **tolerances(dtype))
    # Unused and rank-0 adapters and the rank padding get exactly zero gradients.
    dA, dB, ranks = got[1], got[2], clean[6]
    if T > 2:
        assert not dA[2].any() and not dB[2].any()
    for t, r in enumerate(ranks.tolist()):
        assert not dA[t, r:].any() and not dB[t, :, r:].any()


@pytest.mark.parametrize("N,T", [(64, 4), (1100, 1), (1024, 64)])
def test_bitwise_the_same_for_any_thread_count(N, T):
    args = make_case(N, T, 64, 48, torch.float32, seed=5)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = BWD(*args)
        torch.set_num_threads(2)
        two, again = BWD(*args), BWD(*args)
    finally:
        torch.set_num_threads(before)
    for u, v, w in zip(one, two, again):
        assert torch.equal(u, v) and torch.equal(v, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_ids)
def test_autograd_runs_the_cpp_backward(dtype):
    gy, x, a, b, idx, s, ranks = make_case(45, 4, 33, 20, dtype, seed=7)
    base = torch.randn(45, 20, dtype=dtype)
    leaves = [t.clone().requires_grad_(True) for t in (x, a, b, base)]
    with pk.use_backend("cpp"):
        y = pk.multi_lora(leaves[0], leaves[1], leaves[2], idx, s, ranks=ranks, base=leaves[3])
        grads = torch.autograd.grad(y, leaves, gy)
        assert pk.last_backend("multi_lora_backward") == "cpp"
    check(grads[:3], reference.multi_lora_backward(gy, x, a, b, idx, s, ranks), dtype)
    assert torch.equal(grads[3], gy)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_gradcheck_fp64(backend):
    _, x, a, b, idx, s, ranks = make_case(9, 3, 6, 5, torch.float64, R=4, seed=11)
    base = torch.randn(9, 5, dtype=torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (x, a, b, base)]
    with pk.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda x_, a_, b_, base_: pk.multi_lora(x_, a_, b_, idx, s, ranks=ranks, base=base_), leaves)
        assert pk.last_backend("multi_lora_backward") == backend


def test_opcheck_native_ops():
    args = make_case(11, 3, 12, 7, torch.float32, seed=13)
    torch.library.opcheck(BWD, args)
    gy, x, a, b, idx, s, ranks = args
    torch.library.opcheck(torch.ops.peft_kernels.multi_lora_fwd, (x, a, b, idx, s, ranks, None))


def test_bad_arguments_raise():
    gy, x, a, b, idx, s, ranks = make_case(6, 3, 8, 5, torch.float32)
    with pytest.raises(RuntimeError, match="grad_y"):
        BWD(gy[:, :4], x, a, b, idx, s, ranks)
    with pytest.raises(RuntimeError, match="adapter_index"):
        BWD(gy, x, a, b, torch.full((6,), 3), s, ranks)
    with pytest.raises(RuntimeError, match="ranks"):
        BWD(gy, x, a, b, idx, s, torch.tensor([1, 2, 17], dtype=torch.int32))


@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
def test_every_instruction_set_copy(isa):
    script = textwrap.dedent(
        """
        import sys, torch
        sys.path.insert(0, sys.argv[1])
        from test_cpu_multi_lora_backward import make_case, check, BWD, DTYPES
        from peft_kernels import reference
        for dtype in DTYPES:
            for N, T in ((1, 1), (37, 4), (600, 2)):
                args = make_case(N, T, 35, 19, dtype, seed=N)
                check(BWD(*args), reference.multi_lora_backward(*args), dtype)
        print("ok")
        """
    )
    env = dict(os.environ, PEFT_KERNELS_CPU_ISA=isa)
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join([os.path.dirname(here), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", script, here], env=dict(env, PYTHONPATH=path), capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
