"""PEFT methods built on the ops: each knows models, never kernels.

Prompt tuning, P-tuning v1, prefix tuning / P-tuning v2, VPT, LoRA / multi-LoRA, adapters,
BitFit and LayerNorm tuning arrive here one issue at a time; see the README for what exists.
"""
