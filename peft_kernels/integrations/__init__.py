"""Hooks into other libraries: transformers (AttentionInterface, module swaps) and peft (patch, checkpoint io)."""
