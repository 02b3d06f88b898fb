"""Soft-prompt ops: ``soft_prompt_embed``, ``soft_prompt_concat`` and ``soft_prompt_mask``.

Validation -> backend dispatch -> autograd registration, for prompt tuning, P-tuning v1 and
visual prompt tuning (shallow: insert once; deep: replace the previous layer's prompt).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from . import _checks as C
from ._dispatch import call, forced_backend, register_autograd, register, register_native, select, use_backend

# --------------------------------------------------------------------------- registered ops


@torch.library.custom_op("peft_kernels::soft_prompt_embed", mutates_args=())
def _embed_op(
    input_ids: Tensor, weight: Tensor, prompts: Tensor, prompt_index: Optional[Tensor],
    prompt_lens: Optional[Tensor], insert_at: int,
) -> Tensor:
    args = (input_ids, weight, prompts, prompt_index, prompt_lens, insert_at)
    return select("soft_prompt_embed", weight.device, *args)[1](*args)


@_embed_op.register_fake
def _(input_ids, weight, prompts, prompt_index, prompt_lens, insert_at):
    return weight.new_empty(input_ids.shape[0], input_ids.shape[1] + prompts.shape[1], weight.shape[1])


@torch.library.custom_op("peft_kernels::soft_prompt_embed_backward", mutates_args=())
def _embed_backward_op(
    grad_out: Tensor, input_ids: Tensor, vocab_size: int, num_prompts: int,
    prompt_index: Optional[Tensor], prompt_lens: Optional[Tensor], insert_at: int, need_dweight: bool,
) -> tuple[Tensor, Tensor]:
    args = (grad_out, input_ids, vocab_size, num_prompts, prompt_index, prompt_lens, insert_at, need_dweight)
    return select("soft_prompt_embed_backward", grad_out.device, *args)[1](*args)


@_embed_backward_op.register_fake
def _(grad_out, input_ids, vocab_size, num_prompts, prompt_index, prompt_lens, insert_at, need_dweight):
    H = grad_out.shape[2]
    P = grad_out.shape[1] - input_ids.shape[1]
    return grad_out.new_empty(vocab_size if need_dweight else 0, H), grad_out.new_empty(num_prompts, P, H)


def _embed_setup(ctx, inputs, output):
    input_ids, weight, prompts, prompt_index, prompt_lens, insert_at = inputs
    ctx.save_for_backward(input_ids, prompt_index, prompt_lens)
    ctx.vocab_size, ctx.num_prompts, ctx.insert_at = weight.shape[0], prompts.shape[0], insert_at


def _embed_backward(ctx, grad, backward_op=_embed_backward_op):
    input_ids, prompt_index, prompt_lens = ctx.saved_tensors
    need_dweight = ctx.needs_input_grad[1]
    dweight, dprompts = backward_op(
        grad.contiguous(), input_ids, ctx.vocab_size, ctx.num_prompts, prompt_index, prompt_lens,
        ctx.insert_at, need_dweight,
    )
    return None, dweight if need_dweight else None, dprompts, None, None, None


register_autograd(_embed_op, _embed_backward, _embed_setup)


@torch.library.custom_op("peft_kernels::soft_prompt_concat", mutates_args=())
def _concat_op(
    embeds: Tensor, prompts: Tensor, prompt_index: Optional[Tensor], prompt_lens: Optional[Tensor],
    insert_at: int, replace: bool,
) -> Tensor:
    args = (embeds, prompts, prompt_index, prompt_lens, insert_at, replace)
    return select("soft_prompt_concat", embeds.device, *args)[1](*args)


@_concat_op.register_fake
def _(embeds, prompts, prompt_index, prompt_lens, insert_at, replace):
    B, L, H = embeds.shape
    return embeds.new_empty(B, L if replace else L + prompts.shape[1], H)


@torch.library.custom_op("peft_kernels::soft_prompt_concat_backward", mutates_args=())
def _concat_backward_op(
    grad_out: Tensor, num_prompts: int, prompt_len: int, prompt_index: Optional[Tensor],
    prompt_lens: Optional[Tensor], insert_at: int, replace: bool,
) -> tuple[Tensor, Tensor]:
    args = (grad_out, num_prompts, prompt_len, prompt_index, prompt_lens, insert_at, replace)
    return select("soft_prompt_concat_backward", grad_out.device, *args)[1](*args)


@_concat_backward_op.register_fake
def _(grad_out, num_prompts, prompt_len, prompt_index, prompt_lens, insert_at, replace):
    B, S, H = grad_out.shape
    L = S if replace else S - prompt_len
    return grad_out.new_empty(B, L, H), grad_out.new_empty(num_prompts, prompt_len, H)


def _concat_setup(ctx, inputs, output):
    embeds, prompts, prompt_index, prompt_lens, insert_at, replace = inputs
    ctx.save_for_backward(prompt_index, prompt_lens)
    ctx.num_prompts, ctx.prompt_len = prompts.shape[0], prompts.shape[1]
    ctx.insert_at, ctx.replace = insert_at, replace


def _concat_backward(ctx, grad, backward_op=_concat_backward_op):
    prompt_index, prompt_lens = ctx.saved_tensors
    dembeds, dprompts = backward_op(
        grad.contiguous(), ctx.num_prompts, ctx.prompt_len, prompt_index, prompt_lens, ctx.insert_at, ctx.replace
    )
    return dembeds, dprompts, None, None, None, None


register_autograd(_concat_op, _concat_backward, _concat_setup)


@torch.library.custom_op("peft_kernels::soft_prompt_mask", mutates_args=())
def _mask_op(
    attention_mask: Tensor, prompt_len: int, num_prompts: int, prompt_index: Optional[Tensor],
    prompt_lens: Optional[Tensor], insert_at: int, replace: bool,
) -> Tensor:
    return reference.soft_prompt_mask(attention_mask, prompt_len, num_prompts, prompt_index, prompt_lens, insert_at, replace)


@_mask_op.register_fake
def _(attention_mask, prompt_len, num_prompts, prompt_index, prompt_lens, insert_at, replace):
    B, L = attention_mask.shape
    return attention_mask.new_empty(B, L if replace else L + prompt_len)


# --------------------------------------------------------------------------- eager autograd
# In plain eager training the registered ops' autograd formulas run through torch.autograd.Function:
# the same kernels and backward, without the custom-op dispatcher round trip (CPU, B1 L32 P20 H256
# fp32, one thread: fwd+bwd 57 us through the custom op, 28 us this way, 21 us embedding + cat).
# Tracing (torch.compile, export), tensor subclasses, dispatch / function modes and functorch
# transforms keep the registered custom ops. As there, the backward runs under the backend forced
# at forward time.


def _plain_eager(args) -> bool:
    """True outside tracing, modes and functorch transforms when no tensor in ``args`` is a subclass."""
    return not (
        torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack()
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._are_functorch_transforms_active()
        or any(isinstance(t, Tensor) and type(t) is not Tensor for t in args)
    )


def _direct(op: str, forced: Optional[str]):
    """``op``'s kernel for the backend forced at forward time, called without the custom-op dispatch."""
    def run(grad_out, *args):
        if forced_backend() == forced:  # the usual case: skip the context switch (a few us)
            return select(op, grad_out.device, grad_out, *args)[1](grad_out, *args)
        with use_backend(forced):
            return select(op, grad_out.device, grad_out, *args)[1](grad_out, *args)
    return run


