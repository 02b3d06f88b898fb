"""``peft_kernels.patch(peft_model)``: run a ``peft`` model on peft_kernels ops, in place.

The patched model keeps PEFT's own modules and parameters (training and ``save_pretrained``
work as before); only the forward and ``generate`` routes change.
"""
from __future__ import annotations

from types import MethodType

import torch
from torch import nn

from .. import attention as attn
from ..methods.checkpointing import keep_call_context
from ..methods.lora import stack_lora
from ..methods.prefix_tuning import layer_prefixes
from ..methods.prompt_model import generate_with_prompts, prompt_inputs
from ..ops import multi_lora

SUPPORTED = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "LORA")
BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names


def _peft_type(peft_model) -> str:
    kind = peft_model.active_peft_config.peft_type
    return getattr(kind, "value", kind)


def _prompt_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                    output_attentions=None, output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
    """PEFT's prompt-learning forward, with the embedding lookup and prompt insertion fused."""
    self._adjust_prompt_learning_kwargs(self.active_peft_config, kwargs=kwargs)
    bank = self.get_prompt(batch_size=1, task_ids=task_ids)
    inputs = prompt_inputs(self.base_model, bank, input_ids=input_ids, inputs_embeds=inputs_embeds,
                           attention_mask=attention_mask, labels=labels)
    return self.base_model(**inputs, output_attentions=output_attentions,
                           output_hidden_states=output_hidden_states, return_dict=return_dict, **kwargs)


def _prompt_generate(self, input_ids=None, attention_mask=None, task_ids=None, **kwargs):
    """Greedy/sampled generation after the prompt; the prompt enters the KV cache once."""
    if input_ids is None:
        raise ValueError("generate needs input_ids")
    if self._adapters_disabled:  # inside PEFT's disable_adapter(): the base model
        return self.base_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    bank = self.get_prompt(batch_size=1, task_ids=task_ids)
    inputs = prompt_inputs(self.base_model, bank.detach(), input_ids=input_ids, attention_mask=attention_mask)
    return generate_with_prompts(self.base_model, input_ids, inputs, **kwargs)


def _prefix_selection(self) -> attn.PrefixSelection:
    """This call's prefixes from PEFT's prefix encoder: every layer's [1, Hkv, P, D] K/V, and
    real tokens shifted to positions P..P+L-1 (where PEFT's prefilled cache puts them).

    Semantics: in training the reparameterisation MLP runs (and is differentiated); in
    inference mode the stored table is used.
    """
    config = self.active_peft_config
    encoder = self.prompt_encoder[self.active_adapter]
    P = config.num_virtual_tokens
    if config.inference_mode:
        flat = encoder.embedding.weight
    else:
        tokens = self.prompt_tokens[self.active_adapter][:P].to(encoder.embedding.weight.device)
        flat = encoder(tokens[None])[0]
    if self.base_model_torch_dtype is not None:
        flat = flat.to(self.base_model_torch_dtype)
    heads = config.num_attention_heads
    layers = layer_prefixes(flat, config.num_layers, heads, config.token_dim // heads)
    return attn.PrefixSelection(layers, None, P)


def _prefix_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                    output_attentions=None, output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
    """PEFT's prefix-tuning forward with the prefix read by the attention kernel, not the cache.

    Semantics: the attention mask stays [B, L] (the prefix is not a token); position ids are
    shifted by P by the backbone hook, as PEFT's prefilled cache shifts them. The prefix is
    selected for this call only: PEFT's ``disable_adapter()`` (which calls the base model's
    forward directly) and any other direct call run the base model.
    """
    if kwargs.get("token_type_ids") is not None:
        kwargs["token_type_ids"] = None  # PEFT drops them for prompt learning too
    if self.training:
        keep_call_context(self.base_model)  # recomputed checkpointed blocks see this call's prefix
    with self._peft_kernels_prefix.use(_prefix_selection(self)):
        return self.base_model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                               labels=labels, output_attentions=output_attentions,
                               output_hidden_states=output_hidden_states, return_dict=return_dict, **kwargs)


def _prefix_generate(self, *args, **kwargs):
    """Generation with the prefix in the attention kernel: the KV cache holds only real tokens."""
    if self._adapters_disabled:  # inside PEFT's disable_adapter(): the base model
        return self.base_model.generate(*args, **kwargs)
    with torch.no_grad():
        selection = _prefix_selection(self)
    with self._peft_kernels_prefix.use(selection):
        return self.base_model.generate(*args, **kwargs)


def _lora_bank(layer: nn.Module, names: list[str], dtype, device):
    """(lora_a, lora_b, ranks, scaling) of a PEFT LoRA layer's adapters ``names``.

    Semantics: one adapter: views of its own weights (no copy, so in-place edits such as
    ``lora_B.weight.data[...] = ...`` are always seen, and the bank costs nothing per call);
    several: stacked from the current weights at every call (differentiable, never stale).
    """
    weights = [(layer.lora_A[n].weight, layer.lora_B[n].weight) for n in names]
    if len(weights) == 1 and weights[0][0].dtype == dtype:
        a, b = weights[0]
        lora_a, lora_b = a[None], b[None]
        ranks = None
    else:
        lora_a, lora_b, ranks = stack_lora([a for a, _ in weights], [b for _, b in weights], dtype)
    scaling = torch.tensor([float(layer.scaling[n]) for n in names], device=device)
    return lora_a, lora_b, ranks, scaling


