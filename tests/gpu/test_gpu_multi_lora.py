"""``multi_lora`` on CUDA at LLM sizes: Triton kernels vs ``peft_kernels.reference``.

H_in = H_out = 4096, a bank of 8 adapters with mixed real ranks 8..64 (R = 64), fp16 / bf16;
decode (N 1..64, split-K shrink) and prefill (N 2048); forward + backward (dx, dlora_a,
dlora_b through autograd), bitwise-deterministic backward, CUDA-graph capture of a decode
step (the segment pass does no host sync; a new index in the static buffer is honoured on
replay), and automatic backend choice on CUDA tensors.
"""
from __future__ import annotations

import pytest
import torch

import peft_kernels
from peft_kernels import _ext, reference
from peft_kernels.ops import _dispatch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEV = "cuda"
H = 4096
T, R = 8, 64
RANKS = [8, 64, 16, 32, 8, 48, 64, 24]
DTYPES = [torch.float16, torch.bfloat16]
# relative to the largest |reference| value of each tensor (sums over 4096 / 2048 terms)
TOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float32: 1e-4}


def _ids(d):
    return str(d).replace("torch.", "")


def _bank(dtype, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    ranks = torch.tensor(RANKS, dtype=torch.int32, device=DEV)
    keep = torch.arange(R, device=DEV)[None, :] < ranks[:, None]
    a = torch.randn(T, R, H, generator=g, device=DEV) * H**-0.5 * keep[:, :, None]
    b = torch.randn(T, H, R, generator=g, device=DEV) * R**-0.5 * keep[:, None, :]
    scaling = (16.0 / ranks.float()).contiguous()
    return a.to(dtype), b.to(dtype), scaling, ranks


def _batch(N, dtype, seed=1):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(N, H, generator=g, device=DEV).to(dtype)
    base = torch.randn(N, H, generator=g, device=DEV).to(dtype)
    index = torch.randint(-1, T, (N,), generator=g, device=DEV)
    if N > 8:
        index[index == 3] = 5  # adapter 3 owns no row
    return x, base, index


def _close(got, want, dtype, what):
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, want.dtype)
    scale = want.float().abs().max().item() or 1.0
    tol = TOL[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol * scale, rtol=tol, msg=lambda m: f"{what}: {m}")


def _fwd_bwd(x, a, b, index, scaling, ranks, base, grad_y):
    leaves = [t.detach().clone().requires_grad_() for t in (x, a, b)]
    with peft_kernels.use_backend("triton"):  # the csrc/cuda kernel (tested on its own) would win N <= 64
        y = peft_kernels.multi_lora(leaves[0], leaves[1], leaves[2], index, scaling, ranks=ranks, base=base)
        assert peft_kernels.last_backend("multi_lora") == "triton"
        y.backward(grad_y)
        assert peft_kernels.last_backend("multi_lora_backward") == "triton"
    return y.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("N", [1, 7, 64, 2048], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_forward_backward_llm_sizes(triton_interpret, dtype, N):
    a, b, scaling, ranks = _bank(dtype)
    x, base, index = _batch(N, dtype)
    grad_y = torch.randn(N, H, device=DEV).to(dtype)
    y, grads = _fwd_bwd(x, a, b, index, scaling, ranks, base, grad_y)
    # the reference on fp32 copies: the exact answer the kernels approximate
    want = reference.multi_lora(x.float(), a.float(), b.float(), index, scaling, ranks, base.float()).to(dtype)
    _close(y, want, dtype, "y")
    wgrads = reference.multi_lora_backward(grad_y.float(), x.float(), a.float(), b.float(), index, scaling, ranks)
    for name, got, w in zip(("dx", "dlora_a", "dlora_b"), grads, wgrads):
        _close(got, w.to(dtype), dtype, f"N={N} {name}")
    keep = torch.arange(R, device=DEV)[None, :] < ranks[:, None]
    assert (grads[1][~keep] == 0).all() and (grads[2].permute(0, 2, 1)[~keep] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32], ids=_ids)
def test_fp32_prefill(triton_interpret, dtype):
    a, b, scaling, ranks = _bank(dtype)
    x, base, index = _batch(512, dtype)
    grad_y = torch.randn(512, H, device=DEV)
    y, grads = _fwd_bwd(x, a, b, index, scaling, ranks, base, grad_y)
    _close(y, reference.multi_lora(x, a, b, index, scaling, ranks, base), dtype, "y")
    wgrads = reference.multi_lora_backward(grad_y, x, a, b, index, scaling, ranks)
    for name, got, w in zip(("dx", "dA", "dB"), grads, wgrads):
        _close(got, w, dtype, name)


@pytest.mark.parametrize("N", [16, 2048], ids=lambda n: f"N{n}")
def test_backward_bitwise_deterministic(triton_interpret, N):
    from peft_kernels.triton import multi_lora as tm

    dtype = torch.bfloat16
    a, b, scaling, ranks = _bank(dtype)
    x, _, index = _batch(N, dtype)
    index[: N // 2] = 0  # one adapter owns most rows (row-chunked reductions)
    grad_y = torch.randn(N, H, device=DEV).to(dtype)
    first = tm.multi_lora_backward(grad_y, x, a, b, index, scaling, ranks)
    second = tm.multi_lora_backward(grad_y, x, a, b, index, scaling, ranks)
    for p, q in zip(first, second):
        assert torch.equal(p, q)


def test_cuda_graph_capture_decode(triton_interpret):
    dtype = torch.float16
    a, b, scaling, ranks = _bank(dtype)
    N = 32
    x, base, index = _batch(N, dtype)
    static_index = index.clone()

    def step():
        return peft_kernels.multi_lora(x, a, b, static_index, scaling, ranks=ranks, base=base, validate=False)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up: autotuning and compilation happen outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for new in (index, torch.randint(-1, T, (N,), device=DEV), torch.full((N,), 6, device=DEV)):
        static_index.copy_(new)
        graph.replay()
        want = reference.multi_lora(x.float(), a.float(), b.float(), new, scaling, ranks, base.float()).to(dtype)
        _close(out, want, dtype, "graph replay")


def test_auto_selection_on_cuda():
    dtype = torch.bfloat16
    a, b, scaling, ranks = _bank(dtype)
    x, base, index = _batch(4, dtype)
    args = (x, a, b, index, scaling, ranks, base)
    # the csrc/cuda decode kernel comes first for N <= 64; it must have built (test_gpu_native_multi_lora.py)
    assert _ext.CUDA.loaded, f"peft_kernels._C_cuda did not load: {_ext.CUDA.error}"
    assert _dispatch.select("multi_lora", torch.device(DEV), *args)[0] == "cuda"
    x_big, base_big, index_big = _batch(65, dtype)
    big = (x_big, a, b, index_big, scaling, ranks, base_big)
    assert _dispatch.select("multi_lora", torch.device(DEV), *big)[0] == "triton"
    grad_y = torch.randn_like(base)
    assert _dispatch.select("multi_lora_backward", torch.device(DEV), grad_y, *args[:6])[0] == "triton"
