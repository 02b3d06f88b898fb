"""torch.library.opcheck of every registered op (forward and backward) on every CPU backend."""
import pytest
import torch

import peft_kernels
from cases import CASES, DIFF_ARGS, soft_prompt_mask
from conftest import backends_for

BACKWARD = {
    "prefix_attention": "prefix_attention_backward",
    "multi_lora": "multi_lora_backward",
    "soft_prompt_embed": "soft_prompt_embed_backward",
    "soft_prompt_concat": "soft_prompt_concat_backward",
}


def _backward_args(op, args):
    """Arguments of the backward op for a forward case (the autograd formula's own call)."""
    out = peft_kernels.reference.__dict__[op](*args)
    grad = torch.randn_like(out[0] if isinstance(out, tuple) else out)
    if op == "prefix_attention":
        return (grad, *args[:10], *out)
    if op == "multi_lora":
        return (grad, *args[:6])
    if op == "soft_prompt_embed":
        ids, w, prompts, index, lens, at = args
        return (grad, ids, w.shape[0], prompts.shape[0], index, lens, at, True)
    embeds, prompts, index, lens, at, replace = args
    return (grad, prompts.shape[0], prompts.shape[1], index, lens, at, replace)


def _params():
    for op, make in CASES.items():
        cases = make(torch.float32)[:3]
        for name in (op, BACKWARD[op]):
            for backend in backends_for(name):
                if backend == "triton":
                    continue  # interpreter kernels are checked in tests/triton
                for cid, args in cases:
                    yield pytest.param(op, name, backend, args, id=f"{name}-{backend}-{cid}")


@pytest.mark.parametrize("op,name,backend,args", list(_params()))
def test_opcheck(op, name, backend, args):
    if name == op:
        args = list(args)
        for i in DIFF_ARGS[op]:
            if args[i] is not None:
                args[i] = args[i].clone().requires_grad_()
    else:
        args = _backward_args(op, args)
    with peft_kernels.use_backend(backend):
        torch.library.opcheck(getattr(torch.ops.peft_kernels, name).default, tuple(args))


@pytest.mark.parametrize("args", [c[1] for c in soft_prompt_mask()[:3]])
def test_opcheck_soft_prompt_mask(args):
    torch.library.opcheck(torch.ops.peft_kernels.soft_prompt_mask.default, args)
