"""The registered ops (``torch.ops.peft_kernels.*``) and their validated Python entry points."""
from .multi_lora import multi_lora
from .prefix_attention import prefix_attention
from .soft_prompt import soft_prompt_concat, soft_prompt_embed, soft_prompt_mask

__all__ = ["multi_lora", "prefix_attention", "soft_prompt_concat", "soft_prompt_embed", "soft_prompt_mask"]
