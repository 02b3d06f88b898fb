"""peft_kernels._C.multi_lora_linear: the base linear and the LoRA term in one pass (CPU, fp32,
AVX-512 or AVX2, decode-sized inference), against F.linear + the reference multi_lora. The kernel
tests run on the CPU's own ISA here and once more, in a subprocess, on the AVX2 copy."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from peft_kernels import _ext, reference
from peft_kernels.ops.multi_lora import FUSED_LINEAR_MAX_ROWS, fused_linear_kernel

ext = _ext.CPU.module
needs_kernel = pytest.mark.skipif(ext is None or not _ext.CPU.build_info.get("multi_lora_linear"),
                                  reason="multi_lora_linear needs the C++ extension on an AVX2 or AVX-512 CPU")


def _case(N, K, O, T, R, seed=0, nan_padding=True):
    g = torch.Generator().manual_seed(seed)
    x, w, bias = torch.randn(N, K, generator=g), torch.randn(O, K, generator=g), torch.randn(O, generator=g)
    a, b = torch.randn(T, R, K, generator=g), torch.randn(T, O, R, generator=g)
    ranks = torch.randint(0, R + 1, (T,), generator=g, dtype=torch.int32)
    ranks[0] = R
    index = torch.randint(-1, T, (N,), generator=g, dtype=torch.int32)
    scaling = torch.rand(T, generator=g) + 0.5
    if nan_padding:  # nothing past ranks[t] may reach a result
        for t in range(T):
            a[t, ranks[t]:] = float("nan")
            b[t, :, ranks[t]:] = float("nan")
    return x, w, bias, a, b, index, scaling, ranks


def _want(x, w, bias, a, b, index, scaling, ranks):
    base = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    return reference.multi_lora(x.double(), a.double(), b.double(), index, scaling.double(), ranks, base)


SHAPES = [(1, 1, 1, 1, 1), (3, 15, 5, 2, 3), (16, 256, 64, 8, 16), (17, 37, 19, 3, 17), (32, 64, 130, 4, 40),
          (5, 100, 7, 6, 1)]


@needs_kernel
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("N,K,O,T,R", SHAPES)
def test_matches_linear_plus_reference_lora(N, K, O, T, R, with_bias):
    x, w, bias, a, b, index, scaling, ranks = _case(N, K, O, T, R)
    bias = bias if with_bias else None
    got = ext.multi_lora_linear(x, w, bias, a, b, index, scaling, ranks)
    assert got.shape == (N, O) and got.dtype == torch.float32
    want = _want(x, w, bias, a, b, index, scaling, ranks)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4 * max(1.0, K ** 0.5))


@needs_kernel
@pytest.mark.parametrize("N,K,O,T,R", SHAPES)
def test_each_row_equals_that_row_alone_bitwise(N, K, O, T, R):
    x, w, bias, a, b, index, scaling, ranks = _case(N, K, O, T, R, seed=3)
    batch = ext.multi_lora_linear(x, w, bias, a, b, index, scaling, ranks)
    alone = torch.cat([ext.multi_lora_linear(x[i:i + 1], w, bias, a, b, index[i:i + 1], scaling, ranks)
                       for i in range(N)])
    assert torch.equal(batch, alone)


@needs_kernel
def test_int64_index_and_ranks_and_rows_without_an_adapter():
    x, w, bias, a, b, index, scaling, ranks = _case(6, 20, 9, 3, 4, seed=5, nan_padding=False)
    index = torch.tensor([-1, 0, 2, -1, 1, 0])
    ranks = torch.tensor([4, 0, 2])
    got = ext.multi_lora_linear(x, w, bias, a, b, index, scaling, ranks)
    want = _want(x, w, bias, a, b, index, scaling, ranks)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    plain = F.linear(x, w, bias)  # adapter -1 and the rank-0 adapter 1: the base linear only
    torch.testing.assert_close(got[[0, 3, 4]], plain[[0, 3, 4]], rtol=1e-5, atol=1e-5)


@needs_kernel
def test_refuses_what_it_does_not_run():
    x, w, bias, a, b, index, scaling, ranks = _case(4, 8, 6, 2, 3, nan_padding=False)
    with pytest.raises(RuntimeError, match="float32 only"):
        ext.multi_lora_linear(x.double(), w.double(), None, a.double(), b.double(), index, scaling, ranks)
    with pytest.raises(RuntimeError, match="weight must be"):
        ext.multi_lora_linear(x, w[:, :5], None, a, b, index, scaling, ranks)
    with pytest.raises(RuntimeError, match="bias must be"):
        ext.multi_lora_linear(x, w, bias[:3], a, b, index, scaling, ranks)
    with pytest.raises(RuntimeError, match="out of range"):
        ext.multi_lora_linear(x, w, None, a, b, torch.tensor([0, 1, 2, 0], dtype=torch.int32), scaling, ranks)


def test_the_lora_layer_uses_it_only_for_small_float32_cpu_calls():
    if ext is None:
        pytest.skip("no C++ extension")
    kernel = ext.multi_lora_fwd
    small, big = torch.zeros(FUSED_LINEAR_MAX_ROWS, 8), torch.zeros(FUSED_LINEAR_MAX_ROWS + 1, 8)
    available = bool(_ext.CPU.build_info.get("multi_lora_linear"))
    assert (fused_linear_kernel(kernel, small) is not None) == available
    assert fused_linear_kernel(kernel, big) is None
    assert fused_linear_kernel(kernel, small.double()) is None
    assert fused_linear_kernel(lambda *a: None, small) is None  # another backend's kernel has no fused form


def _run_capped(isa: str, code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PEFT_KERNELS_CPU_ISA=isa)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)


@needs_kernel
def test_the_avx2_copy_passes_the_kernel_tests():
    """On an AVX-512 CPU the tests above ran the AVX-512 copy; PEFT_KERNELS_CPU_ISA=avx2 runs them on the other."""
    code = (
        "import sys, pytest\n"
        "from peft_kernels import _ext\n"
        "assert _ext.CPU.build_info['multi_lora_isa'] == 'avx2', _ext.CPU.build_info\n"
        f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', {__file__!r}, '-k', 'matches or bitwise or int64']))\n"
    )
    proc = _run_capped("avx2", code)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout


def test_without_avx2_it_is_not_offered_and_refuses_clearly():
    if ext is None:
        pytest.skip("no C++ extension")
    code = (
        "import torch; from peft_kernels import _ext\n"
        "from peft_kernels.ops.multi_lora import fused_linear_kernel\n"
        "m = _ext.CPU.module\n"
        "assert not _ext.CPU.build_info['multi_lora_linear']\n"
        "assert fused_linear_kernel(m.multi_lora_fwd, torch.zeros(2, 4)) is None\n"
        "z = torch.zeros\n"
        "try:\n"
        "    m.multi_lora_linear(z(2, 4), z(3, 4), None, z(1, 2, 4), z(1, 3, 2), torch.tensor([0, 0]), z(1),"
        " torch.tensor([2]))\n"
        "except RuntimeError as e:\n"
        "    assert 'AVX2 or AVX-512' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    proc = _run_capped("baseline", code)
    assert proc.returncode == 0, proc.stdout + proc.stderr
