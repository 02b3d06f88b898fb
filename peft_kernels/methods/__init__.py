"""PEFT methods built on the ops: each knows models, never kernels.

Prompt tuning, P-tuning v1, prefix tuning / P-tuning v2, VPT, LoRA / multi-LoRA, adapters,
BitFit, LayerNorm tuning and head tuning; the README's methods table lists them.
"""
