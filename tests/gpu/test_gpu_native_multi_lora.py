"""The CUDA kernel of ``multi_lora`` (csrc/cuda/multi_lora.cu) vs ``peft_kernels.reference.multi_lora``.

Decode-sized batches (N = 1..64) at LLM width (H = 4096), mixed ranks 8..64 with NaN in the rank
padding (the reference gets zeros there: a kernel that read padding would return NaN), -1 rows,
index None modes, int32/int64 indices and ranks, fp16/bf16/fp32 (and fp64), odd sizes that take the
unvectorised path, misaligned views, large N (correct, if not the fastest backend there), the public
op with the ``cuda`` backend forced, and CUDA-graph capture of a decode step.
"""
from __future__ import annotations

import pytest
import torch

import peft_kernels as pk
from conftest import tolerances
from peft_kernels import _ext

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def _require_cuda_extension():
    """With a CUDA device the csrc/cuda kernel must have built, loaded and registered: these tests fail
    (not skip) otherwise, so a broken CUDA build cannot pass as the Triton fallback."""
    assert _ext.CUDA.loaded, f"peft_kernels._C_cuda did not load: {_ext.CUDA.error}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("peft_kernels::multi_lora_fwd", "CUDA"), \
        "peft_kernels::multi_lora_fwd has no CUDA kernel registered"

DEV = "cuda"
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _ids(v):
    return str(v).replace("torch.", "")


