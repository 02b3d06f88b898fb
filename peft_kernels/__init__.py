"""peft_kernels: fused kernels for parameter-efficient fine-tuning.

Ops (each a ``torch.ops.peft_kernels`` custom op with autograd, fake/meta and a backend
dispatcher): :func:`prefix_attention`, :func:`multi_lora` (and its halves :func:`lora_shrink`,
:func:`lora_expand`), :func:`soft_prompt_embed`, :func:`soft_prompt_concat`, :func:`soft_prompt_mask`,
:func:`label_word_logits`, and the packed (varlen) :func:`prefix_attention_varlen`,
:func:`soft_prompt_embed_varlen`, :func:`soft_prompt_concat_varlen`. See ``reference`` for the exact
semantics, ``info()`` for what is available on this machine.

Models: :func:`patch` (a ``peft`` model onto the ops, in place), :class:`MultiAdapterModel`
(one batch, adapters of different kinds), :func:`apply` with the configs of :mod:`api` (every
method of :mod:`methods` behind one call).
"""
from . import reference
from ._info import info
from .ops import lora_expand, lora_shrink, multi_lora, prefix_attention, soft_prompt_concat, soft_prompt_embed, soft_prompt_mask
from .ops import label_word_logits
from .ops import prefix_attention_varlen
from .ops import soft_prompt_concat_varlen, soft_prompt_embed_varlen, soft_prompt_varlen_cu_seqlens
from .ops._dispatch import BACKENDS, BackendUnavailableError, last_backend, use_backend
from . import triton as _triton_kernels  # registers the Triton backend's kernels
from .integrations.peft import patch, unpatch
from .multi_adapter import MultiAdapterModel
from . import api, methods  # noqa: E402  (api imports the methods)
from . import distributed  # noqa: E402,F401  (registers the tensor-parallel sharding rules)
from .api import apply

__version__ = "0.1.0"
__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "api",
    "apply",
    "MultiAdapterModel",
    "info",
    "label_word_logits",
    "last_backend",
    "lora_expand",
    "lora_shrink",
    "multi_lora",
    "patch",
    "prefix_attention",
    "prefix_attention_varlen",
    "reference",
    "soft_prompt_concat",
    "soft_prompt_concat_varlen",
    "soft_prompt_embed",
    "soft_prompt_embed_varlen",
    "soft_prompt_mask",
    "soft_prompt_varlen_cu_seqlens",
    "unpatch",
    "use_backend",
]
