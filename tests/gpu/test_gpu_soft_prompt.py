"""Soft-prompt ops on CUDA at realistic sizes: Triton kernels vs ``peft_kernels.reference``.

fp16 / bf16 / fp32; forward (exact: it is a copy), backward (dprompts, dembeds, dweight;
fp32 accumulation, deterministic), and automatic backend choice on CUDA tensors.
"""
from __future__ import annotations

import os

import pytest
import torch

import peft_kernels
from peft_kernels import reference as R
from peft_kernels.ops._dispatch import select

from conftest import tolerances

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
DEV = "cuda"


def _ids(dtype):
    return str(dtype).replace("torch.", "")


def _kernel(op, *args):
    """The Triton kernel of ``op`` (forced: the csrc/cuda embed kernel would otherwise win)."""
    with peft_kernels.use_backend("triton"):
        name, fn = select(op, torch.device(DEV), *args)
    assert name == "triton", f"{op} dispatched to {name!r}, not triton"
    return fn


def _close(got, want, dtype, what):
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, want.dtype, got.shape, want.shape)
    torch.testing.assert_close(got.float(), want.float(), **tolerances(dtype), msg=lambda m: f"{what}: {m}")


def _bank(kind, B, T, P, dev):
    """(T, prompt_index, prompt_lens) for an explicit index with -1 rows, or index None (T == 1 / T == B)."""
    if kind == "indexed":
        index = torch.tensor([(b % (T + 1)) - 1 for b in range(B)], dtype=torch.int32, device=dev)
        lens = torch.tensor([max(P - (t % 3) * 7, 0) for t in range(T)], dtype=torch.int64, device=dev)
        return T, index, lens
    if kind == "shared":
        return 1, None, None
    return B, None, torch.tensor([max(P - b, 0) for b in range(B)], dtype=torch.int32, device=dev)


@pytest.mark.parametrize("kind", ["indexed", "shared", "per-row"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_embed_llm_sizes(triton_interpret, dtype, kind):
    torch.manual_seed(0)
    B, L, H, V, P = 8, 512, 4096, 32000, 20
    T, index, lens = _bank(kind, B, 4, P, DEV)
    insert_at = {"indexed": 0, "shared": 1, "per-row": 300}[kind]
    weight = torch.randn(V, H, device=DEV, dtype=dtype)
    prompts = torch.randn(T, P, H, device=DEV, dtype=dtype)
    ids = torch.randint(0, V, (B, L), device=DEV, dtype=torch.int64 if kind == "indexed" else torch.int32)
    ids[:, :64] = ids[0, :64]  # repeated token ids: dweight rows summed over many tokens
    fwd_args = (ids, weight, prompts, index, lens, insert_at)

    _kernel("soft_prompt_embed", *fwd_args)
    w = weight.clone().requires_grad_()
    p = prompts.clone().requires_grad_()
    out = peft_kernels.soft_prompt_embed(ids, w, p, prompt_index=index, prompt_lens=lens, insert_at=insert_at)
    assert torch.equal(out.detach(), R.soft_prompt_embed(*fwd_args))

    grad = torch.randn_like(out)
    bwd_args = (grad, ids, V, T, index, lens, insert_at, True)
    want_dw, want_dp = R.soft_prompt_embed_backward(*bwd_args)
    got_dw, got_dp = _kernel("soft_prompt_embed_backward", *bwd_args)(*bwd_args)
    _close(got_dw, want_dw, dtype, "dweight")
    _close(got_dp, want_dp, dtype, "dprompts")
    again_dw, again_dp = _kernel("soft_prompt_embed_backward", *bwd_args)(*bwd_args)
    assert torch.equal(again_dw, got_dw) and torch.equal(again_dp, got_dp), "backward must be deterministic"

    # through autograd (whichever backend the backward dispatches to)
    out.backward(grad)
    _close(w.grad, want_dw, dtype, "autograd dweight")
    _close(p.grad, want_dp, dtype, "autograd dprompts")

    no_dw, dp = _kernel("soft_prompt_embed_backward", *bwd_args[:-1], False)(*bwd_args[:-1], False)
    assert no_dw.shape == (0, H) and torch.equal(dp, got_dp)


@pytest.mark.parametrize("replace", [False, True], ids=["insert", "replace"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("shape", [(8, 512, 4096, 20, 4), (8, 197, 768, 10, 3), (5, 77, 1000, 7, 5)],
                         ids=["llm", "vit", "odd-h"])
def test_concat_sizes(triton_interpret, dtype, replace, shape):
    torch.manual_seed(1)
    B, L, H, P, T = shape
    T, index, lens = _bank("indexed", B, T, P, DEV)
    insert_at = 1 if replace else L // 3
    embeds = torch.randn(B, L, H, device=DEV, dtype=dtype)
    prompts = torch.randn(T, P, H, device=DEV, dtype=dtype)
    fwd_args = (embeds, prompts, index, lens, insert_at, replace)

    _kernel("soft_prompt_concat", *fwd_args)
    e = embeds.clone().requires_grad_()
    p = prompts.clone().requires_grad_()
    out = peft_kernels.soft_prompt_concat(e, p, prompt_index=index, prompt_lens=lens, insert_at=insert_at,
                                          replace=replace)
    assert torch.equal(out.detach(), R.soft_prompt_concat(*fwd_args))

    grad = torch.randn_like(out)
    bwd_args = (grad, T, P, index, lens, insert_at, replace)
    want_de, want_dp = R.soft_prompt_concat_backward(*bwd_args)
    got_de, got_dp = _kernel("soft_prompt_concat_backward", *bwd_args)(*bwd_args)
    assert torch.equal(got_de, want_de)
    _close(got_dp, want_dp, dtype, "dprompts")
    assert torch.equal(_kernel("soft_prompt_concat_backward", *bwd_args)(*bwd_args)[1], got_dp), "deterministic"

    out.backward(grad)
    assert torch.equal(e.grad, want_de)
    _close(p.grad, want_dp, dtype, "autograd dprompts")


@pytest.mark.skipif(bool(os.environ.get("PEFT_KERNELS_BACKEND")), reason="a backend is forced by the environment")
def test_auto_selection_on_cuda():
    B, L, H, V, T, P = 2, 8, 64, 50, 2, 4
    weight = torch.randn(V, H, device=DEV, dtype=torch.float16)
    prompts = torch.randn(T, P, H, device=DEV, dtype=torch.float16)
    ids = torch.randint(0, V, (B, L), device=DEV)
    index = torch.tensor([1, -1], device=DEV)
    embeds = torch.randn(B, L, H, device=DEV, dtype=torch.float16)
    grad = torch.randn(B, L + P, H, device=DEV, dtype=torch.float16)
    calls = {
        "soft_prompt_embed": (ids, weight, prompts, index, None, 0),
        "soft_prompt_concat": (embeds, prompts, index, None, 1, False),
        "soft_prompt_embed_backward": (grad, ids, V, T, index, None, 0, True),
        "soft_prompt_concat_backward": (grad, T, P, index, None, 1, False),
    }
    with peft_kernels.use_backend(None):
        for op, args in calls.items():
            name = select(op, torch.device(DEV), *args)[0]
            assert name != "reference", f"{op} on CUDA picked the reference backend"
