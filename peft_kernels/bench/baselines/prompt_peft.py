"""PEFT's own prompt-tuning input path, on a one-layer Llama whose word embedding is the bench's table.

``build`` wraps a tiny ``LlamaForCausalLM`` (the bench's vocabulary and hidden size, one small
layer) in a PEFT prompt-tuning model with the bench's prompt copied into PEFT's prompt encoder.
:func:`embed` runs the lines of ``PeftModelForCausalLM.forward`` that build the model input
(``word_embeddings(input_ids)``, ``get_prompt(batch_size)``, cast, ``torch.cat``), i.e. PEFT's
code for everything before the first transformer layer. One prompt per model: PEFT has no
per-row prompt choice.
"""
from __future__ import annotations

import torch
from torch import Tensor


def build(weight: Tensor, prompt: Tensor):
    """A PEFT prompt-tuning model whose embedding table is ``weight [V, H]`` and prompt ``prompt [P, H]``."""
    from peft import PromptTuningConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    V, H = weight.shape
    P = prompt.shape[0]
    heads = next(h for h in (32, 16, 8, 4, 2, 1) if H % h == 0 and H // h >= 8 or h == 1)
    cfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=heads, num_key_value_heads=heads, tie_word_embeddings=True)
    with torch.device("meta"):
        base = LlamaForCausalLM(cfg)
    base = base.to_empty(device=weight.device).to(weight.dtype)
    base.model.embed_tokens.weight = torch.nn.Parameter(weight.detach(), requires_grad=False)
    model = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    encoder = model.prompt_encoder[model.active_adapter]
    encoder.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        encoder.embedding.weight.copy_(prompt)
    return model


def embed(model, input_ids: Tensor) -> Tensor:
    """PEFT's prompt-tuning input embeddings ``[B, P + L, H]`` (lines of ``PeftModelForCausalLM.forward``)."""
    inputs_embeds = model.word_embeddings(input_ids)
    prompts = model.get_prompt(batch_size=input_ids.shape[0])
    prompts = prompts.to(inputs_embeds.dtype)
    return torch.cat((prompts, inputs_embeds), dim=1)


def prompt_weight(model) -> Tensor:
    """PEFT's trainable prompt table ``[P, H]`` (the leaf its backward reaches)."""
    return model.prompt_encoder[model.active_adapter].embedding.weight
