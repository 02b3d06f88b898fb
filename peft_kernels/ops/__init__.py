"""The registered ops (``torch.ops.peft_kernels.*``) and their validated Python entry points."""
from .label_words import label_word_logits
from .lora_split import lora_expand, lora_shrink
from .multi_lora import multi_lora
from .prefix_attention import prefix_attention
from .prefix_attention_varlen import prefix_attention_varlen
from .soft_prompt import soft_prompt_concat, soft_prompt_embed, soft_prompt_mask
from .soft_prompt_varlen import soft_prompt_concat_varlen, soft_prompt_embed_varlen, soft_prompt_varlen_cu_seqlens

__all__ = ["label_word_logits", "lora_expand", "lora_shrink", "multi_lora", "prefix_attention", "prefix_attention_varlen", "soft_prompt_concat", "soft_prompt_concat_varlen", "soft_prompt_embed", "soft_prompt_embed_varlen", "soft_prompt_mask", "soft_prompt_varlen_cu_seqlens"]