def _eager_autograd(op: str, custom_op, setup, backward, device_arg: int):
    """The autograd entry point of ``op`` (called with the registered op's arguments).

    Semantics: in plain eager mode a ``torch.autograd.Function`` runs the selected kernel of ``op``
    (on the device of argument ``device_arg``), ``setup(ctx, args, out)`` as the registered op's
    setup_context, and ``backward(ctx, grad, kernel)`` with ``op + "_backward"``'s kernel under the
    backend forced at forward time; otherwise the registered ``custom_op`` runs.
    """
    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            out = select(op, args[device_arg].device, *args)[1](*args)
            setup(ctx, args, out)
            ctx.forced = forced_backend()
            return out

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad):
            return backward(ctx, grad, _direct(f"{op}_backward", ctx.forced))

    Function.__name__ = Function.__qualname__ = f"{op}_function"

    def run(*args):
        return Function.apply(*args) if _plain_eager(args) else custom_op(*args)
    return run


_embed_autograd = _eager_autograd("soft_prompt_embed", _embed_op, _embed_setup, _embed_backward, 1)
_concat_autograd = _eager_autograd("soft_prompt_concat", _concat_op, _concat_setup, _concat_backward, 0)


for _op in ("soft_prompt_embed", "soft_prompt_embed_backward", "soft_prompt_concat", "soft_prompt_concat_backward"):
    register(_op, "reference", getattr(reference, _op))
