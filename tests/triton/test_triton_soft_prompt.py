"""Triton soft-prompt kernels vs ``peft_kernels.reference`` (interpreter on CPU tensors).

Every test runs inside the ``triton_interpret`` fixture (which forces the triton backend),
calls the public API (forward and autograd backward) and checks that the dispatcher really
picked the triton kernels. fp32 and fp16 here (bf16 only in tests/gpu). Shapes are small:
the interpreter runs one Python call per program.
"""
from __future__ import annotations

import pytest
import torch

import peft_kernels
from peft_kernels import reference as R
from peft_kernels.ops._dispatch import select

from conftest import tolerances

I32, I64 = torch.int32, torch.int64
DTYPES = [torch.float32, torch.float16]


def _randn(gen, *shape, dtype, device):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)


def _tensor(values, dtype, device):
    return None if values is None else torch.tensor(values, dtype=dtype, device=device)


def _assert_triton(op, device, *args):
    name = select(op, torch.device(device), *args)[0]
    assert name == "triton", f"{op} dispatched to {name!r}, not triton"


def _close(got, want, dtype, what):
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, want.dtype, got.shape, want.shape)
    torch.testing.assert_close(got, want, **tolerances(dtype), msg=lambda m: f"{what}: {m}")


# id, B, L, H, T, P, index, index dtype, lens, insert_at, replace
CONCAT_CASES = [
    ("idx32-neg-lens-at0", 3, 5, 33, 2, 4, [1, -1, 0], I32, [2, 4], 0, False),
    ("shared-none-mid", 3, 5, 7, 1, 4, None, None, None, 2, False),
    ("per-row-none-lens0-atL", 3, 5, 130, 3, 4, None, None, [0, 4, 1], 5, False),
    ("b1-l1-h1-at-end", 1, 1, 1, 1, 1, [0], I64, None, 1, False),
    ("idx64-shared-rows-p1", 3, 5, 33, 2, 1, [1, 0, 1], I64, [1, 0], 3, False),
    ("replace-idx64-neg-at1", 3, 5, 33, 2, 4, [0, 0, -1], I64, [3, 0], 1, True),
    ("replace-per-row-at0", 3, 5, 7, 3, 4, None, None, None, 0, True),
    ("replace-shared-p1-atL", 1, 5, 130, 1, 1, None, None, [1], 4, True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", CONCAT_CASES, ids=lambda c: c[0])
def test_concat_forward_backward(triton_interpret, case, dtype):
    dev = triton_interpret
    cid, B, L, H, T, P, index, idt, lens, insert_at, replace = case
    g = torch.Generator().manual_seed(len(cid) * 7 + H)
    embeds = _randn(g, B, L, H, dtype=dtype, device=dev)
    prompts = _randn(g, T, P, H, dtype=dtype, device=dev)
    index_t = _tensor(index, idt, dev)
    lens_t = _tensor(lens, I32 if idt == I64 else I64, dev)
    fwd_args = (embeds, prompts, index_t, lens_t, insert_at, replace)
    _assert_triton("soft_prompt_concat", dev, *fwd_args)

    e = embeds.clone().requires_grad_()
    p = prompts.clone().requires_grad_()
    out = peft_kernels.soft_prompt_concat(e, p, prompt_index=index_t, prompt_lens=lens_t,
                                          insert_at=insert_at, replace=replace)
    want = R.soft_prompt_concat(*fwd_args)
    assert torch.equal(out.detach(), want), f"{cid}: forward is a copy and must be exact"

    grad = _randn(g, *out.shape, dtype=dtype, device=dev)
    bwd_args = (grad, T, P, index_t, lens_t, insert_at, replace)
    _assert_triton("soft_prompt_concat_backward", dev, *bwd_args)
    out.backward(grad)
    dembeds, dprompts = R.soft_prompt_concat_backward(*bwd_args)
    assert torch.equal(e.grad, dembeds), f"{cid}: dembeds is a copy and must be exact"
    _close(p.grad, dprompts, dtype, f"{cid} dprompts")


# id, B, L, H, V, T, P, index, index dtype, ids dtype, lens, insert_at
EMBED_CASES = [
    ("idx32-neg-lens-ids64-at0", 3, 5, 33, 13, 2, 4, [1, -1, 1], I32, I64, [3, 4], 0),
    ("shared-none-ids32-mid", 3, 5, 130, 13, 1, 4, None, None, I32, [2], 2),
    ("per-row-none-ids64-atL", 3, 5, 7, 13, 3, 1, None, None, I64, [1, 0, 1], 5),
    ("b1-l1-h1", 1, 1, 1, 4, 1, 4, [0], I64, I32, [0], 1),
    ("repeated-ids-idx64", 3, 5, 33, 3, 2, 4, [0, -1, 0], I64, I64, None, 1),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", EMBED_CASES, ids=lambda c: c[0])
def test_embed_forward_backward(triton_interpret, case, dtype):
    dev = triton_interpret
    cid, B, L, H, V, T, P, index, idt, ids_dt, lens, insert_at = case
    g = torch.Generator().manual_seed(len(cid) * 11 + H)
    weight = _randn(g, V, H, dtype=dtype, device=dev)
    prompts = _randn(g, T, P, H, dtype=dtype, device=dev)
    ids = torch.randint(0, V, (B, L), generator=g).to(ids_dt).to(dev)
    index_t = _tensor(index, idt, dev)
    lens_t = _tensor(lens, I64 if idt == I32 else I32, dev)
    fwd_args = (ids, weight, prompts, index_t, lens_t, insert_at)
    _assert_triton("soft_prompt_embed", dev, *fwd_args)

    w = weight.clone().requires_grad_()
    p = prompts.clone().requires_grad_()
    out = peft_kernels.soft_prompt_embed(ids, w, p, prompt_index=index_t, prompt_lens=lens_t, insert_at=insert_at)
    want = R.soft_prompt_embed(*fwd_args)
    assert torch.equal(out.detach(), want), f"{cid}: forward is a copy and must be exact"

    grad = _randn(g, *out.shape, dtype=dtype, device=dev)
    bwd_args = (grad, ids, V, T, index_t, lens_t, insert_at, True)
    _assert_triton("soft_prompt_embed_backward", dev, *bwd_args)
    out.backward(grad)
    dweight, dprompts = R.soft_prompt_embed_backward(*bwd_args)
    _close(w.grad, dweight, dtype, f"{cid} dweight")
    _close(p.grad, dprompts, dtype, f"{cid} dprompts")


def test_embed_backward_without_dweight(triton_interpret):
    dev = triton_interpret
    g = torch.Generator().manual_seed(5)
    B, L, H, V, T, P = 3, 5, 7, 9, 2, 4
    weight = _randn(g, V, H, dtype=torch.float32, device=dev)
    prompts = _randn(g, T, P, H, dtype=torch.float32, device=dev).requires_grad_()
    ids = torch.randint(0, V, (B, L), generator=g).to(dev)
    index_t = torch.tensor([1, 0, -1], device=dev)
    out = peft_kernels.soft_prompt_embed(ids, weight, prompts, prompt_index=index_t, insert_at=2)
    grad = _randn(g, *out.shape, dtype=torch.float32, device=dev)
    bwd_args = (grad, ids, V, T, index_t, None, 2, False)
    _assert_triton("soft_prompt_embed_backward", dev, *bwd_args)
    out.backward(grad)
    assert weight.grad is None
    dweight_ref, dprompts_ref = R.soft_prompt_embed_backward(*bwd_args)
    _close(prompts.grad, dprompts_ref, torch.float32, "dprompts")
    # the registered kernel itself returns the reference's empty [0, H] table grad
    dweight, dprompts = select("soft_prompt_embed_backward", torch.device(dev), *bwd_args)[1](*bwd_args)
    assert dweight.shape == dweight_ref.shape == (0, H) and dweight.dtype == dweight_ref.dtype
    _close(dprompts, dprompts_ref, torch.float32, "dprompts (direct)")


def test_concat_strided_and_fp64(triton_interpret):
    """Non-contiguous embeds / grad rows (strides passed through) and fp64 accumulation."""
    dev = triton_interpret
    g = torch.Generator().manual_seed(3)
    B, L, H, T, P = 3, 5, 33, 2, 4
    for dtype in (torch.float32, torch.float64):
        embeds = _randn(g, L, B, H, dtype=dtype, device=dev).transpose(0, 1)  # [B, L, H], row strides permuted
        prompts = _randn(g, T, P, H, dtype=dtype, device=dev)
        index_t = torch.tensor([1, 1, 0], dtype=I32, device=dev)
        args = (embeds, prompts, index_t, None, 2, False)
        _assert_triton("soft_prompt_concat", dev, *args)
        out = peft_kernels.soft_prompt_concat(embeds, prompts, prompt_index=index_t, insert_at=2)
        assert torch.equal(out, R.soft_prompt_concat(*args))
        grad = _randn(g, L + P, B, H, dtype=dtype, device=dev).transpose(0, 1)
        bwd_args = (grad, T, P, index_t, None, 2, False)
        got = select("soft_prompt_concat_backward", torch.device(dev), *bwd_args)[1](*bwd_args)
        want = R.soft_prompt_concat_backward(*bwd_args)
        assert torch.equal(got[0], want[0])
        _close(got[1], want[1], dtype, f"dprompts {dtype}")


def test_empty_sequence_and_unused_prompts(triton_interpret):
    """L = 0 (the output is the prompts alone) and a bank entry no row uses (zero grad)."""
    dev = triton_interpret
    g = torch.Generator().manual_seed(9)
    B, H, V, T, P = 2, 7, 5, 3, 2
    weight = _randn(g, V, H, dtype=torch.float32, device=dev).requires_grad_()
    prompts = _randn(g, T, P, H, dtype=torch.float32, device=dev).requires_grad_()
    ids = torch.zeros(B, 0, dtype=I64, device=dev)
    index_t = torch.tensor([2, -1], device=dev)
    args = (ids, weight, prompts, index_t, None, 0)
    _assert_triton("soft_prompt_embed", dev, *args)
    out = peft_kernels.soft_prompt_embed(ids, weight, prompts, prompt_index=index_t)
    assert torch.equal(out, R.soft_prompt_embed(*args))
    out.sum().backward()
    dweight, dprompts = R.soft_prompt_embed_backward(torch.ones_like(out), ids, V, T, index_t, None, 0, True)
    assert torch.equal(weight.grad, dweight) and torch.equal(prompts.grad, dprompts)


def _sweep_bank(n, B, P, dev, gen):
    """A deterministic mix of index modes: explicit (int32/int64, with -1) / shared / per row, +- lens."""
    kind = n % 4
    if kind == 0:
        T, index_t = 1, None
    elif kind == 1:
        T, index_t = B, None
    else:
        T = 3
        index_t = torch.tensor([(b + n) % (T + 1) - 1 for b in range(B)], dtype=I32 if kind == 2 else I64, device=dev)
    lens_t = None
    if n % 3:
        lens_t = torch.tensor([(t * 3 + n) % (P + 1) for t in range(T)], dtype=I64, device=dev)
    return T, index_t, lens_t


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("H", [1, 7, 33, 130])
@pytest.mark.parametrize("B,L,P", [(1, 1, 1), (1, 5, 4), (3, 1, 4), (3, 5, 1), (3, 5, 4)])
def test_sweep(triton_interpret, B, L, P, H, dtype):
    """Every shape of the sweep through embed, concat (insert) and concat (replace), fwd + bwd."""
    dev = triton_interpret
    n = B * 7 + L * 5 + P * 3 + H
    g = torch.Generator().manual_seed(n)
    T, index_t, lens_t = _sweep_bank(n, B, P, dev, g)
    insert_at = (0, L // 2, L)[n % 3]
    V = 6
    weight = _randn(g, V, H, dtype=dtype, device=dev).requires_grad_()
    prompts = _randn(g, T, P, H, dtype=dtype, device=dev).requires_grad_()
    ids = torch.randint(0, V, (B, L), generator=g).to(I32 if n % 2 else I64).to(dev)
    embeds = _randn(g, B, L, H, dtype=dtype, device=dev).requires_grad_()

    _assert_triton("soft_prompt_embed", dev, ids, weight, prompts, index_t, lens_t, insert_at)
    out = peft_kernels.soft_prompt_embed(ids, weight, prompts, prompt_index=index_t, prompt_lens=lens_t,
                                         insert_at=insert_at)
    assert torch.equal(out.detach(), R.soft_prompt_embed(ids, weight.detach(), prompts.detach(), index_t, lens_t, insert_at))
    grad = _randn(g, *out.shape, dtype=dtype, device=dev)
    out.backward(grad)
    dweight, dprompts = R.soft_prompt_embed_backward(grad, ids, V, T, index_t, lens_t, insert_at, True)
    _close(weight.grad, dweight, dtype, "embed dweight")
    _close(prompts.grad, dprompts, dtype, "embed dprompts")

    for replace in (False, True):
        at = min(insert_at, L - P) if replace else insert_at
        if at < 0:
            continue
        prompts.grad = None
        _assert_triton("soft_prompt_concat", dev, embeds, prompts, index_t, lens_t, at, replace)
        out = peft_kernels.soft_prompt_concat(embeds, prompts, prompt_index=index_t, prompt_lens=lens_t,
                                              insert_at=at, replace=replace)
        want = R.soft_prompt_concat(embeds.detach(), prompts.detach(), index_t, lens_t, at, replace)
        assert torch.equal(out.detach(), want), f"concat replace={replace}"
        grad = _randn(g, *out.shape, dtype=dtype, device=dev)
        embeds.grad = None
        out.backward(grad)
        dembeds, dprompts = R.soft_prompt_concat_backward(grad, T, P, index_t, lens_t, at, replace)
        assert torch.equal(embeds.grad, dembeds), f"concat dembeds replace={replace}"
        _close(prompts.grad, dprompts, dtype, f"concat dprompts replace={replace}")
