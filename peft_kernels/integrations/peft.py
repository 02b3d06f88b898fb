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
from ..methods.lora import lora_sharding, stack_lora
from ..methods.prefix_tuning import layer_prefixes, local_kv_heads
from ..methods.prompt_model import generate_with_prompts, prompt_inputs
from ..methods.seq2seq_prefix import peft_layers, seq2seq_geometry
from ..ops import multi_lora

SUPPORTED = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "LORA")
SEQ2SEQ_SUPPORTED = ("PREFIX_TUNING", "LORA")
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
    if config.num_transformer_submodules == 2:  # encoder-decoder: PEFT's decoder self-attention prefixes only
        return attn.PrefixSelection(peft_layers(flat, config.num_layers, heads, config.token_dim // heads), None, P)
    layers = layer_prefixes(flat, config.num_layers, heads, config.token_dim // heads)
    local = local_kv_heads(self.base_model)  # a tensor-parallel rank's attention holds some KV heads only
    if local is not None:
        layers = {i: attn.LayerPrefix(lp.key[:, local], lp.value[:, local]) for i, lp in layers.items()}
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


def _seq2seq_prefix_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, decoder_input_ids=None,
                            decoder_attention_mask=None, decoder_inputs_embeds=None, labels=None,
                            output_attentions=None, output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
    """PEFT's ``SEQ_2_SEQ_LM`` prefix-tuning forward with the prefix read by the attention kernel.

    Semantics: PEFT's forward: each decoder self-attention layer attends its prefix (PEFT's
    layout) and the decoder's positions start at P; the encoder and the cross-attention get no
    prefix, as in PEFT (whose prefix sits in the decoder's cache, which the encoder never reads).
    The masks stay [B, L] (PEFT prepends P ones to ``decoder_attention_mask``).
    """
    if self.training:
        keep_call_context(self.base_model)
    with self._peft_kernels_prefix.use(_prefix_selection(self)):
        return self.base_model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                               decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
                               decoder_inputs_embeds=decoder_inputs_embeds, labels=labels,
                               output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                               return_dict=return_dict, **kwargs)


def _check_seq2seq_prefix(peft_model) -> None:
    """ValueError unless PEFT's encoder-decoder prefix table fits the decoder layer for layer."""
    config = peft_model.active_peft_config
    g = seq2seq_geometry(peft_model.base_model.config)
    head_dim = config.token_dim // config.num_attention_heads
    if config.num_transformer_submodules != 2 or (config.num_layers, config.num_attention_heads, head_dim) != \
            (g.decoder_layers, g.kv_heads, g.head_dim):
        raise ValueError(f"patch: this PEFT prefix ({config.num_transformer_submodules} submodules, "
                         f"{config.num_layers} layers x {config.num_attention_heads} heads x {head_dim}) does not fit "
                         f"the decoder ({g.decoder_layers} layers x {g.kv_heads} heads x {g.head_dim}), which PEFT's "
                         "cache layout needs; not supported")


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
    several: stacked from the current weights at every call (differentiable, never stale). On a
    tensor-parallel base layer: this rank's part of each (S-LoRA: B's output rows of a
    column-parallel layer, A's input columns of a row-parallel one).
    """
    weights = [(layer.lora_A[n].weight, layer.lora_B[n].weight) for n in names]
    sharding = layer.__dict__.get("_peft_kernels_sharding")
    if sharding is not None:  # a tensor-parallel base: this rank's part of each adapter
        weights = [sharding.local(a, b) for a, b in weights]
    if len(weights) == 1 and weights[0][0].dtype == dtype:
        a, b = weights[0]
        lora_a, lora_b = a[None], b[None]
        ranks = None
    else:
        lora_a, lora_b, ranks = stack_lora([a for a, _ in weights], [b for _, b in weights], dtype)
    scaling = torch.tensor([float(layer.scaling[n]) for n in names], device=device)
    return lora_a, lora_b, ranks, scaling


def _run_lora(layer: nn.Module, x, lora_a, lora_b, index, scaling, ranks, base):
    """``multi_lora`` of a PEFT LoRA layer, or its tensor-parallel form on a sharded base layer.

    Shapes: x [..., in] (this rank's features on a row-parallel base), base [..., out] (this
    rank's outputs on a column-parallel one); index [N], [B] (per sequence) or None.
    Semantics: on a tensor-parallel base the bank is this rank's part (S-LoRA, see
    :func:`_lora_bank`) and the rank-space sums are all-reduced where the layer needs them.
    """
    sharding = layer.__dict__.get("_peft_kernels_sharding")
    if sharding is None:
        return multi_lora(x, lora_a, lora_b, index, scaling, ranks=ranks, base=base, validate=False)
    x2, base2 = x.reshape(-1, x.shape[-1]), base.reshape(-1, base.shape[-1])
    if index is not None and index.shape[0] != x2.shape[0]:
        index = index.repeat_interleave(x2.shape[0] // index.shape[0])
    if index is None and lora_a.shape[0] == 1:
        index = torch.zeros(x2.shape[0], dtype=torch.int32, device=x.device)
    if ranks is None:
        ranks = torch.full((lora_a.shape[0],), lora_a.shape[1], dtype=torch.int32, device=x.device)
    return sharding.forward(x2, lora_a, lora_b, index, scaling, ranks, base2).view_as(base)


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
        out = _run_lora(self, xa, lora_a, lora_b, index, scaling, ranks, result.to(dtype))
        return out.to(result.dtype)
    out = result.to(dtype)
    for name in names:  # several active adapters add up, as in PEFT
        lora_a, lora_b, ranks, scaling = _lora_bank(self, [name], dtype, x.device)
        out = _run_lora(self, self.lora_dropout[name](xa), lora_a, lora_b, None, scaling, ranks, out)
    return out.to(result.dtype)


def _lora_layers(peft_model: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    return [m for m in peft_model.modules() if isinstance(m, PeftLoraLinear)]


def patch(peft_model: nn.Module) -> nn.Module:
    """Make a ``peft.PeftModelForCausalLM`` (or a ``PeftModelForSeq2SeqLM`` with prefix tuning or
    LoRA) run on peft_kernels ops; returns the same object.

    Semantics: prompt tuning and P-tuning: one fused embed + prompt op per forward; logits equal
    PEFT's forward (to dtype tolerance); ``generate`` decodes greedily exactly as repeated PEFT
    forwards would, with the prompt embedded once. Prefix tuning / P-tuning v2: the prefix K/V
    are a second key source of the ``"peft_prefix"`` attention kernel (one copy per layer, not
    in the KV cache, not in the attention mask), real tokens keep PEFT's positions P..P+L-1,
    and ``generate`` equals greedy decoding by PEFT's forward. LoRA: every ``Linear`` LoRA layer runs one
    ``multi_lora`` call, also for PEFT's mixed batches (``adapter_names=``), instead of a
    Python loop over adapters. Encoder-decoder prefix tuning (BART, T5): PEFT's forward exactly,
    which prefixes the decoder's self-attention only (see :func:`_seq2seq_prefix_forward`).
    ``unpatch`` restores PEFT's routes.
    """
    try:
        from peft import PeftModelForCausalLM, PeftModelForSeq2SeqLM
    except ImportError as exc:  # pragma: no cover - peft is an optional dependency
        raise ImportError("peft_kernels.patch needs the `peft` package: pip install peft") from exc
    if not isinstance(peft_model, (PeftModelForCausalLM, PeftModelForSeq2SeqLM)):
        raise TypeError(f"patch takes a peft.PeftModelForCausalLM or PeftModelForSeq2SeqLM, "
                        f"got {type(peft_model).__name__}")
    kind = _peft_type(peft_model)
    seq2seq = isinstance(peft_model, PeftModelForSeq2SeqLM)
    supported = SEQ2SEQ_SUPPORTED if seq2seq else SUPPORTED
    if kind not in supported:
        raise ValueError(f"patch: {kind} models are not supported yet{' for encoder-decoder models' * seq2seq}; "
                         f"supported: {', '.join(supported)}")
    if kind == "LORA":
        for layer in _lora_layers(peft_model):
            layer._peft_kernels_sharding = lora_sharding(layer.base_layer)  # None unless tensor-parallel
            layer.forward = MethodType(_lora_forward, layer)
    elif kind == "PREFIX_TUNING":
        from peft.utils import TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING as special

        model_type = peft_model.base_model.config.model_type
        if seq2seq:
            _check_seq2seq_prefix(peft_model)
        elif model_type in special or peft_model.active_peft_config.num_transformer_submodules != 1:
            raise ValueError(f"patch: prefix tuning of {model_type} needs PEFT's own cache layout; not supported")
        state = attn.PrefixState()
        peft_model._peft_kernels_prefix = state
        peft_model._peft_kernels_attachment = attn.attach(peft_model.base_model, state)
        peft_model.forward = MethodType(_seq2seq_prefix_forward if seq2seq else _prefix_forward, peft_model)
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
            layer.__dict__.pop("_peft_kernels_sharding", None)
    if "_peft_kernels_attachment" in peft_model.__dict__:
        peft_model._peft_kernels_attachment.detach()
    for name in ("forward", "generate", "_peft_kernels_patched", "_peft_kernels_prefix", "_peft_kernels_attachment"):
        peft_model.__dict__.pop(name, None)
    return peft_model
