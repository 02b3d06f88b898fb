"""torch.compile(fullgraph=True) over a function calling every op: no graph break, same result."""
import torch

import peft_kernels as pk
from cases import multi_lora, prefix_attention, soft_prompt_concat, soft_prompt_embed


def _all_ops(q, k, v, pkk, pkv, pidx, x, a, b, aidx, scaling, ranks, ids, weight, prompts, embeds, mask):
    attn = pk.prefix_attention(q, k, v, pkk, pkv, prefix_index=pidx)
    lora = pk.multi_lora(x, a, b, aidx, scaling, ranks=ranks, base=x[:, : b.shape[1]])
    emb = pk.soft_prompt_embed(ids, weight, prompts, insert_at=1)
    cat = pk.soft_prompt_concat(embeds, prompts, replace=True, insert_at=1)
    m = pk.soft_prompt_mask(mask, prompts.shape[1], insert_at=1)
    return attn.sum() + lora.sum() + emb.sum() + cat.sum(), m


def test_compile_fullgraph_all_ops_forward_and_backward():
    q, k, v, pkk, pkv, pidx = prefix_attention()[3][1][:6]
    x, a, b, aidx, scaling, ranks, _ = multi_lora()[2][1]
    ids, weight, prompts = soft_prompt_embed()[0][1][:3]
    embeds = soft_prompt_concat()[0][1][0]
    mask = torch.ones(ids.shape, dtype=torch.long)
    leaves = [t.clone().requires_grad_() for t in (q, x, a, prompts)]
    args = lambda ls: (ls[0], k, v, pkk, pkv, pidx, ls[1], ls[2], b, aidx, scaling, ranks, ids, weight, ls[3], embeds, mask)

    eager_loss, eager_mask = _all_ops(*args(leaves))
    eager_grads = torch.autograd.grad(eager_loss, leaves)

    torch._dynamo.reset()
    compiled = torch.compile(_all_ops, fullgraph=True)
    loss, m = compiled(*args(leaves))
    grads = torch.autograd.grad(loss, leaves)
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(m, eager_mask)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)
