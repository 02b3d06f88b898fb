"""Packed (varlen) soft-prompt ops on CUDA at realistic sizes: Triton kernels vs ``peft_kernels.reference``.

fp16 / bf16 / fp32; forward (exact: a copy), backward (dprompts, dembeds, dweight; fp32
accumulation, deterministic), automatic backend choice on CUDA tensors, and a CUDA-graph capture of
``soft_prompt_varlen_cu_seqlens`` + the embed forward with ``validate=False`` (no host sync).
"""
from __future__ import annotations

import os

import pytest
import torch

import peft_kernels as pk
from peft_kernels import reference as R

from test_gpu_soft_prompt import DEV, DTYPES, _bank, _close, _ids, _kernel

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _packing(kind, lengths, T, P):
    """(cu_seqlens, T, prompt_index, prompt_lens) for an explicit index with -1 entries, or index None
    (the padded tests' banks, one row per sequence)."""
    cu = torch.tensor([0] + lengths, device=DEV).cumsum(0).to(torch.int32)
    return (cu, *_bank(kind, len(lengths), T, P, DEV))


LENGTHS = [512, 0, 37, 256, 1, 130, 499, 64, 0, 300, 17, 222, 5, 480, 90, 128]


@pytest.mark.parametrize("kind", ["indexed", "shared", "per-seq"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_embed_llm_sizes(triton_interpret, dtype, kind):
    torch.manual_seed(0)
    H, V, P = 4096, 32000, 20
    cu, T, index, lens = _packing(kind, LENGTHS, 5, P)
    N = int(cu[-1])
    weight = torch.randn(V, H, device=DEV, dtype=dtype)
    prompts = torch.randn(T, P, H, device=DEV, dtype=dtype)
    ids = torch.randint(0, V, (N,), device=DEV, dtype=torch.int64 if kind == "indexed" else torch.int32)
    ids[:300] = ids[0]  # a repeated id: one dweight row summed over many tokens
    co = pk.soft_prompt_varlen_cu_seqlens(cu, prompts, prompt_index=index, prompt_lens=lens)
    total = int(co[-1])
    fwd = (ids, weight, prompts, cu, co, total, index, lens)
    assert torch.equal(_kernel("soft_prompt_embed_varlen", *fwd)(*fwd), R.soft_prompt_embed_varlen(*fwd))

    grad = torch.randn(total, H, device=DEV, dtype=dtype)
    bwd = (grad, ids, cu, co, V, T, P, index, lens, True)
    want_dw, want_dp = R.soft_prompt_embed_varlen_backward(*bwd)
    got_dw, got_dp = _kernel("soft_prompt_embed_varlen_backward", *bwd)(*bwd)
    _close(got_dw, want_dw, dtype, "dweight")
    _close(got_dp, want_dp, dtype, "dprompts")
    again = _kernel("soft_prompt_embed_varlen_backward", *bwd)(*bwd)
    assert torch.equal(again[0], got_dw) and torch.equal(again[1], got_dp), "backward must be deterministic"

    w, p = weight.clone().requires_grad_(), prompts.clone().requires_grad_()
    with pk.use_backend("triton"):
        out = pk.soft_prompt_embed_varlen(ids, w, p, cu_seqlens=cu, prompt_index=index, prompt_lens=lens)
        out.backward(grad)
    _close(w.grad, want_dw, dtype, "autograd dweight")
    _close(p.grad, want_dp, dtype, "autograd dprompts")


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("shape", [(4096, 20, 4), (768, 10, 3), (1000, 7, 5)], ids=["llm", "vit", "odd-h"])
def test_concat_sizes(triton_interpret, dtype, shape):
    torch.manual_seed(1)
    H, P, T = shape
    cu, T, index, lens = _packing("indexed", LENGTHS, T, P)
    N = int(cu[-1])
    embeds = torch.randn(N, H, device=DEV, dtype=dtype)
    prompts = torch.randn(T, P, H, device=DEV, dtype=dtype)
    co = pk.soft_prompt_varlen_cu_seqlens(cu, prompts, prompt_index=index, prompt_lens=lens)
    total = int(co[-1])
    fwd = (embeds, prompts, cu, co, total, index, lens)
    assert torch.equal(_kernel("soft_prompt_concat_varlen", *fwd)(*fwd), R.soft_prompt_concat_varlen(*fwd))
    grad = torch.randn(total, H, device=DEV, dtype=dtype)
    bwd = (grad, cu, co, N, T, P, index, lens)
    want_de, want_dp = R.soft_prompt_concat_varlen_backward(*bwd)
    got_de, got_dp = _kernel("soft_prompt_concat_varlen_backward", *bwd)(*bwd)
    assert torch.equal(got_de, want_de)
    _close(got_dp, want_dp, dtype, "dprompts")
    assert torch.equal(_kernel("soft_prompt_concat_varlen_backward", *bwd)(*bwd)[1], got_dp), "deterministic"


@pytest.mark.skipif(bool(os.environ.get("PEFT_KERNELS_BACKEND")), reason="a backend is forced by the environment")
def test_auto_selection_on_cuda():
    H, V, T, P = 64, 50, 2, 4
    cu = torch.tensor([0, 3, 3, 8], dtype=torch.int32, device=DEV)
    index = torch.tensor([1, -1, 0], device=DEV)
    weight = torch.randn(V, H, device=DEV, dtype=torch.float16, requires_grad=True)
    prompts = torch.randn(T, P, H, device=DEV, dtype=torch.float16, requires_grad=True)
    ids = torch.randint(0, V, (8,), device=DEV)
    embeds = torch.randn(8, H, device=DEV, dtype=torch.float16, requires_grad=True)
    for op, out in (
        ("soft_prompt_embed_varlen", pk.soft_prompt_embed_varlen(ids, weight, prompts, cu_seqlens=cu,
                                                                 prompt_index=index)),
        ("soft_prompt_concat_varlen", pk.soft_prompt_concat_varlen(embeds, prompts, cu_seqlens=cu, prompt_index=index)),
    ):
        out.sum().backward()
        assert pk.last_backend(op) == "triton" and pk.last_backend(op + "_backward") == "triton"


def test_cuda_graph_capture():
    """The per-batch path with validate=False: boundaries and forward captured, replayed on new data."""
    H, V, T, P = 256, 100, 3, 6
    cu = torch.tensor([0, 5, 5, 12, 20], dtype=torch.int32, device=DEV)
    index = torch.tensor([2, 0, -1, 1], device=DEV)
    lens = torch.tensor([6, 2, 4], device=DEV)
    weight = torch.randn(V, H, device=DEV)
    prompts = torch.randn(T, P, H, device=DEV)
    ids = torch.randint(0, V, (20,), device=DEV)
    total = 20 + 4 + 6 + 2

    def step():
        co = pk.soft_prompt_varlen_cu_seqlens(cu, prompts, prompt_index=index, prompt_lens=lens)
        return pk.soft_prompt_embed_varlen(ids, weight, prompts, cu_seqlens=cu, prompt_index=index, prompt_lens=lens,
                                           cu_seqlens_out=co, total_out=total, validate=False)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up (Triton compiles here, not during capture)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    ids.copy_(torch.randint(0, V, (20,), device=DEV))
    graph.replay()
    torch.cuda.synchronize()
    co = pk.soft_prompt_varlen_cu_seqlens(cu, prompts, prompt_index=index, prompt_lens=lens)
    assert torch.equal(out, R.soft_prompt_embed_varlen(ids, weight, prompts, cu, co, total, index, lens))
