"""``prefix_attention_varlen`` on a CUDA device: every CUDA backend (triton, cuda when registered) vs
``peft_kernels.reference`` at realistic packed sizes.

bf16 / fp16 / fp32 prefill forward + backward (S 8 sequences of ragged lengths up to 512, Hq 32,
Hkv 8, D 128, P 32, a -1 sequence, prefix_lens < P, an empty sequence), q/k/v as strided views of
[1, H, N, D] tensors, decode (every Lq_s = 1, Lk_s up to 2048), odd head dims, non-causal,
determinism of the prefix grads, and CUDA-graph capture of a decode step with validate=False.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import peft_kernels
from peft_kernels import reference
from peft_kernels.ops import _dispatch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

OP, BWD = "prefix_attention_varlen", "prefix_attention_varlen_backward"
DEV = torch.device("cuda")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
FWD_TOL = {torch.float16: dict(atol=4e-3, rtol=4e-3), torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
           torch.float32: dict(atol=1e-4, rtol=1e-4)}
# relative Frobenius error of the grads vs the reference computed from the same low-precision inputs
GRAD_REL = {torch.float16: 1e-2, torch.bfloat16: 4e-2, torch.float32: 1e-4}


def _cuda_backends() -> list[str]:
    if not torch.cuda.is_available():
        return []
    usable = _dispatch.status("cuda")
    return [b for b in _dispatch.kernels(OP) if b != "reference" and usable[b][0] and b in _dispatch.kernels(BWD)]


BACKENDS = _cuda_backends() or [pytest.param("none", marks=pytest.mark.skip(reason="no CUDA backend registered"))]


def _make(seqs, Hq, Hkv, D, T, P, dtype, *, index=None, lens=None, causal=True, seed=0):
    """Packed q, k, v as [N, H, D] views of [1, H, N, D] tensors (how the model layer hands them over)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    Lq, Lk = [s[0] for s in seqs], [s[1] for s in seqs]

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=DEV, dtype=torch.float32).to(dtype)

    q = randn(1, Hq, sum(Lq), D)[0].transpose(0, 1)
    k, v = (randn(1, Hkv, sum(Lk), D)[0].transpose(0, 1) for _ in range(2))
    pk, pv = randn(T, Hkv, P, D), randn(T, Hkv, P, D)
    cu = [torch.tensor([0, *itertools.accumulate(L)], dtype=torch.int32, device=DEV) for L in (Lq, Lk)]
    kw = dict(cu_seqlens_q=cu[0], cu_seqlens_k=cu[1], max_seqlen_q=max(Lq), max_seqlen_k=max(Lk),
              prefix_index=None if index is None else torch.tensor(index, dtype=torch.int32, device=DEV),
              prefix_lens=None if lens is None else torch.tensor(lens, dtype=torch.int64, device=DEV), causal=causal)
    return [q, k, v, pk, pv], kw


def _ref_args(tensors, kw):
    return (*tensors, kw["cu_seqlens_q"], kw["cu_seqlens_k"], kw["max_seqlen_q"], kw["max_seqlen_k"],
            kw["prefix_index"], kw["prefix_lens"], kw["causal"], tensors[0].shape[-1] ** -0.5)


def _public(backend, tensors, kw, grad_out=None, validate=True):
    leaves = [t.detach().clone().requires_grad_(grad_out is not None) for t in tensors]  # clone keeps strides
    with peft_kernels.use_backend(backend):
        out, lse = peft_kernels.prefix_attention_varlen(*leaves, **kw, return_lse=True, validate=validate)
        grads = None
        if grad_out is not None:
            grads = torch.autograd.grad(out, leaves, grad_out)
    assert peft_kernels.last_backend(OP) == backend
    return out.detach(), lse, grads


def _rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-6)).item()


