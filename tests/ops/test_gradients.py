"""fp64 gradcheck of every differentiable op through the public API, on each CPU backend with a kernel."""
import pytest
import torch

import peft_kernels
from cases import CASES, DIFF_ARGS, call_public
from conftest import backends_for


def _params():
    for op, make in CASES.items():
        for backend in backends_for(op):
            if backend == "triton":
                continue  # the Triton interpreter is checked against reference grads in tests/triton
            for cid, args in make(torch.float64):
                yield pytest.param(op, backend, args, id=f"{op}-{backend}-{cid}")


@pytest.mark.parametrize("op,backend,args", list(_params()))
def test_gradcheck(op, backend, args):
    diff = DIFF_ARGS[op]
    leaves = [args[i] for i in diff if args[i] is not None]
    if not any(leaf.numel() for leaf in leaves):
        pytest.skip("empty inputs: nothing to differentiate")

    def fn(*xs):
        full = list(args)
        it = iter(xs)
        for i in diff:
            if full[i] is not None:
                full[i] = next(it)
        out = call_public(op, full)
        return out

    inputs = tuple(leaf.detach().clone().requires_grad_() for leaf in leaves)
    with peft_kernels.use_backend(backend):
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, fast_mode=False)


def test_lse_is_returned_and_not_differentiable():
    from cases import prefix_attention
    args = prefix_attention(torch.float64)[0][1]
    q = args[0].clone().requires_grad_()
    out, lse = call_public("prefix_attention", (q, *args[1:]), return_lse=True)
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32 and not lse.requires_grad
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_embed_skips_dweight_when_table_is_frozen():
    from cases import soft_prompt_embed
    ids, weight, prompts, index, lens, at = soft_prompt_embed(torch.float64)[1][1]
    prompts = prompts.clone().requires_grad_()
    out = call_public("soft_prompt_embed", (ids, weight, prompts, index, lens, at))
    out.sum().backward()
    assert weight.grad is None and prompts.grad is not None