register_native("soft_prompt_embed", "soft_prompt_embed_fwd")
register_native("soft_prompt_concat", "soft_prompt_concat_fwd")
register_native("soft_prompt_embed_backward", "soft_prompt_embed_bwd")
register_native("soft_prompt_concat_backward", "soft_prompt_concat_bwd")

# --------------------------------------------------------------------------- validation


def _check_bank(prompts, rows, prompt_index, prompt_lens, insert_at, seq_len, replace=False):
    C.tensor("prompts", prompts, 3, layout="[T, P, H]")
    T, P, _ = prompts.shape
    C.bank_index("prompt_index", prompt_index, rows, T, f"prompts {C.shape_of(prompts)}", True)
    C.lengths("prompt_lens", prompt_lens, T, P, f"prompt length P = {P}", True)
    limit = seq_len - P if replace else seq_len
    if not isinstance(insert_at, int) or not 0 <= insert_at <= limit:
        room = f"insert_at + P <= L = {seq_len} with replace=True" if replace else f"0 <= insert_at <= L = {seq_len}"
        raise ValueError(f"insert_at={insert_at!r} out of range: need {room} (prompts {C.shape_of(prompts)})")


def _check_devices(ref_name, ref, prompts, prompt_index, prompt_lens):
    C.same_device(ref_name, ref, prompts=prompts, prompt_index=prompt_index, prompt_lens=prompt_lens)


def _check_token_ids(input_ids: Tensor, weight: Tensor) -> None:
    """Every id in [0, V) for weight [V, H] (a host read, skipped where host checks are off)."""
    if C.host_checks_enabled(True) and input_ids.numel():
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= weight.shape[0]:
            raise ValueError(
                f"input_ids holds token ids in [{lo}, {hi}] but the vocabulary has {weight.shape[0]} "
                f"rows (weight {C.shape_of(weight)}, input_ids {C.shape_of(input_ids)})"
            )


# --------------------------------------------------------------------------- public API


def soft_prompt_embed(
    input_ids: Tensor,
    weight: Tensor,
    prompts: Tensor,
    *,
    prompt_index: Optional[Tensor] = None,
    prompt_lens: Optional[Tensor] = None,
    insert_at: int = 0,
    validate: bool = True,
) -> Tensor:
    """Embed tokens and insert each row's soft prompt in one pass (one write per output row).

    Shapes: input_ids [B, L] int32/int64; weight [V, H] (the word embedding); prompts [T, P, H]
    (same dtype as weight); prompt_index [B] int32/int64 or None; prompt_lens [T] or None.
    Returns [B, L + P, H] in weight's dtype.

    Semantics: out[b, :insert_at] = weight[input_ids[b, :insert_at]]; out[b, insert_at + p] =
    prompts[t, p] for t = the row's prompt and p < prompt_lens[t], else 0 (also for t = -1);
    out[b, insert_at + P:] = weight[input_ids[b, insert_at:]]. ``validate=True`` also checks
    token ids and index ranges on the host (a GPU sync); ``validate=False`` trusts the caller
    completely (no checks: what model code does per layer after checking once).
    Backward gives dprompts (summed over the rows using each prompt) and dweight (only when
    weight requires grad).
    """
    if validate:
        C.tensor("input_ids", input_ids, 2, C.INDEX_DTYPES, "[B, L]")
        C.tensor("weight", weight, 2, layout="[V, H]")
        _check_bank(prompts, input_ids.shape[0], prompt_index, prompt_lens, insert_at, input_ids.shape[1])
        C.dim_equal("prompts.shape[2] (H)", prompts.shape[2], weight.shape[1],
                    f"prompts {C.shape_of(prompts)} vs weight {C.shape_of(weight)}")
        C.same_dtype("weight", weight, prompts=prompts)
        _check_devices("weight", weight, prompts, prompt_index, prompt_lens)
        C.same_device("weight", weight, input_ids=input_ids)
        _check_token_ids(input_ids, weight)
    args = (input_ids, weight, prompts, prompt_index, prompt_lens, insert_at)
    return call("soft_prompt_embed", _embed_autograd, args, weight.device, (weight, prompts))


