"""The fused prefix_attention kernel (csrc/cpu/prefix_flash.cpp) on its own and through the op,
and the cascade (csrc/cpu/prefix_attention.cpp) called directly: outputs, lse and gradients
against the reference over the cpp test cases, fp32/bf16/fp16/fp64, NaN planted in every masked
slot, opcheck, and the cpp backend's per-shape choice between the two."""
from __future__ import annotations

import importlib

import pytest
import torch

import peft_kernels
from conftest import backends_for
from peft_kernels import reference
from peft_kernels.ops.prefix_attention import prefix_attention
from test_cpu_prefix_attention import CASES, IDS, NAMES, _assert_close, _inputs, _plant_nan, _run

pa_module = importlib.import_module("peft_kernels.ops.prefix_attention")  # the package re-exports the function

pytestmark = pytest.mark.skipif(
    not hasattr(torch.ops.peft_kernels, "prefix_flash_fwd") or "cpp" not in backends_for("prefix_attention"),
    reason="the fused cpp kernel of prefix_attention is not built",
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
KERNELS = {"fused": ("prefix_flash_fwd", "prefix_flash_bwd"), "cascade": ("prefix_attention_fwd", "prefix_attention_bwd")}


def _native(kernel, tensors, kwargs, seed=1):
    """out, lse and the five grads from the kernel's two ops, called directly."""
    fwd, bwd = (getattr(torch.ops.peft_kernels, name) for name in KERNELS[kernel])
    q = tensors[0]
    rest = (kwargs["prefix_index"], kwargs["prefix_lens"], kwargs["key_padding_mask"], kwargs["causal"],
            q.shape[-1] ** -0.5)
    out, lse = fwd(*tensors, *rest)
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    return [out, lse, *bwd(dout, *tensors, *rest, out, lse)]


def _want(tensors, kwargs, seed=1):
    q = tensors[0]
    rest = (kwargs["prefix_index"], kwargs["prefix_lens"], kwargs["key_padding_mask"], kwargs["causal"],
            q.shape[-1] ** -0.5)
    out, lse = reference.prefix_attention(*tensors, *rest)
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    return [out, lse, *reference.prefix_attention_backward(dout, *tensors, *rest)]


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_native_kernel_matches_reference(case, causal, dtype, kernel):
    tensors, kwargs = _inputs(case, dtype, causal)
    _assert_close(_native(kernel, tensors, kwargs), _want(tensors, kwargs), dtype, NAMES)


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_nan_in_masked_slots_never_leaks(case, causal, kernel):
    tensors, kwargs = _inputs(case, torch.float32, causal)
    dirty = _plant_nan(tensors, kwargs)
    clean, got = _native(kernel, tensors, kwargs), _native(kernel, dirty, kwargs)
    for n, a, b in zip(NAMES, got, clean):
        if n == "lse":
            a, b = a.masked_fill(torch.isneginf(a), 0), b.masked_fill(torch.isneginf(b), 0)
        assert torch.isfinite(a).all(), n
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=n)


def test_strided_inputs():
    """q, k, v as [B, L, H, D] memory transposed to [B, H, L, D] (how models hand them over), and an
    expanded (stride-0) bank."""
    case = next(c for c in CASES if c[0] == "gqa_padding_D33")
    (q, k, v, pk, pv), kwargs = _inputs(case, torch.float32, True)
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    bank = [t[:1].expand_as(t) for t in (pk, pv)]
    dense = [q, k, v, *(t.contiguous() for t in bank)]
    _assert_close(_native("fused", [*strided, *bank], kwargs), _want(dense, kwargs), torch.float32, NAMES)


@pytest.mark.parametrize("scores, kernel", [(None, "fused"), (-1, "cascade")])
def test_op_runs_the_chosen_kernel(monkeypatch, scores, kernel):
    """Through the op (autograd included), the cpp backend runs the fused kernel up to
    FUSED_MAX_SCORES = Lq * Lk and the cascade beyond; both match the reference."""
    if scores is not None:
        monkeypatch.setattr(pa_module, "FUSED_MAX_SCORES", scores)
    ran = []
    for name in ("prefix_flash_fwd", "prefix_flash_bwd", "prefix_attention_fwd", "prefix_attention_bwd"):
        op = getattr(torch.ops.peft_kernels, name)
        monkeypatch.setattr(torch.ops.peft_kernels, name, lambda *a, _op=op, _n=name: ran.append(_n) or _op(*a),
                            raising=False)
    for case in CASES:
        for dtype in (torch.float32, torch.bfloat16):
            tensors, kwargs = _inputs(case, dtype, True)
            _assert_close(_run("cpp", tensors, kwargs), _run("reference", tensors, kwargs), dtype, NAMES)
    assert set(ran) == set(KERNELS[kernel]), ran


@pytest.mark.parametrize("name", ["oddD_LqltLk_neg1", "padding_all_masked_row", "decode_padding", "periodic_bank"])
def test_gradcheck_float64_fused(name):
    case = next(c for c in CASES if c[0] == name)
    tensors, kwargs = _inputs(case, torch.float64, True)
    leaves = [t.clone().requires_grad_() for t in tensors]
    assert pa_module._fused(tensors[0], tensors[1])

    def fn(*xs):
        return prefix_attention(*xs, **kwargs)

    with peft_kernels.use_backend("cpp"):
        assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("name", ["oddD_LqltLk_neg1", "padding_all_masked_row", "decode_Lq1", "periodic_bank"])
def test_opcheck_fused(name):
    case = next(c for c in CASES if c[0] == name)
    (q, k, v, pk, pv), kw = _inputs(case, torch.float32, True)
    rest = (kw["prefix_index"], kw["prefix_lens"], kw["key_padding_mask"], True, q.shape[-1] ** -0.5)
    torch.library.opcheck(torch.ops.peft_kernels.prefix_flash_fwd.default, (q, k, v, pk, pv, *rest))
    out, lse = torch.ops.peft_kernels.prefix_flash_fwd(q, k, v, pk, pv, *rest)
    torch.library.opcheck(torch.ops.peft_kernels.prefix_flash_bwd.default,
                          (torch.randn_like(out), q, k, v, pk, pv, *rest, out, lse))


def test_bad_inputs_are_refused():
    (q, k, v, pk, pv), kw = _inputs(CASES[0], torch.float32, True)
    with pytest.raises(RuntimeError, match="prefix_index"):
        torch.ops.peft_kernels.prefix_flash_fwd(q, k, v, pk, pv, torch.tensor([0, 5]), None, None, True, 1.0)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.peft_kernels.prefix_flash_fwd(q, k.double(), v, pk, pv, None, None, None, True, 1.0)
