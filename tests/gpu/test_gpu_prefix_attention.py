"""Triton ``prefix_attention`` on a CUDA device at realistic sizes, vs ``peft_kernels.reference``.

fp16 / bf16 prefill forward + backward (B 4, Hq 32, Hkv 8, L 1024, D 128, P 32), split-K decode
(Lq 1, Lk 4096), odd head dims, determinism of the prefix grads, CUDA-graph capture of a decode
step, and that automatic backend selection on CUDA picks the Triton kernels.
"""
from __future__ import annotations

import os

import pytest
import torch

import peft_kernels
from peft_kernels import reference
from peft_kernels.ops import _dispatch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

tp = pytest.importorskip("peft_kernels.triton.prefix_attention")

DEV = torch.device("cuda")
FWD_TOL = {torch.float16: dict(atol=4e-3, rtol=4e-3), torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
           torch.float32: dict(atol=1e-4, rtol=1e-4)}
# relative Frobenius error of the grads vs the fp32 reference computed from the same low-precision inputs
GRAD_REL = {torch.float16: 1e-2, torch.bfloat16: 4e-2, torch.float32: 1e-4}


def _make(B, Hq, Hkv, Lq, Lk, D, T, P, dtype, *, index="mixed", lens="mixed", pad="left", causal=True, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=DEV, dtype=torch.float32).to(dtype)

    q, k, v = randn(B, Hq, Lq, D), randn(B, Hkv, Lk, D), randn(B, Hkv, Lk, D)
    pk, pv = randn(T, Hkv, P, D), randn(T, Hkv, P, D)
    index_t = None
    if index == "mixed":  # every entry used, one row without a prefix
        index_t = torch.tensor([(b % T) if b != 1 else -1 for b in range(B)], device=DEV, dtype=torch.int32)
    lens_t = None
    if lens == "mixed":
        lens_t = torch.tensor([max(P - 7 * t, 0) for t in range(T)], device=DEV, dtype=torch.int64)
    mask = None
    if pad == "left":
        mask = torch.ones(B, Lk, dtype=torch.bool, device=DEV)
        for b in range(B):
            mask[b, : (b * Lk) // (4 * B)] = False
    elif pad == "right":
        mask = torch.ones(B, Lk, dtype=torch.bool, device=DEV)
        for b in range(B):
            mask[b, Lk - (b * Lk) // (4 * B):] = False
    return (q, k, v, pk, pv, index_t, lens_t, mask, causal, D**-0.5)


def _public(args, grad_out=None):
    q, k, v, pk, pv, index, lens, mask, causal, scale = args
    leaves = [t.detach().clone().requires_grad_(grad_out is not None) for t in (q, k, v, pk, pv)]
    with peft_kernels.use_backend("triton"):
        out, lse = peft_kernels.prefix_attention(
            *leaves, prefix_index=index, prefix_lens=lens, key_padding_mask=mask, causal=causal,
            softmax_scale=scale, return_lse=True,
        )
        grads = None
        if grad_out is not None:
            out.backward(grad_out)
            grads = [t.grad for t in leaves]
    return out.detach(), lse, grads


def _rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-6)).item()


def _check(args, dtype, backward=True):
    ref_out, ref_lse = reference.prefix_attention(*args)
    grad_out = torch.randn_like(ref_out) if backward else None
    out, lse, grads = _public(args, grad_out)
    torch.testing.assert_close(out, ref_out, **FWD_TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, atol=1e-3 if dtype != torch.float32 else 1e-4, rtol=1e-4)
    if backward:
        ref_grads = reference.prefix_attention_backward(grad_out, *args)
        for name, got, want in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, ref_grads):
            assert got.dtype == want.dtype and got.shape == want.shape, name
            assert torch.isfinite(got).all(), name
            assert _rel(got, want) < GRAD_REL[dtype], f"{name}: rel err {_rel(got, want):.2e}"