def soft_prompt_concat(
    embeds: Tensor,
    prompts: Tensor,
    *,
    prompt_index: Optional[Tensor] = None,
    prompt_lens: Optional[Tensor] = None,
    insert_at: int = 0,
    replace: bool = False,
    validate: bool = True,
) -> Tensor:
    """Insert each row's soft prompt into already-embedded tokens (or overwrite with it).

    Shapes: embeds [B, L, H]; prompts [T, P, H] (same dtype); prompt_index [B] or None;
    prompt_lens [T] or None. Returns [B, L + P, H], or [B, L, H] with ``replace=True``.

    Semantics: positions insert_at..insert_at+P hold the row's prompt (zeros for -1 rows and
    slots past prompt_lens); with ``replace=True`` they overwrite embeds there (deep VPT),
    else embeds[:, insert_at:] moves right by P. ``insert_at=1`` puts prompts after a CLS token.
    """
    if validate:
        C.tensor("embeds", embeds, 3, layout="[B, L, H]")
        _check_bank(prompts, embeds.shape[0], prompt_index, prompt_lens, insert_at, embeds.shape[1], replace)
        C.dim_equal("prompts.shape[2] (H)", prompts.shape[2], embeds.shape[2],
                    f"prompts {C.shape_of(prompts)} vs embeds {C.shape_of(embeds)}")
        C.same_dtype("embeds", embeds, prompts=prompts)
        _check_devices("embeds", embeds, prompts, prompt_index, prompt_lens)
    args = (embeds, prompts, prompt_index, prompt_lens, insert_at, replace)
    return call("soft_prompt_concat", _concat_autograd, args, embeds.device, (embeds, prompts))


def soft_prompt_mask(
    attention_mask: Tensor,
    prompt_len: int,
    *,
    num_prompts: int = 1,
    prompt_index: Optional[Tensor] = None,
    prompt_lens: Optional[Tensor] = None,
    insert_at: int = 0,
    replace: bool = False,
    validate: bool = True,
) -> Tensor:
    """The attention mask matching a soft-prompt op's output: which prompt slots are real.

    Shapes: attention_mask [B, L] bool or integer (nonzero = real token); prompt_index [B] or
    None (then ``num_prompts`` must be 1 or B); prompt_lens [num_prompts] or None. Returns
    [B, L + P] (or [B, L] with replace) in attention_mask's dtype, P = prompt_len.

    Semantics: prompt slot p of row b is real iff its index t != -1 and p < prompt_lens[t];
    token positions keep attention_mask.
    """
    if validate:
        C.tensor("attention_mask", attention_mask, 2,
                 (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64), "[B, L]")
        B, L = attention_mask.shape
        if not isinstance(prompt_len, int) or prompt_len < 0:
            raise ValueError(f"prompt_len must be a non-negative int, got {prompt_len!r}")
        fake_bank = torch.empty(num_prompts, prompt_len, 0, device="meta")
        _check_bank(fake_bank, B, prompt_index, prompt_lens, insert_at, L, replace)
        C.same_device("attention_mask", attention_mask, prompt_index=prompt_index, prompt_lens=prompt_lens)
    return _mask_op(attention_mask, prompt_len, num_prompts, prompt_index, prompt_lens, insert_at, replace)
