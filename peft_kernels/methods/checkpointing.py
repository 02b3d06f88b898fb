"""Gradient checkpointing that keeps a call's routing: the recomputation in the backward pass runs in
the context of the forward that saved it.

Per-call state (LoRA slots, prefix selection, forced backend) lives in ``contextvars``; a
checkpointed block is recomputed during ``backward()``, outside the forward's ``use`` blocks, where
that state is gone. :func:`keep_call_context` makes each checkpointed block run (and rerun) inside a
copy of the context it was first called in, so the recomputed activations equal the saved ones.
"""
from __future__ import annotations

import contextvars
import functools

from torch import nn

_MARK = "peft_kernels_keeps_context"


def _in_context(checkpoint):
    @functools.wraps(checkpoint)
    def run(function, *args, **kwargs):
        return checkpoint(functools.partial(contextvars.copy_context().run, function), *args, **kwargs)

    setattr(run, _MARK, True)
    return run


def keep_call_context(model: nn.Module) -> None:
    """Wrap the checkpoint function of every checkpointing block of a transformers ``model``
    (idempotent; blocks whose checkpointing is off never call it)."""
    for module in model.modules():
        func = module.__dict__.get("_gradient_checkpointing_func")
        if func is not None and not getattr(func, _MARK, False):
            module._gradient_checkpointing_func = _in_context(func)
