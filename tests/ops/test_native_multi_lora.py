"""The C++ (CPU, OpenMP) kernel of ``multi_lora``: ``torch.ops.peft_kernels.multi_lora_fwd`` vs
``peft_kernels.reference.multi_lora``.

Called directly and through the public op with the ``cpp`` backend forced, over fp32/fp64/fp16/bf16,
N in {0, 1, 4, 33, 256}, T in {1, 3, 8}, mixed ranks 1..16 (rank 0 too), H_in/H_out in {40, 130, 2049},
-1 rows, index None (T == 1 shared, T == N per row), int32/int64 indices and ranks, with and without
base. The rank padding holds NaN for the kernel (the reference gets zeros there): a kernel that read
any padding byte would return NaN. Every instruction-set copy of the micro-kernels (AVX-512, AVX2,
baseline) is run in a subprocess with PEFT_KERNELS_CPU_ISA.
"""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import peft_kernels as pk
from conftest import tolerances
from peft_kernels import _ext
from peft_kernels.ops import _dispatch

pytestmark = pytest.mark.skipif(
    not (_ext.CPU.loaded and hasattr(torch.ops.peft_kernels, "multi_lora_fwd")),
    reason=f"peft_kernels._C with multi_lora_fwd not built: {_ext.CPU.error}",
)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _ids(v):
    return str(v).replace("torch.", "")