def _check(backend, tensors, kw, dtype, backward=True):
    args = _ref_args(tensors, kw)
    ref_out, ref_lse = reference.prefix_attention_varlen(*args)
    grad_out = torch.randn_like(ref_out) if backward else None
    out, lse, grads = _public(backend, tensors, kw, grad_out)
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype and out.is_contiguous()
    torch.testing.assert_close(out, ref_out, **FWD_TOL[dtype])
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    torch.testing.assert_close(lse.masked_fill(torch.isneginf(lse), 0), ref_lse.masked_fill(torch.isneginf(ref_lse), 0),
                               atol=1e-3 if dtype != torch.float32 else 1e-4, rtol=1e-4)
    if backward:
        want = reference.prefix_attention_varlen_backward(grad_out, *args)
        for name, g, w in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, want):
            assert g.shape == w.shape and g.dtype == w.dtype, name
            assert torch.isfinite(g.float()).all(), name
            if w.abs().max() > 0:
                assert _rel(g, w) < GRAD_REL[dtype], f"{name}: rel error {_rel(g, w):.3g}"
            else:
                assert g.abs().max() == 0, name


PREFILL = [(37, 37), (512, 512), (0, 0), (200, 260), (1, 1), (129, 129), (64, 300), (333, 333)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefill_forward_backward(dtype, causal, backend):
    tensors, kw = _make(PREFILL, 32, 8, 128, 4, 32, dtype, index=[0, 1, 2, -1, 3, 0, 1, 2], lens=[32, 17, 1, 0],
                        causal=causal)
    _check(backend, tensors, kw, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode(dtype, backend):
    lengths = [1, 7, 2048, 300, 64, 1000, 129, 0, 513, 16, 1536, 77, 255, 256, 1999, 3]
    tensors, kw = _make([(1, n) for n in lengths], 32, 8, 128, 2, 48, dtype,
                        index=[s % 3 - 1 for s in range(16)], lens=[48, 5])
    _check(backend, tensors, kw, dtype, backward=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [40, 96, 24])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_odd_head_dims_and_gqa(dtype, D, backend):
    tensors, kw = _make([(33, 33), (5, 70), (1, 9), (90, 90)], 12, 4, D, 1, 7, dtype)
    _check(backend, tensors, kw, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_grads_are_deterministic(backend):
    tensors, kw = _make(PREFILL, 16, 4, 64, 1, 32, torch.bfloat16)
    grad_out = torch.randn(tensors[0].shape, device=DEV, dtype=torch.bfloat16)
    runs = [_public(backend, tensors, kw, grad_out)[2] for _ in range(3)]
    for other in runs[1:]:
        for name, a, b in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), other, runs[0]):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_step_captures_in_a_cuda_graph(backend):
    if backend == "reference":
        pytest.skip("the reference reads cu_seqlens on the host")
    tensors, kw = _make([(1, n) for n in (17, 300, 1, 64)], 16, 4, 64, 2, 16, torch.bfloat16, index=[0, -1, 1, 0])
    with peft_kernels.use_backend(backend):
        static = [t.clone() for t in tensors]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):  # warm-up: compile and pick configs outside the capture
                peft_kernels.prefix_attention_varlen(*static, **kw, validate=False)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = peft_kernels.prefix_attention_varlen(*static, **kw, validate=False)
        fresh, _ = _make([(1, n) for n in (17, 300, 1, 64)], 16, 4, 64, 2, 16, torch.bfloat16, index=[0, -1, 1, 0],
                         seed=5)
        for dst, src in zip(static, fresh):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
    want = reference.prefix_attention_varlen(*_ref_args(fresh, kw))[0]
    torch.testing.assert_close(out, want, **FWD_TOL[torch.bfloat16])


def test_automatic_selection_on_cuda_is_not_the_reference():
    if not _cuda_backends():
        pytest.skip("no CUDA backend registered")
    tensors, kw = _make([(8, 8), (3, 3)], 8, 2, 64, 1, 4, torch.float16)
    peft_kernels.prefix_attention_varlen(*tensors, **kw)
    assert peft_kernels.last_backend(OP) in _cuda_backends()
