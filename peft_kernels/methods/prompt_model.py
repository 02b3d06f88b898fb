"""Prompt tuning / P-tuning v1 on a causal LM: fused embed + prompt insertion, per-task banks.

:func:`prompt_inputs` builds what the base model consumes (``inputs_embeds``, the extended
attention mask and labels) with one ``soft_prompt_embed`` call; :class:`PromptTunedModel`
serves and trains several prompts in one batch (rows pick their prompt by name).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..ops import soft_prompt_concat, soft_prompt_embed, soft_prompt_mask
from .selection import per_row, used_in_order
from .soft_prompt import stack_prompts

IGNORE_INDEX = -100


def _plain_embedding(module: nn.Module) -> bool:
    """True when ``module(ids)`` is exactly ``weight[ids]`` (no scaling, renorm or override).

    Semantics: False for a tensor-parallel embedding (a DTensor weight, or a forward replaced
    per instance, as transformers' ``tp_plan`` does for a vocab-parallel table): the module's
    own forward then embeds and the prompt is inserted afterwards.
    """
    return (type(module) is nn.Embedding and module.max_norm is None and "forward" not in module.__dict__
            and type(module.weight).__name__ != "DTensor")


def prompt_inputs(
    model: nn.Module,
    bank: Tensor,
    *,
    input_ids: Optional[Tensor] = None,
    inputs_embeds: Optional[Tensor] = None,
    prompt_index: Optional[Tensor] = None,
    prompt_lens: Optional[Tensor] = None,
    attention_mask: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    validate: bool = True,
) -> dict:
    """Inputs for ``model`` with each row's soft prompt in front of its tokens.

    Shapes: bank [T, P, H]; input_ids [B, L] (or inputs_embeds [B, L, H]); prompt_index [B] or
    None; prompt_lens [T] or None; attention_mask / labels [B, L] or None. Returns a dict with
    inputs_embeds [B, P + L, H], attention_mask [B, P + L] and labels [B, P + L] (when given).

    Semantics: as PEFT's prompt-learning forward: prompt slots first, attended where real
    (masked on -1 rows and past prompt_lens), labels -100 there (and on the first token of
    rows without a prompt, which nothing real precedes); positions are left to the
    model (PEFT's behaviour: 0..P+L-1). With a plain ``nn.Embedding``
    the lookup and the insertion are one fused op; other embedding modules (scaled, renormed)
    run as they are and the prompt is inserted with ``soft_prompt_concat``.
    """
    embedding = model.get_input_embeddings()
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    B, L = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
    dtype = embedding.weight.dtype if inputs_embeds is None else inputs_embeds.dtype
    bank = bank.to(dtype)
    kw = dict(prompt_index=prompt_index, prompt_lens=prompt_lens, validate=validate)
    if inputs_embeds is None and _plain_embedding(embedding):
        embeds = soft_prompt_embed(input_ids, embedding.weight, bank, **kw)
    else:
        embeds = soft_prompt_concat(embedding(input_ids) if inputs_embeds is None else inputs_embeds, bank, **kw)
    P = bank.shape[1]
    device = embeds.device
    if attention_mask is None:
        attention_mask = torch.ones(B, L, dtype=torch.long, device=device)
    out = {
        "inputs_embeds": embeds,
        "attention_mask": soft_prompt_mask(attention_mask, P, num_prompts=bank.shape[0], **kw),
    }
    if labels is not None:
        labels = torch.cat([labels.new_full((B, P), IGNORE_INDEX), labels], dim=1)
        if prompt_index is not None and L:
            # A row without a prompt predicts its first token from a masked slot: not a target,
            # exactly as when the row runs alone (nothing precedes its first token).
            labels[:, P] = labels[:, P].masked_fill(prompt_index < 0, IGNORE_INDEX)
        out["labels"] = labels
    return out


def compact_position_ids(attention_mask: Tensor) -> Tensor:
    """Positions counting only attended slots, as ``generate`` computes them.

    Shapes: attention_mask [B, S] -> position_ids [B, S] (0 on masked slots).
    Semantics: a row's real tokens get the positions they would have with no padding and no
    masked prompt slots, so its logits do not depend on the other rows of the batch.
    """
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def prompt_batch(model: nn.Module, prompts: Mapping[str, nn.Module], names: Sequence[Optional[str]], *,
                 input_ids=None, inputs_embeds=None, attention_mask=None, labels=None) -> dict:
    """Base-model inputs for a batch whose rows each use a named prompt (or None).

    Shapes: as :func:`prompt_inputs`, with P = the longest prompt used.
    Semantics: prompts are right-aligned (shorter ones' leading slots masked) and positions
    are :func:`compact_position_ids`, so each row's logits, loss and gradients equal that row
    run alone with its prompt; the bank is rebuilt from the prompt modules at every call.
    """
    used = used_in_order(names, list(prompts)) or list(prompts)[:1]
    device = model.get_input_embeddings().weight.device
    bank, lens = stack_prompts([prompts[name]() for name in used], align="right")
    bank, lens = bank.to(device), lens.to(device)
    index = torch.tensor([-1 if n is None else used.index(n) for n in names], device=device)
    inputs = prompt_inputs(model, bank, input_ids=input_ids, inputs_embeds=inputs_embeds, prompt_index=index,
                           attention_mask=attention_mask, labels=labels)
    P = bank.shape[1]
    row_len = torch.where(index >= 0, lens[index.clamp(min=0)], 0)
    leading_pad = torch.arange(P, device=device)[None, :] < (P - row_len)[:, None]
    inputs["attention_mask"][:, :P].masked_fill_(leading_pad, 0)
    inputs["position_ids"] = compact_position_ids(inputs["attention_mask"])
    return inputs


class PromptTunedModel(nn.Module):
    """A causal LM with named soft prompts (``SoftPrompt`` / ``PromptEncoder``); rows choose one.

    Shapes: forward(input_ids [B, L], attention_mask [B, L], labels [B, L]) returns the base
    model's output over P_max + L positions; generate returns [B, L + new tokens].
    Semantics: ``prompt`` is one name for every row, or a list with a name (or None: no prompt,
    its slots masked) per row; see :func:`prompt_batch`.
    """

    def __init__(self, model: nn.Module, prompts: Union[nn.Module, Mapping[str, nn.Module]]):
        super().__init__()
        self.model = model
        if isinstance(prompts, nn.Module):
            prompts = {"default": prompts}
        hidden = model.get_input_embeddings().weight.shape[1]
        for name, module in prompts.items():
            width = module().shape[-1]
            if width != hidden:
                raise ValueError(f"prompt {name!r} has width {width} but the model's hidden size is {hidden}")
        self.prompts = nn.ModuleDict(prompts)

    def prepare(self, input_ids=None, attention_mask=None, labels=None, *, prompt=None, inputs_embeds=None) -> dict:
        """The base model's inputs for this batch (see :func:`prompt_batch`)."""
        rows = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        names = per_row(prompt, rows, list(self.prompts), "prompt")
        return prompt_batch(self.model, self.prompts, names, input_ids=input_ids, inputs_embeds=inputs_embeds,
                            attention_mask=attention_mask, labels=labels)

    def forward(self, input_ids=None, attention_mask=None, labels=None, *, prompt=None, inputs_embeds=None, **kwargs):
        return self.model(**self.prepare(input_ids, attention_mask, labels, prompt=prompt, inputs_embeds=inputs_embeds),
                          **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *, prompt=None, **kwargs) -> Tensor:
        """Generate after each row's prompt; returns input_ids followed by the new tokens."""
        inputs = self.prepare(input_ids, attention_mask, prompt=prompt)
        return generate_with_prompts(self.model, input_ids, inputs, **kwargs)


def generate_with_prompts(model: nn.Module, input_ids: Tensor, inputs: dict, **kwargs) -> Tensor:
    """Run ``model.generate`` from prepared ``inputs_embeds``; returns [B, L + new] token ids.

    Semantics: the prompt is embedded once at prefill and sits in the KV cache like any token;
    decode steps feed only the new token (never the prompt again).
    """
    new_tokens = model.generate(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"], **kwargs)
    return torch.cat([input_ids, new_tokens.to(input_ids.device)], dim=1)