def test_auto_selection_picks_triton():
    args = _make(2, 8, 2, 64, 64, 64, 2, 8, torch.float16)
    name, _ = _dispatch.select("prefix_attention", DEV, *args)
    out, lse = reference.prefix_attention(*args)
    bwd_name, _ = _dispatch.select("prefix_attention_backward", DEV, torch.randn_like(out), *args, out, lse)
    has_cuda = "cuda" in _dispatch.kernels("prefix_attention") and _dispatch.status("cuda")["cuda"][0]
    assert name == ("cuda" if has_cuda else "triton")
    assert bwd_name in ("cuda", "triton")
    if not has_cuda:
        assert bwd_name == "triton"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_prefill_forward_backward(dtype):
    _check(_make(4, 32, 8, 1024, 1024, 128, 3, 32, dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_decode_split_k(dtype):
    B, Hq, Hkv, Lk, D, T, P = 4, 32, 8, 4096, 128, 3, 32
    assert tp._num_splits(B, Hkv, 1, Hq // Hkv, P, Lk, DEV)[0] > 1
    _check(_make(B, Hq, Hkv, 1, Lk, D, T, P, dtype, pad="left"), dtype)
    # batch 1, shared prefix, no padding
    _check(_make(1, Hq, Hkv, 1, Lk, D, 1, P, dtype, index=None, lens=None, pad=None), dtype, backward=False)


@pytest.mark.parametrize("D", [80, 256])
def test_odd_and_large_head_dims(D):
    dtype = torch.bfloat16
    _check(_make(2, 8, 2, 200, 333, D, 2, 17, dtype, pad="right"), dtype)
    _check(_make(2, 8, 8, 97, 97, D, 1, 5, dtype, index=None, pad=None, causal=False), dtype)


def test_fp32_chunked_prefill():
    dtype = torch.float32
    _check(_make(2, 16, 4, 48, 300, 64, 2, 9, dtype, pad="right"), dtype)


def test_backward_deterministic():
    args = _make(4, 32, 8, 512, 512, 128, 2, 32, torch.bfloat16)
    grad_out = torch.randn(4, 32, 512, 128, device=DEV, dtype=torch.bfloat16)
    first = _public(args, grad_out)[2]
    second = _public(args, grad_out)[2]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_decode_cuda_graph_capture():
    """A decode step (validate=False) is capturable: no host syncs, shapes-only split choice."""
    dtype = torch.float16
    q, k, v, pk, pv, index, lens, mask, causal, scale = _make(2, 32, 8, 1, 2048, 128, 3, 32, dtype)
    kwargs = dict(prefix_index=index, prefix_lens=lens, key_padding_mask=mask, causal=causal, softmax_scale=scale,
                  validate=False)
    with peft_kernels.use_backend("triton"):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm up (autotune, compile) outside the capture
            for _ in range(2):
                peft_kernels.prefix_attention(q, k, v, pk, pv, **kwargs)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = peft_kernels.prefix_attention(q, k, v, pk, pv, **kwargs)
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    ref_out, _ = reference.prefix_attention(q, k, v, pk, pv, index, lens, mask, causal, scale)
    torch.testing.assert_close(out, ref_out, **FWD_TOL[dtype])


@pytest.mark.skipif(bool(os.environ.get("PEFT_KERNELS_AUTOTUNE")), reason="autotuning is forced by the environment")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_decode_runs_the_table_config_without_autotuning(dtype):
    """A decode step takes its config from configs/decode.json: the autotuner never runs (capture-safe)."""
    from peft_kernels.triton import _tuning

    args = _make(2, 32, 8, 1, 2048, 128, 3, 32, dtype)
    splits, _ = tp._num_splits(2, 8, 1, 4, 32, 2048, DEV)
    bucket = tp.decode_bucket(1, 4, 128, splits > 1)
    assert _tuning.table_entry("prefix_attention.fwd", _tuning.device_arch(DEV), dtype, bucket) is not None, bucket
    tp._fwd_tuned.cache.clear()
    out, lse = tp.prefix_attention_fwd(*args)
    assert not tp._fwd_tuned.cache, "the decode launch autotuned"
    want, _ = reference.prefix_attention(*args)
    torch.testing.assert_close(out, want, **FWD_TOL[dtype])
