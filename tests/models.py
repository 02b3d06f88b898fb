"""Small randomly initialised transformers models for integration tests (no hub access)."""
from __future__ import annotations

import torch


def tiny_llama(seed: int = 0, layers: int = 2, vocab: int = 97, hidden: int = 32, heads: int = 4, kv_heads: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=1, eos_token_id=None)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def batch(vocab: int = 97, B: int = 3, L: int = 7, left_pad: int = 0, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    if left_pad:
        mask[0, :left_pad] = 0
        ids[0, :left_pad] = 0
    return ids, mask


def greedy_by_forward(forward, ids, steps: int):
    """Greedy decoding by repeated full forwards (no cache): the ground truth for generate()."""
    for _ in range(steps):
        logits = forward(ids)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def assert_same_grads(ours, ref, atol: float = 1e-5, rtol: float = 1e-4):
    """Every trainable parameter of ``ours`` has the gradient of the same-named one of ``ref`` (and there are some)."""
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert grads.keys() == ref_grads.keys() and grads
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=atol, rtol=rtol, msg=n)
