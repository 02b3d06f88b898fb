"""reference.py against per-row Python loops written straight from the design (tests/naive.py)."""
import pytest
import torch

import naive
from cases import multi_lora, prefix_attention, soft_prompt_concat, soft_prompt_embed, soft_prompt_mask, ids
from peft_kernels import reference


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", prefix_attention(), ids=ids(prefix_attention()))
def test_prefix_attention_matches_naive(case, dtype):
    args = tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in case[1])
    out, lse = reference.prefix_attention(*args)
    want_out, want_lse = naive.prefix_attention(*args)
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), want_out, **tol)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


def test_prefix_attention_query_with_no_visible_key_gives_zero_and_neg_inf():
    cid, args = prefix_attention()[4]
    assert cid == "empty-queries"
    out, lse = reference.prefix_attention(*args)
    # Row 0 has no prefix; with Lq=4 > Lk=2 its first two queries see no sequence key.
    assert torch.all(out[0, :, :2] == 0)
    assert torch.all(torch.isneginf(lse[0, :, :2]))
    assert torch.isfinite(lse[0, :, 2:]).all() and torch.isfinite(lse[1]).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", multi_lora(), ids=ids(multi_lora()))
def test_multi_lora_matches_naive(case, dtype):
    args = tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() and i != 4 else a
                 for i, a in enumerate(case[1]))
    y = reference.multi_lora(*args)
    assert y.dtype == dtype
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y.double(), naive.multi_lora(*args), **tol)


def test_multi_lora_ignores_rank_padding_contents():
    cid, args = multi_lora()[2]
    x, a, b, index, scaling, ranks, base = args
    a2, b2 = a.clone(), b.clone()
    for t, r in enumerate(ranks.tolist()):
        a2[t, r:] = 1e3  # garbage in the padding must never be read
        b2[t, :, r:] = -1e3
    torch.testing.assert_close(reference.multi_lora(x, a2, b2, index, scaling, ranks, base),
                               reference.multi_lora(*args))


@pytest.mark.parametrize("case", soft_prompt_embed(torch.float64), ids=ids(soft_prompt_embed()))
def test_soft_prompt_embed_matches_naive(case):
    torch.testing.assert_close(reference.soft_prompt_embed(*case[1]), naive.soft_prompt_embed(*case[1]))


@pytest.mark.parametrize("case", soft_prompt_concat(torch.float64), ids=ids(soft_prompt_concat()))
def test_soft_prompt_concat_matches_naive(case):
    torch.testing.assert_close(reference.soft_prompt_concat(*case[1]), naive.soft_prompt_concat(*case[1]))


@pytest.mark.parametrize("case", soft_prompt_mask(), ids=ids(soft_prompt_mask()))
def test_soft_prompt_mask_matches_naive(case):
    torch.testing.assert_close(reference.soft_prompt_mask(*case[1]), naive.soft_prompt_mask(*case[1]))


@pytest.mark.parametrize("case", soft_prompt_concat(torch.float64), ids=ids(soft_prompt_concat()))
def test_soft_prompt_concat_backward_matches_autograd_of_naive(case):
    embeds, prompts, *rest = case[1]
    embeds, prompts = embeds.clone().requires_grad_(), prompts.clone().requires_grad_()
    out = naive.soft_prompt_concat(embeds, prompts, *rest)
    grad = torch.randn_like(out)
    want = torch.autograd.grad(out, (embeds, prompts), grad)
    index, lens, at, replace = rest
    got = reference.soft_prompt_concat_backward(grad, prompts.shape[0], prompts.shape[1], index, lens, at, replace)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("case", prefix_attention(torch.float64), ids=ids(prefix_attention()))
def test_prefix_attention_backward_matches_autograd_of_naive(case):
    q, k, v, pk, pv, *rest = case[1]
    leaves = [t.clone().requires_grad_() for t in (q, k, v, pk, pv)]
    out, _ = naive.prefix_attention(*leaves, *rest)
    grad = torch.randn_like(out)
    want = torch.autograd.grad(out, leaves, grad, allow_unused=True)
    got = reference.prefix_attention_backward(grad, q, k, v, pk, pv, *rest)
    for g, w, leaf in zip(got, want, leaves):
        torch.testing.assert_close(g, torch.zeros_like(leaf) if w is None else w)


@pytest.mark.parametrize("case", multi_lora(torch.float64), ids=ids(multi_lora()))
def test_multi_lora_backward_matches_autograd_of_naive(case):
    x, a, b, index, scaling, ranks, base = case[1]
    leaves = [t.clone().requires_grad_() for t in (x, a, b)]
    y = naive.multi_lora(*leaves, index, scaling, ranks, base)
    grad = torch.randn_like(y)
    want = torch.autograd.grad(y, leaves, grad, allow_unused=True) if y.requires_grad else [None] * 3
    got = reference.multi_lora_backward(grad, x, a, b, index, scaling, ranks)
    for g, w, leaf in zip(got, want, leaves):
        torch.testing.assert_close(g, torch.zeros_like(leaf) if w is None else w)