def _lora_forward(self, x, *args, **kwargs):
    """PEFT LoRA ``Linear.forward`` as one ``multi_lora`` call (single, stacked or mixed batch).

    Falls back to PEFT's own forward for what the op does not model: merged or disabled
    adapters, variants (DoRA, aLoRA), LoRA biases and extra arguments.
    """
    adapter_names = kwargs.get("adapter_names")
    names = list(self.active_adapters) if adapter_names is None else sorted(set(adapter_names) - {BASE})
    names = [n for n in names if n in self.lora_A]
    plain = (not args and set(kwargs) <= {"adapter_names"} and not self.disable_adapters and not self.merged
             and not any(n in getattr(self, "lora_variant", {}) or getattr(self, "lora_bias", {}).get(n, False)
                         for n in names))
    if not plain or not names:
        return type(self).forward(self, x, *args, **kwargs)
    if adapter_names is not None:
        self._check_forward_args(x, adapter_names=adapter_names)
    result = self.base_layer(x)
    dtype = self.lora_A[names[0]].weight.dtype
    xa = self._cast_input_dtype(x, dtype)
    if adapter_names is not None:
        lora_a, lora_b, ranks, scaling = _lora_bank(self, names, dtype, x.device)
        index = torch.tensor([names.index(n) if n in names else -1 for n in adapter_names], device=x.device)
        out = multi_lora(xa, lora_a, lora_b, index, scaling, ranks=ranks, base=result.to(dtype), validate=False)
        return out.to(result.dtype)
    out = result.to(dtype)
    for name in names:  # several active adapters add up, as in PEFT
        lora_a, lora_b, ranks, scaling = _lora_bank(self, [name], dtype, x.device)
        out = multi_lora(self.lora_dropout[name](xa), lora_a, lora_b, None, scaling, ranks=ranks, base=out,
                         validate=False)
    return out.to(result.dtype)


def _lora_layers(peft_model: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    return [m for m in peft_model.modules() if isinstance(m, PeftLoraLinear)]


def patch(peft_model: nn.Module) -> nn.Module:
    """Make a ``peft.PeftModelForCausalLM`` run on peft_kernels ops; returns the same object.

    Semantics: prompt tuning and P-tuning: one fused embed + prompt op per forward; logits equal
    PEFT's forward (to dtype tolerance); ``generate`` decodes greedily exactly as repeated PEFT
    forwards would, with the prompt embedded once. Prefix tuning / P-tuning v2: the prefix K/V
    are a second key source of the ``"peft_prefix"`` attention kernel (one copy per layer, not
    in the KV cache, not in the attention mask), real tokens keep PEFT's positions P..P+L-1,
    and ``generate`` equals greedy decoding by PEFT's forward. LoRA: every ``Linear`` LoRA layer runs one
    ``multi_lora`` call, also for PEFT's mixed batches (``adapter_names=``), instead of a
    Python loop over adapters. ``unpatch`` restores PEFT's routes.
    """
    try:
        from peft import PeftModelForCausalLM
    except ImportError as exc:  # pragma: no cover - peft is an optional dependency
        raise ImportError("peft_kernels.patch needs the `peft` package: pip install peft") from exc
    if not isinstance(peft_model, PeftModelForCausalLM):
        raise TypeError(f"patch takes a peft.PeftModelForCausalLM, got {type(peft_model).__name__}")
    kind = _peft_type(peft_model)
    if kind not in SUPPORTED:
        raise ValueError(f"patch: {kind} models are not supported yet; supported: {', '.join(SUPPORTED)}")
    if kind == "LORA":
        for layer in _lora_layers(peft_model):
            layer.forward = MethodType(_lora_forward, layer)
    elif kind == "PREFIX_TUNING":
        from peft.utils import TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING as special

        model_type = peft_model.base_model.config.model_type
        if model_type in special or peft_model.active_peft_config.num_transformer_submodules != 1:
            raise ValueError(f"patch: prefix tuning of {model_type} needs PEFT's own cache layout; not supported")
        state = attn.PrefixState()
        peft_model._peft_kernels_prefix = state
        peft_model._peft_kernels_attachment = attn.attach(peft_model.base_model, state)
        peft_model.forward = MethodType(_prefix_forward, peft_model)
        peft_model.generate = MethodType(_prefix_generate, peft_model)
    else:
        peft_model.forward = MethodType(_prompt_forward, peft_model)
        peft_model.generate = MethodType(_prompt_generate, peft_model)
    peft_model._peft_kernels_patched = kind
    return peft_model


def unpatch(peft_model: nn.Module) -> nn.Module:
    """Undo :func:`patch` (PEFT's own forward and generate again)."""
    if getattr(peft_model, "_peft_kernels_patched", None) == "LORA":
        for layer in _lora_layers(peft_model):
            layer.__dict__.pop("forward", None)
    if "_peft_kernels_attachment" in peft_model.__dict__:
        peft_model._peft_kernels_attachment.detach()
    for name in ("forward", "generate", "_peft_kernels_patched", "_peft_kernels_prefix", "_peft_kernels_attachment"):
        peft_model.__dict__.pop(name, None)
    return peft_model
