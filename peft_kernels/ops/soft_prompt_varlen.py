"""Packed (varlen) soft-prompt ops: ``soft_prompt_embed_varlen``, ``soft_prompt_concat_varlen`` and
``soft_prompt_varlen_cu_seqlens``.

Validation -> backend dispatch -> autograd registration. S sequences lie back to back along dim 0
(``cu_seqlens`` int32 [S + 1], FlashAttention's convention); each gets its own prompt in front of it,
ragged: a sequence without a prompt gets no slot, a shorter prompt takes fewer rows.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .. import reference
from . import _checks as C
from ._dispatch import call, register, register_autograd, register_native, select
from .soft_prompt import _check_token_ids, _eager_autograd

# --------------------------------------------------------------------------- registered ops


@torch.library.custom_op("peft_kernels::soft_prompt_embed_varlen", mutates_args=())
def _embed_op(
    input_ids: Tensor, weight: Tensor, prompts: Tensor, cu_seqlens: Tensor, cu_seqlens_out: Tensor, total_out: int,
    prompt_index: Optional[Tensor], prompt_lens: Optional[Tensor],
) -> Tensor:
    args = (input_ids, weight, prompts, cu_seqlens, cu_seqlens_out, total_out, prompt_index, prompt_lens)
    return select("soft_prompt_embed_varlen", weight.device, *args)[1](*args)


@_embed_op.register_fake
def _(input_ids, weight, prompts, cu_seqlens, cu_seqlens_out, total_out, prompt_index, prompt_lens):
    return weight.new_empty(total_out, weight.shape[1])


@torch.library.custom_op("peft_kernels::soft_prompt_embed_varlen_backward", mutates_args=())
def _embed_backward_op(
    grad_out: Tensor, input_ids: Tensor, cu_seqlens: Tensor, cu_seqlens_out: Tensor, vocab_size: int,
    num_prompts: int, prompt_len: int, prompt_index: Optional[Tensor], prompt_lens: Optional[Tensor],
    need_dweight: bool,
) -> tuple[Tensor, Tensor]:
    args = (grad_out, input_ids, cu_seqlens, cu_seqlens_out, vocab_size, num_prompts, prompt_len, prompt_index,
            prompt_lens, need_dweight)
    return select("soft_prompt_embed_varlen_backward", grad_out.device, *args)[1](*args)


@_embed_backward_op.register_fake
def _(grad_out, input_ids, cu_seqlens, cu_seqlens_out, vocab_size, num_prompts, prompt_len, prompt_index,
      prompt_lens, need_dweight):
    H = grad_out.shape[1]
    return grad_out.new_empty(vocab_size if need_dweight else 0, H), grad_out.new_empty(num_prompts, prompt_len, H)


def _embed_setup(ctx, inputs, output):
    input_ids, weight, prompts, cu_seqlens, cu_seqlens_out, total_out, prompt_index, prompt_lens = inputs
    ctx.save_for_backward(input_ids, cu_seqlens, cu_seqlens_out, prompt_index, prompt_lens)
    ctx.vocab_size, ctx.num_prompts, ctx.prompt_len = weight.shape[0], prompts.shape[0], prompts.shape[1]


def _embed_backward(ctx, grad, backward_op=_embed_backward_op):
    input_ids, cu_seqlens, cu_seqlens_out, prompt_index, prompt_lens = ctx.saved_tensors
    need_dweight = ctx.needs_input_grad[1]
    dweight, dprompts = backward_op(
        grad.contiguous(), input_ids, cu_seqlens, cu_seqlens_out, ctx.vocab_size, ctx.num_prompts, ctx.prompt_len,
        prompt_index, prompt_lens, need_dweight,
    )
    return None, dweight if need_dweight else None, dprompts, None, None, None, None, None


register_autograd(_embed_op, _embed_backward, _embed_setup)


@torch.library.custom_op("peft_kernels::soft_prompt_concat_varlen", mutates_args=())
def _concat_op(
    embeds: Tensor, prompts: Tensor, cu_seqlens: Tensor, cu_seqlens_out: Tensor, total_out: int,
    prompt_index: Optional[Tensor], prompt_lens: Optional[Tensor],
) -> Tensor:
    args = (embeds, prompts, cu_seqlens, cu_seqlens_out, total_out, prompt_index, prompt_lens)
    return select("soft_prompt_concat_varlen", embeds.device, *args)[1](*args)


@_concat_op.register_fake
def _(embeds, prompts, cu_seqlens, cu_seqlens_out, total_out, prompt_index, prompt_lens):
    return embeds.new_empty(total_out, embeds.shape[1])


@torch.library.custom_op("peft_kernels::soft_prompt_concat_varlen_backward", mutates_args=())
def _concat_backward_op(
    grad_out: Tensor, cu_seqlens: Tensor, cu_seqlens_out: Tensor, num_tokens: int, num_prompts: int,
    prompt_len: int, prompt_index: Optional[Tensor], prompt_lens: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    args = (grad_out, cu_seqlens, cu_seqlens_out, num_tokens, num_prompts, prompt_len, prompt_index, prompt_lens)
    return select("soft_prompt_concat_varlen_backward", grad_out.device, *args)[1](*args)


@_concat_backward_op.register_fake
def _(grad_out, cu_seqlens, cu_seqlens_out, num_tokens, num_prompts, prompt_len, prompt_index, prompt_lens):
    H = grad_out.shape[1]
    return grad_out.new_empty(num_tokens, H), grad_out.new_empty(num_prompts, prompt_len, H)


def _concat_setup(ctx, inputs, output):
    embeds, prompts, cu_seqlens, cu_seqlens_out, total_out, prompt_index, prompt_lens = inputs
    ctx.save_for_backward(cu_seqlens, cu_seqlens_out, prompt_index, prompt_lens)
    ctx.num_tokens, ctx.num_prompts, ctx.prompt_len = embeds.shape[0], prompts.shape[0], prompts.shape[1]


def _concat_backward(ctx, grad, backward_op=_concat_backward_op):
    cu_seqlens, cu_seqlens_out, prompt_index, prompt_lens = ctx.saved_tensors
    dembeds, dprompts = backward_op(
        grad.contiguous(), cu_seqlens, cu_seqlens_out, ctx.num_tokens, ctx.num_prompts, ctx.prompt_len,
        prompt_index, prompt_lens,
    )
    return dembeds, dprompts, None, None, None, None, None


register_autograd(_concat_op, _concat_backward, _concat_setup)

# --------------------------------------------------------------------------- eager autograd
# Plain eager training skips the custom-op dispatcher round trip, as the padded soft-prompt ops do;
# tracing, modes, subclasses and functorch keep the registered ops.

_embed_autograd = _eager_autograd("soft_prompt_embed_varlen", _embed_op, _embed_setup, _embed_backward, 1)
_concat_autograd = _eager_autograd("soft_prompt_concat_varlen", _concat_op, _concat_setup, _concat_backward, 0)


for _op, _native in (
    ("soft_prompt_embed_varlen", "soft_prompt_embed_varlen_fwd"),
    ("soft_prompt_embed_varlen_backward", "soft_prompt_embed_varlen_bwd"),
    ("soft_prompt_concat_varlen", "soft_prompt_concat_varlen_fwd"),
    ("soft_prompt_concat_varlen_backward", "soft_prompt_concat_varlen_bwd"),
):
    register(_op, "reference", getattr(reference, _op))
    register_native(_op, _native)  # csrc/cpu/soft_prompt_varlen.cpp: the "cpp" backend

# --------------------------------------------------------------------------- validation


def _check_cu_seqlens(name: str, cu: Tensor, total: int, total_what: str, validate: bool) -> int:
    """Check ``cu`` is int32 [S + 1] from 0 to ``total``, non-decreasing (host reads only when allowed); returns S."""
    C.tensor(name, cu, 1, (torch.int32,), "[S + 1]")
    if cu.shape[0] < 1:
        raise ValueError(f"{name} must hold S + 1 >= 1 boundaries, got shape {C.shape_of(cu)}")
    if C.host_checks_enabled(validate):
        host = cu.tolist()
        if host[0] != 0 or host[-1] != total or any(b < a for a, b in zip(host, host[1:])):
            shown = host if len(host) <= 16 else [*host[:8], "...", *host[-8:]]
            raise ValueError(
                f"{name} must be non-decreasing from 0 to {total_what} = {total}, got {shown} "
                f"({name} shape {C.shape_of(cu)})"
            )
    return cu.shape[0] - 1


def _check_bank(prompts: Tensor, S: int, prompt_index, prompt_lens) -> None:
    C.tensor("prompts", prompts, 3, layout="[T, P, H]")
    T, P, _ = prompts.shape
    C.bank_index("prompt_index", prompt_index, S, T, f"prompts {C.shape_of(prompts)} (rows = sequences)", True)
    C.lengths("prompt_lens", prompt_lens, T, P, f"prompt length P = {P}", True)


def _resolve_out(cu_seqlens: Tensor, prompts: Tensor, prompt_index, prompt_lens, cu_seqlens_out, total_out,
                 num_tokens: int, validate: bool) -> tuple[Tensor, int]:
    """(cu_seqlens_out, total_out): computed when not given; checked against the computed ones when validating."""
    if cu_seqlens_out is None:
        cu_seqlens_out = soft_prompt_varlen_cu_seqlens(
            cu_seqlens, prompts, prompt_index=prompt_index, prompt_lens=prompt_lens)
    elif validate:
        C.tensor("cu_seqlens_out", cu_seqlens_out, 1, (torch.int32,), f"[{cu_seqlens.shape[0]}]")
        C.dim_equal("cu_seqlens_out.shape[0]", cu_seqlens_out.shape[0], cu_seqlens.shape[0],
                    f"one boundary per cu_seqlens entry (cu_seqlens {C.shape_of(cu_seqlens)})")
        C.same_device("cu_seqlens", cu_seqlens, cu_seqlens_out=cu_seqlens_out)
        if C.host_checks_enabled(True):
            computed = soft_prompt_varlen_cu_seqlens(
                cu_seqlens, prompts, prompt_index=prompt_index, prompt_lens=prompt_lens)
            if not torch.equal(computed, cu_seqlens_out):
                raise ValueError(
                    f"cu_seqlens_out {cu_seqlens_out.tolist()} does not match cu_seqlens {cu_seqlens.tolist()} plus "
                    f"each sequence's prompt length: expected {computed.tolist()} (prompts {C.shape_of(prompts)})"
                )
    if total_out is None:
        return cu_seqlens_out, int(cu_seqlens_out[-1])
    if validate:
        if not isinstance(total_out, (int, torch.SymInt)) or isinstance(total_out, bool) or total_out < num_tokens:
            raise ValueError(
                f"total_out must be an int >= N = {num_tokens} (the packed token count), got {total_out!r}")
        if C.host_checks_enabled(True) and int(cu_seqlens_out[-1]) != total_out:
            raise ValueError(
                f"total_out = {total_out} but cu_seqlens_out[-1] = {int(cu_seqlens_out[-1])}: they must match")
    return cu_seqlens_out, total_out


# --------------------------------------------------------------------------- public API


def soft_prompt_varlen_cu_seqlens(
    cu_seqlens: Tensor,
    prompts_or_P: Union[Tensor, int],
    *,
    prompt_index: Optional[Tensor] = None,
    prompt_lens: Optional[Tensor] = None,
) -> Tensor:
    """The sequence boundaries of a packed soft-prompt op's output, computed on the device (no host sync).

    Shapes: cu_seqlens [S + 1] int32; prompts_or_P the bank prompts [T, P, H] or its prompt length
    P (an int); prompt_index [S] int32/int64 or None; prompt_lens [T] or None. Returns [S + 1] int32.

    Semantics: cu_seqlens_out[s + 1] = cu_seqlens[s + 1] + sum over s' <= s of sequence s'
    prompt length: prompt_lens[t] (P without prompt_lens) for its entry t, 0 for -1. With
    prompt_index None the bank holds 1 entry (shared) or one per sequence (T is prompts.shape[0], or
    prompt_lens.shape[0] when P is given as an int). Only shapes are checked.
    """
    C.tensor("cu_seqlens", cu_seqlens, 1, (torch.int32,), "[S + 1]")
    S = cu_seqlens.shape[0] - 1
    if S < 0:
        raise ValueError(f"cu_seqlens must hold S + 1 >= 1 boundaries, got shape {C.shape_of(cu_seqlens)}")
    if isinstance(prompts_or_P, Tensor):
        C.tensor("prompts", prompts_or_P, 3, layout="[T, P, H]")
        T, P = prompts_or_P.shape[0], prompts_or_P.shape[1]
    elif isinstance(prompts_or_P, int) and not isinstance(prompts_or_P, bool) and prompts_or_P >= 0:
        P = prompts_or_P
        T = prompt_lens.shape[0] if isinstance(prompt_lens, Tensor) and prompt_lens.dim() == 1 else None
    else:
        raise TypeError(f"prompts_or_P must be the prompts [T, P, H] or a non-negative int P, got {prompts_or_P!r}")
    device = cu_seqlens.device
    C.same_device("cu_seqlens", cu_seqlens, prompt_index=prompt_index, prompt_lens=prompt_lens)
    if prompt_index is not None:
        C.tensor("prompt_index", prompt_index, 1, C.INDEX_DTYPES, f"[{S}]")
        C.dim_equal("prompt_index.shape[0]", prompt_index.shape[0], S,
                    f"one entry per sequence (cu_seqlens {C.shape_of(cu_seqlens)})")
    if prompt_lens is not None:
        C.tensor("prompt_lens", prompt_lens, 1, C.INDEX_DTYPES, "[T]")
        if T is not None:
            C.dim_equal("prompt_lens.shape[0]", prompt_lens.shape[0], T, "one length per bank entry")
    if prompt_index is not None:
        has = prompt_index >= 0
        if prompt_lens is None:
            plen = has.to(torch.int32) * P
        else:
            entry = prompt_index.clamp(min=0) if prompt_lens.shape[0] else torch.zeros_like(prompt_index)
            lens = prompt_lens if prompt_lens.shape[0] else prompt_lens.new_zeros(1)
            plen = torch.where(has, lens[entry], 0)
    else:
        if T is not None and T not in (1, S):
            raise ValueError(
                f"prompt_index=None needs the bank to hold 1 entry or one per sequence, but it has {T} entries "
                f"for S = {S} sequences (cu_seqlens {C.shape_of(cu_seqlens)}): pass prompt_index [{S}]"
            )
        if prompt_lens is None:
            plen = torch.full((S,), P, dtype=torch.int32, device=device)
        else:
            plen = prompt_lens.expand(S) if prompt_lens.shape[0] == 1 else prompt_lens
    shift = torch.cumsum(plen.to(torch.int32), 0, dtype=torch.int32)
    return cu_seqlens + torch.cat([shift.new_zeros(1), shift])


def soft_prompt_embed_varlen(
    input_ids: Tensor,
    weight: Tensor,
    prompts: Tensor,
    *,
    cu_seqlens: Tensor,
    prompt_index: Optional[Tensor] = None,
    prompt_lens: Optional[Tensor] = None,
    cu_seqlens_out: Optional[Tensor] = None,
    total_out: Optional[int] = None,
    validate: bool = True,
) -> Tensor:
    """Embed packed tokens and put each sequence's soft prompt in front of it, in one pass.

    Shapes: input_ids [N] int32/int64 (S sequences back to back); weight [V, H] (the word
    embedding); prompts [T, P, H] (weight's dtype); cu_seqlens [S + 1] int32; prompt_index [S]
    int32/int64 or None; prompt_lens [T] or None (each <= P, default P); cu_seqlens_out [S + 1]
    int32 or None. Returns [total_out, H] in weight's dtype, total_out = N + the prompt rows.

    Semantics: output sequence s (rows cu_seqlens_out[s]..cu_seqlens_out[s + 1]) is
    prompts[t, :prompt_lens[t]] followed by weight[input_ids[cu_seqlens[s]:cu_seqlens[s + 1]]], t =
    s's entry (-1: the tokens alone). Every output row is written once, straight from its source.
    cu_seqlens_out is computed on the device when not given (``soft_prompt_varlen_cu_seqlens``);
    total_out costs one host read when not given (pass both under CUDA graphs / torch.compile).
    ``validate=True`` checks shapes, dtypes, devices, boundaries, ids and index ranges on the host
    (a GPU sync); ``validate=False`` trusts the caller. Backward gives dprompts (summed over the
    sequences using each entry) and dweight (only when weight requires grad).
    """
    if validate:
        C.tensor("input_ids", input_ids, 1, C.INDEX_DTYPES, "[N]")
        C.tensor("weight", weight, 2, layout="[V, H]")
        C.same_device("weight", weight, input_ids=input_ids, cu_seqlens=cu_seqlens)
        S = _check_cu_seqlens("cu_seqlens", cu_seqlens, input_ids.shape[0], "N = input_ids.shape[0]", True)
        _check_bank(prompts, S, prompt_index, prompt_lens)
        C.dim_equal("prompts.shape[2] (H)", prompts.shape[2], weight.shape[1],
                    f"prompts {C.shape_of(prompts)} vs weight {C.shape_of(weight)}")
        C.same_dtype("weight", weight, prompts=prompts)
        C.same_device("weight", weight, prompts=prompts, prompt_index=prompt_index, prompt_lens=prompt_lens)
        _check_token_ids(input_ids, weight)
    cu_seqlens_out, total_out = _resolve_out(cu_seqlens, prompts, prompt_index, prompt_lens, cu_seqlens_out,
                                             total_out, input_ids.shape[0], validate)
    args = (input_ids, weight, prompts, cu_seqlens, cu_seqlens_out, total_out, prompt_index, prompt_lens)
    return call("soft_prompt_embed_varlen", _embed_autograd, args, weight.device, (weight, prompts))


def soft_prompt_concat_varlen(
    embeds: Tensor,
    prompts: Tensor,
    *,
    cu_seqlens: Tensor,
    prompt_index: Optional[Tensor] = None,
    prompt_lens: Optional[Tensor] = None,
    cu_seqlens_out: Optional[Tensor] = None,
    total_out: Optional[int] = None,
    validate: bool = True,
) -> Tensor:
    """Put each packed sequence's soft prompt in front of its already-embedded tokens, in one pass.

    Shapes: embeds [N, H] (S sequences back to back; rows may be strided, the last dim must be
    unit-stride or it is copied); prompts [T, P, H] (embeds' dtype); cu_seqlens [S + 1] int32;
    prompt_index [S] or None; prompt_lens [T] or None; cu_seqlens_out [S + 1] int32 or None.
    Returns [total_out, H] in embeds' dtype.

    Semantics: output sequence s is prompts[t, :prompt_lens[t]] followed by
    embeds[cu_seqlens[s]:cu_seqlens[s + 1]] (t = s's entry; -1: the tokens alone); cu_seqlens_out,
    total_out and ``validate`` as in ``soft_prompt_embed_varlen``. Backward gives dembeds (a gather
    of the token rows) and dprompts (summed over the sequences using each entry, in order).
    """
    if validate:
        C.tensor("embeds", embeds, 2, layout="[N, H]")
        C.same_device("embeds", embeds, cu_seqlens=cu_seqlens)
        S = _check_cu_seqlens("cu_seqlens", cu_seqlens, embeds.shape[0], "N = embeds.shape[0]", True)
        _check_bank(prompts, S, prompt_index, prompt_lens)
        C.dim_equal("prompts.shape[2] (H)", prompts.shape[2], embeds.shape[1],
                    f"prompts {C.shape_of(prompts)} vs embeds {C.shape_of(embeds)}")
        C.same_dtype("embeds", embeds, prompts=prompts)
        C.same_device("embeds", embeds, prompts=prompts, prompt_index=prompt_index, prompt_lens=prompt_lens)
    cu_seqlens_out, total_out = _resolve_out(cu_seqlens, prompts, prompt_index, prompt_lens, cu_seqlens_out,
                                             total_out, embeds.shape[0], validate)
    args = (embeds, prompts, cu_seqlens, cu_seqlens_out, total_out, prompt_index, prompt_lens)
    return call("soft_prompt_concat_varlen", _concat_autograd, args, embeds.device, (embeds, prompts))