def make_case(N, T, H_in, H_out, dtype, *, R=64, rank_range=(8, 64), mode="index", index_dtype=torch.int32,
              ranks_dtype=torch.int64, with_base=True, seed=0):
    """(kernel_args, reference_args) on the GPU: NaN rank padding for the kernel, zeros for the reference."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.randint(rank_range[0], rank_range[1] + 1, (T,), generator=g)
    ranks[0] = rank_range[1]
    a = torch.randn(T, R, H_in, generator=g, dtype=torch.float64) / H_in**0.5
    b = torch.randn(T, H_out, R, generator=g, dtype=torch.float64) / R**0.5
    pad_a = torch.arange(R)[None, :, None] >= ranks[:, None, None]
    pad_b = torch.arange(R)[None, None, :] >= ranks[:, None, None]
    a_clean, b_clean = a.masked_fill(pad_a, 0), b.masked_fill(pad_b, 0)
    a_nan, b_nan = a.masked_fill(pad_a, float("nan")), b.masked_fill(pad_b, float("nan"))
    x = torch.randn(N, H_in, generator=g, dtype=torch.float64)
    base = torch.randn(N, H_out, generator=g, dtype=torch.float64) if with_base else None
    index = None
    if mode == "index":
        index = torch.randint(-1, T, (N,), generator=g)
        if N > 1:
            index[0] = -1
        index = index.to(index_dtype)
    scaling = (torch.rand(T, generator=g) + 0.5).float()
    ranks_t = ranks.to(ranks_dtype) if ranks_dtype is not None else None
    if ranks_dtype is None:
        a_nan, b_nan, a_clean, b_clean = a, b, a, b

    def dev(*ts):
        # float64 data to the test dtype; scaling (float32) and the indices keep theirs
        return [None if t is None else t.to(DEV, dtype) if t.dtype == torch.float64 else t.to(DEV) for t in ts]

    x, base, a_nan, b_nan, a_clean, b_clean = dev(x, base, a_nan, b_nan, a_clean, b_clean)
    index, scaling, ranks_t = dev(index, scaling, ranks_t)
    return (x, a_nan, b_nan, index, scaling, ranks_t, base), (x, a_clean, b_clean, index, scaling, ranks_t, base)


def check(got, want, dtype):
    assert got.dtype == want.dtype == dtype and got.shape == want.shape and got.device == want.device
    assert not got.isnan().any(), "NaN in the output: the kernel read rank padding"
    tol = dict(tolerances(dtype))
    if dtype == torch.float32:
        tol = dict(atol=1e-4, rtol=1e-4)  # the reference's fp32 matmul may use TF32-free cuBLAS, still reordered
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("N", [1, 2, 7, 16, 33, 64])
def test_decode_llm_width_mixed_ranks(dtype, N):
    kernel_args, ref_args = make_case(N, 8, 4096, 4096, dtype, seed=N)
    got = torch.ops.peft_kernels.multi_lora_fwd(*kernel_args)
    check(got, pk.reference.multi_lora(*ref_args), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_ids)
@pytest.mark.parametrize("H_in,H_out", [(4096, 11008), (11008, 4096), (4096, 1024)])
def test_projection_shapes(dtype, H_in, H_out):
    kernel_args, ref_args = make_case(16, 4, H_in, H_out, dtype, seed=H_out)
    check(torch.ops.peft_kernels.multi_lora_fwd(*kernel_args), pk.reference.multi_lora(*ref_args), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("mode,N,T", [("shared", 16, 1), ("per-row", 16, 16), ("per-row", 1, 1)])
def test_index_none(dtype, mode, N, T):
    kernel_args, ref_args = make_case(N, T, 4096, 4096, dtype, mode=mode)
    check(torch.ops.peft_kernels.multi_lora_fwd(*kernel_args), pk.reference.multi_lora(*ref_args), dtype)


@pytest.mark.parametrize("index_dtype,ranks_dtype", [(torch.int32, torch.int32), (torch.int64, torch.int64),
                                                     (torch.int64, torch.int32), (torch.int32, None)], ids=_ids)
@pytest.mark.parametrize("with_base", [True, False])
def test_index_rank_dtypes_and_base(index_dtype, ranks_dtype, with_base):
    kernel_args, ref_args = make_case(24, 6, 4096, 2048, torch.bfloat16, index_dtype=index_dtype,
                                      ranks_dtype=ranks_dtype, with_base=with_base)
    check(torch.ops.peft_kernels.multi_lora_fwd(*kernel_args), pk.reference.multi_lora(*ref_args), torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=_ids)
@pytest.mark.parametrize("N,T,H_in,H_out,R", [(5, 3, 130, 40, 16), (3, 2, 4095, 4097, 20), (64, 8, 40, 2049, 7),
                                              (300, 8, 256, 256, 16), (2048, 8, 1024, 1024, 64), (0, 2, 64, 64, 8)])
def test_odd_sizes_and_large_n(dtype, N, T, H_in, H_out, R):
    """H and R that are not multiples of a 16-byte vector (scalar path), tiny and large N."""
    kernel_args, ref_args = make_case(N, T, H_in, H_out, dtype, R=R, rank_range=(1, R), seed=H_in + R)
    check(torch.ops.peft_kernels.multi_lora_fwd(*kernel_args), pk.reference.multi_lora(*ref_args), dtype)


def test_rows_without_adapter_and_rank_zero():
    kernel_args, ref_args = make_case(16, 4, 4096, 4096, torch.float16, rank_range=(8, 64))
    x, a, b, index, scaling, ranks, base = kernel_args
    ranks = ranks.clone()
    ranks[1] = 0
    a_ref, b_ref = ref_args[1].clone(), ref_args[2].clone()
    a_ref[1], b_ref[1] = 0, 0
    a, b = a.clone(), b.clone()
    a[1], b[1] = float("nan"), float("nan")
    got = torch.ops.peft_kernels.multi_lora_fwd(x, a, b, index, scaling, ranks, base)
    check(got, pk.reference.multi_lora(x, a_ref, b_ref, index, scaling, ranks, base), torch.float16)
    none = torch.full_like(index, -1)
    assert torch.equal(torch.ops.peft_kernels.multi_lora_fwd(x, a, b, none, scaling, ranks, base), base)
    zeros = torch.ops.peft_kernels.multi_lora_fwd(x, a, b, none, scaling, ranks, None)
    assert torch.equal(zeros, torch.zeros_like(base))


def test_misaligned_and_non_contiguous_views():
    kernel_args, ref_args = make_case(16, 4, 4096, 4096, torch.bfloat16)
    x, a, b, index, scaling, ranks, base = kernel_args
    x_off = torch.empty(x.numel() + 1, dtype=x.dtype, device=DEV)[1:].view_as(x)  # 2-byte aligned only
    x_off.copy_(x)
    b_t = b.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous lora_b
    got = torch.ops.peft_kernels.multi_lora_fwd(x_off, a, b_t, index, scaling, ranks, base)
    check(got, pk.reference.multi_lora(*ref_args), torch.bfloat16)


def test_dispatcher_registers_the_cuda_kernel():
    from peft_kernels.ops import _dispatch

    assert "cuda" in _dispatch.kernels("multi_lora"), "the dispatcher has no cuda kernel for multi_lora"
    assert _dispatch.status("cuda")["cuda"][0], _dispatch.status("cuda")["cuda"][1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_ids)
def test_public_op_runs_on_cuda_backend(dtype):
    kernel_args, ref_args = make_case(16, 8, 4096, 4096, dtype, seed=3)
    x, a, b, index, scaling, ranks, base = kernel_args
    with pk.use_backend("cuda"):
        got = pk.multi_lora(x, a, b, index, scaling, ranks=ranks, base=base)
        assert pk.last_backend("multi_lora") == "cuda"
    check(got, pk.reference.multi_lora(*ref_args), dtype)


def test_cuda_graph_capture_of_a_decode_step():
    """No host sync inside: the op records into a CUDA graph and replays with new inputs."""
    kernel_args, _ = make_case(16, 8, 4096, 4096, torch.bfloat16)
    x, a, b, index, scaling, ranks, base = kernel_args
    op = torch.ops.peft_kernels.multi_lora_fwd
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        op(x, a, b, index, scaling, ranks, base)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op(x, a, b, index, scaling, ranks, base)
    x.copy_(torch.randn_like(x))
    index.copy_(torch.roll(index, 1))
    graph.replay()
    torch.cuda.synchronize()
    clean_a = a.nan_to_num(0.0)
    clean_b = b.nan_to_num(0.0)
    check(out, pk.reference.multi_lora(x, clean_a, clean_b, index, scaling, ranks, base), torch.bfloat16)


def test_does_not_sync_or_use_the_default_stream():
    kernel_args, ref_args = make_case(8, 4, 4096, 4096, torch.float16)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        got = torch.ops.peft_kernels.multi_lora_fwd(*kernel_args)
    side.synchronize()
    check(got, pk.reference.multi_lora(*ref_args), torch.float16)