def make_case(N, T, H_in, H_out, dtype, *, mode="index", index_dtype=torch.int64, ranks_dtype=torch.int32,
              with_base=True, R=16, rank_zero=False, seed=0):
    """(kernel_args, reference_args): the same call, NaN rank padding for the kernel, zeros for the reference."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.randint(1, R + 1, (T,), generator=g)
    ranks[0] = R  # at least one full-rank adapter, and (T > 1) a rank-1 one
    if T > 1:
        ranks[1] = 1
    if rank_zero and T > 2:
        ranks[2] = 0
    a = torch.randn(T, R, H_in, generator=g, dtype=torch.float64) / H_in**0.5
    b = torch.randn(T, H_out, R, generator=g, dtype=torch.float64) / 4
    pad_a = torch.arange(R)[None, :, None] >= ranks[:, None, None]
    pad_b = torch.arange(R)[None, None, :] >= ranks[:, None, None]
    a_clean, b_clean = a.masked_fill(pad_a, 0).to(dtype), b.masked_fill(pad_b, 0).to(dtype)
    a_nan, b_nan = a.masked_fill(pad_a, float("nan")).to(dtype), b.masked_fill(pad_b, float("nan")).to(dtype)
    x = torch.randn(N, H_in, generator=g, dtype=torch.float64).to(dtype)
    base = torch.randn(N, H_out, generator=g, dtype=torch.float64).to(dtype) if with_base else None
    if mode == "index":
        index = torch.randint(-1, T, (N,), generator=g).to(index_dtype)
        if N > 2:
            index[0], index[1] = -1, 0
    else:
        index = None
    scaling = (torch.rand(T, generator=g) * 2 + 0.25).float()
    ranks_t = ranks.to(ranks_dtype) if ranks_dtype is not None else None
    if ranks_dtype is None:  # ranks None: every adapter uses all R slots, no padding
        a_nan, b_nan = a.to(dtype), b.to(dtype)
        a_clean, b_clean = a_nan, b_nan
    return (x, a_nan, b_nan, index, scaling, ranks_t, base), (x, a_clean, b_clean, index, scaling, ranks_t, base)


def check(got, want, dtype):
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    assert not got.isnan().any(), "NaN in the output: the kernel read rank padding"
    torch.testing.assert_close(got, want, **tolerances(dtype))


def _grid():
    for dtype, N, T in itertools.product(DTYPES, (0, 1, 4, 33, 256), (1, 3, 8)):
        sizes = [(40, 130), (130, 40)] + ([(2049, 40), (40, 2049)] if N <= 4 else [])
        for (H_in, H_out), with_base in itertools.product(sizes, (True, False)):
            yield pytest.param(dtype, N, T, H_in, H_out, with_base,
                               id=f"{_ids(dtype)}-N{N}-T{T}-{H_in}x{H_out}-{'base' if with_base else 'nobase'}")


@pytest.mark.parametrize("dtype,N,T,H_in,H_out,with_base", list(_grid()))
def test_direct_call_matches_reference(dtype, N, T, H_in, H_out, with_base):
    kernel_args, ref_args = make_case(N, T, H_in, H_out, dtype, with_base=with_base, seed=N * 31 + T)
    got = torch.ops.peft_kernels.multi_lora_fwd(*kernel_args)
    check(got, pk.reference.multi_lora(*ref_args), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("mode,N,T", [("shared", 33, 1), ("per-row", 33, 33), ("per-row", 4, 4), ("shared", 0, 1),
                                      ("per-row", 1, 1)])
def test_index_none(dtype, mode, N, T):
    kernel_args, ref_args = make_case(N, T, 130, 40, dtype, mode=mode)
    check(torch.ops.peft_kernels.multi_lora_fwd(*kernel_args), pk.reference.multi_lora(*ref_args), dtype)


@pytest.mark.parametrize("index_dtype,ranks_dtype", [(torch.int32, torch.int32), (torch.int32, torch.int64),
                                                     (torch.int64, torch.int64), (torch.int64, None),
                                                     (torch.int32, None)], ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_index_and_rank_dtypes(dtype, index_dtype, ranks_dtype):
    kernel_args, ref_args = make_case(33, 8, 130, 40, dtype, index_dtype=index_dtype, ranks_dtype=ranks_dtype)
    check(torch.ops.peft_kernels.multi_lora_fwd(*kernel_args), pk.reference.multi_lora(*ref_args), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_rank_zero_and_all_rows_without_adapter(dtype):
    kernel_args, ref_args = make_case(33, 8, 40, 130, dtype, rank_zero=True)
    check(torch.ops.peft_kernels.multi_lora_fwd(*kernel_args), pk.reference.multi_lora(*ref_args), dtype)
    x, a, b, index, scaling, ranks, base = kernel_args
    none = torch.full_like(index, -1)
    got = torch.ops.peft_kernels.multi_lora_fwd(x, a, b, none, scaling, ranks, base)
    assert torch.equal(got, base)
    got = torch.ops.peft_kernels.multi_lora_fwd(x, a, b, none, scaling, ranks, None)
    assert torch.equal(got, torch.zeros_like(got))


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("N,T,H_in,H_out", [(4, 3, 130, 40), (256, 8, 40, 130), (33, 3, 2049, 40)])
def test_public_op_runs_on_cpp_backend(dtype, N, T, H_in, H_out):
    kernel_args, ref_args = make_case(N, T, H_in, H_out, dtype, seed=7)
    x, a, b, index, scaling, ranks, base = kernel_args
    with pk.use_backend("cpp"):
        got = pk.multi_lora(x, a, b, index, scaling, ranks=ranks, base=base)
        assert pk.last_backend("multi_lora") == "cpp"
    check(got, pk.reference.multi_lora(*ref_args), dtype)


def test_cpp_is_the_automatic_choice_on_cpu():
    assert "cpp" in _dispatch.kernels("multi_lora")
    kernel_args, _ = make_case(4, 3, 40, 40, torch.float32)
    x, a, b, index, scaling, ranks, base = kernel_args
    with pk.use_backend(None):
        pk.multi_lora(x, a, b, index, scaling, ranks=ranks, base=base)
    assert pk.last_backend("multi_lora") == "cpp"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_ids)
def test_three_dim_input_with_per_sequence_index(dtype):
    g = torch.Generator().manual_seed(3)
    B, L, H_in, H_out, T, R = 3, 5, 40, 24, 2, 8
    x = torch.randn(B, L, H_in, generator=g).to(dtype)
    a, b = torch.randn(T, R, H_in, generator=g).to(dtype), torch.randn(T, H_out, R, generator=g).to(dtype)
    base = torch.randn(B, L, H_out, generator=g).to(dtype)
    index, scaling, ranks = torch.tensor([1, -1, 0]), torch.tensor([0.5, 2.0]), torch.tensor([8, 3])
    b[1, :, 3:] = 0
    a[1, 3:] = 0
    with pk.use_backend("cpp"):
        got = pk.multi_lora(x, a, b, index, scaling, ranks=ranks, base=base)
        assert pk.last_backend("multi_lora") == "cpp"
    want = pk.reference.multi_lora(x.reshape(-1, H_in), a, b, index.repeat_interleave(L), scaling, ranks,
                                   base.reshape(-1, H_out)).reshape(B, L, H_out)
    check(got, want, dtype)


@pytest.mark.parametrize("case", ["H_in=0", "H_out=0", "R=0", "T=0", "all ranks 0"])
def test_degenerate_shapes(case):
    N, T, R, H_in, H_out = 3, 2, 4, 6, 5
    ranks = None
    if case == "H_in=0":
        H_in = 0
    elif case == "H_out=0":
        H_out = 0
    elif case == "R=0":
        R = 0
    elif case == "T=0":
        T = 0
    else:
        ranks = torch.zeros(T, dtype=torch.int64)
    args = (torch.randn(N, H_in), torch.randn(T, R, H_in), torch.randn(T, H_out, R),
            torch.tensor([0, 1, -1]) if T else torch.full((N,), -1), torch.ones(T), ranks, torch.randn(N, H_out))
    got = torch.ops.peft_kernels.multi_lora_fwd(*args)
    check(got, pk.reference.multi_lora(*args), torch.float32)


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(5)
    N, T, R, H_in, H_out = 33, 3, 8, 40, 24
    x = torch.randn(H_in, N, generator=g).t()
    a = torch.randn(T, H_in, R, generator=g).transpose(1, 2)
    b = torch.randn(T, R, H_out, generator=g).transpose(1, 2)
    base = torch.randn(N, 2 * H_out, generator=g)[:, ::2]
    index = torch.randint(-1, T, (2 * N,), generator=g)[::2]
    ranks, scaling = torch.tensor([8, 2, 5]), torch.tensor([1.0, 0.5, 2.0])
    got = torch.ops.peft_kernels.multi_lora_fwd(x, a, b, index, scaling, ranks, base)
    mask = torch.arange(R)[None, :] < ranks[:, None]
    want = pk.reference.multi_lora(x, a * mask[:, :, None], b * mask[:, None, :], index, scaling, ranks, base)
    check(got, want, torch.float32)


def test_thread_count_does_not_change_the_result():
    """Each row is computed by one thread in a fixed order: 1 or many threads give identical bits."""
    kernel_args, _ = make_case(1024, 8, 256, 256, torch.float32, seed=11)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.peft_kernels.multi_lora_fwd(*kernel_args)
        torch.set_num_threads(max(2, before))
        many = torch.ops.peft_kernels.multi_lora_fwd(*kernel_args)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


def test_bad_arguments_raise():
    op = torch.ops.peft_kernels.multi_lora_fwd
    x, a, b = torch.randn(4, 8), torch.randn(2, 3, 8), torch.randn(2, 5, 3)
    s = torch.ones(2)
    with pytest.raises(RuntimeError, match="out of range"):
        op(x, a, b, torch.tensor([0, 1, 2, -1]), s, None, None)
    with pytest.raises(RuntimeError, match="out of range"):
        op(x, a, b, torch.tensor([0, 1, 1, -2]), s, None, None)
    with pytest.raises(RuntimeError, match="ranks"):
        op(x, a, b, torch.tensor([0, 1, 1, -1]), s, torch.tensor([4, 1]), None)
    with pytest.raises(RuntimeError, match="dtype"):
        op(x, a.double(), b, torch.tensor([0, 1, 1, -1]), s, None, None)
    with pytest.raises(RuntimeError, match="lora_a"):
        op(x, torch.randn(2, 3, 9), b, torch.tensor([0, 1, 1, -1]), s, None, None)
    with pytest.raises(RuntimeError, match="must be 1 or N"):
        op(x, a, b, None, s, None, None)
    with pytest.raises(RuntimeError, match="base"):
        op(x, a, b, torch.tensor([0, 1, 1, -1]), s, None, torch.randn(4, 6))
    with pytest.raises(RuntimeError, match="int32 or int64"):
        op(x, a, b, torch.tensor([0.0, 1, 1, -1]), s, None, None)


ISA_SCRIPT = textwrap.dedent("""
    import itertools, torch, peft_kernels as pk
    from peft_kernels import _ext
    import test_native_multi_lora as t
    from conftest import tolerances
    print(_ext.CPU.build_info["multi_lora_isa"])
    for dtype, N, T, (H_in, H_out), base in itertools.product(
            t.DTYPES, (1, 3, 33, 256), (1, 3, 8), ((40, 130), (130, 40), (2049, 17)), (True, False)):
        if H_in == 2049 and N > 33:
            continue
        kernel_args, ref_args = t.make_case(N, T, H_in, H_out, dtype, with_base=base, seed=N + T)
        t.check(torch.ops.peft_kernels.multi_lora_fwd(*kernel_args), pk.reference.multi_lora(*ref_args), dtype)
    print("ok")
""")


@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
def test_every_instruction_set_copy(isa):
    """PEFT_KERNELS_CPU_ISA picks a lower copy of the micro-kernels (never one the CPU lacks)."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PEFT_KERNELS_CPU_ISA=isa,
               PYTHONPATH=os.pathsep.join([here, os.path.dirname(here), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", ISA_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    used, status = proc.stdout.split()[-2:]
    assert status == "ok"
    if used != isa:
        pytest.skip(f"this CPU cannot run the {isa} copy (ran {used})")
