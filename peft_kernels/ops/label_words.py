"""``label_word_logits``: a KPT verbalizer head, fused: gather + matmul + segmented reduce.

Class scores from sets of label words per class, read off a masked LM's output head at the
[MASK] position, with the full-vocabulary softmax normaliser computed by streaming over tiles
of the vocabulary: no ``[N, V]`` logits tensor is ever materialised, forward or backward.

Validation -> backend dispatch -> autograd registration, like ``multi_lora``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from . import _checks as C
from ._dispatch import call, register, register_autograd, register_native, select

AGGREGATES = ("mean", "weighted")


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("peft_kernels::label_word_logits", mutates_args=())
def _lw_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], word_ids: Tensor, class_offsets: Tensor,
           word_weights: Optional[Tensor], calibration: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    args = (hidden, weight, bias, word_ids, class_offsets, word_weights, calibration)
    return select("label_word_logits", hidden.device, *args)[1](*args)


@_lw_op.register_fake
def _(hidden, weight, bias, word_ids, class_offsets, word_weights, calibration):
    return _fake_forward(hidden, weight, bias, word_ids, class_offsets, word_weights, calibration)


def _fake_forward(hidden, weight, bias, word_ids, class_offsets, word_weights, calibration):
    N = hidden.shape[0]
    return hidden.new_empty(N, class_offsets.shape[0] - 1), hidden.new_empty(N, dtype=_lse_dtype(hidden.dtype))


@torch.library.custom_op("peft_kernels::label_word_logits_backward", mutates_args=())
def _lw_backward_op(grad_y: Tensor, grad_lse: Optional[Tensor], hidden: Tensor, weight: Tensor,
                    bias: Optional[Tensor], word_ids: Tensor, class_offsets: Tensor,
                    word_weights: Optional[Tensor], calibration: Optional[Tensor], lse: Tensor,
                    need_dweight: bool, need_dbias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    args = (grad_y, grad_lse, hidden, weight, bias, word_ids, class_offsets, word_weights, calibration, lse,
            need_dweight, need_dbias)
    return select("label_word_logits_backward", hidden.device, *args)[1](*args)


@_lw_backward_op.register_fake
def _(grad_y, grad_lse, hidden, weight, bias, word_ids, class_offsets, word_weights, calibration, lse,
      need_dweight, need_dbias):
    return _fake_backward(grad_y, grad_lse, hidden, weight, bias, word_ids, class_offsets, word_weights,
                          calibration, lse, need_dweight, need_dbias)


def _fake_backward(grad_y, grad_lse, hidden, weight, bias, word_ids, class_offsets, word_weights, calibration,
                   lse, need_dweight, need_dbias):
    V, H = weight.shape
    dweight = weight.new_empty(V if need_dweight else 0, H)
    dbias = (bias.new_empty(V) if need_dbias and bias is not None else hidden.new_empty(0))
    dww = hidden.new_empty(0) if word_weights is None else torch.empty_like(word_weights)
    return torch.empty_like(hidden), dweight, dbias, dww


def _setup(ctx, inputs, output):
    hidden, weight, bias, word_ids, class_offsets, word_weights, calibration = inputs
    ctx.save_for_backward(hidden, weight, bias, word_ids, class_offsets, word_weights, calibration, output[1])


def _backward(ctx, grad_y, grad_lse):
    hidden, weight, bias, word_ids, class_offsets, word_weights, calibration, lse = ctx.saved_tensors
    if grad_y is None:
        grad_y = hidden.new_zeros(hidden.shape[0], class_offsets.shape[0] - 1)
    need = ctx.needs_input_grad
    dh, dw, db, dww = _lw_backward_op(
        grad_y.contiguous(), grad_lse, hidden, weight, bias, word_ids, class_offsets, word_weights, calibration,
        lse, bool(need[1]), bool(need[2]))
    return (dh if need[0] else None, dw if need[1] else None, db if need[2] else None, None, None,
            dww if need[5] else None, None)


register_autograd(_lw_op, _backward, _setup)

register("label_word_logits", "reference", reference.label_word_logits)
register("label_word_logits_backward", "reference", reference.label_word_logits_backward)
register_native("label_word_logits", "label_word_logits_fwd")
register_native("label_word_logits_backward", "label_word_logits_bwd")


def _register_native_fakes() -> None:
    """Shape functions of the compiled ops, for torch.compile and opcheck."""
    for name, fn in (("label_word_logits_fwd", _fake_forward), ("label_word_logits_bwd", _fake_backward)):
        qualified = f"peft_kernels::{name}"
        if hasattr(torch.ops.peft_kernels, name) and not torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "Meta"):
            torch.library.register_fake(qualified, fn)


_register_native_fakes()


def label_word_logits(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    word_ids: Tensor,
    class_offsets: Tensor,
    *,
    word_weights: Optional[Tensor] = None,
    calibration: Optional[Tensor] = None,
    aggregate: str = "mean",
    validate: bool = True,
) -> Tensor:
    """Class scores of a knowledgeable (KPT) verbalizer at the mask, without the ``[N, V]`` logits.

    Shapes: hidden [N, H] (the MLM head's transformed hidden state at each mask); weight [V, H]
    and bias [V] or None (the head's decoder); word_ids [W] int32/int64 (label-word token ids,
    grouped by class); class_offsets [C+1] int32/int64 (class c owns word_ids[class_offsets[c]:
    class_offsets[c+1]]: offsets start at 0, end at W, and no class is empty); word_weights [W]
    float or None; calibration [W] float (positive) or None. Returns [N, C] in hidden's dtype.

    Semantics: z[n, v] = hidden[n] . weight[v] + bias[v] (fp32 accumulation, fp64 for fp64);
    p[n, w] = softmax_v(z[n])[word_ids[w]], the probability over the whole vocabulary (its
    normaliser is streamed over vocabulary tiles); calibration[w] is the word's prior (its mean
    probability at the mask over a support set) and divides p; the class score is the log of
    the aggregated probabilities: y[n, c] = log sum_{w in c} alpha_w p[n, w] / calibration[w] with
    alpha_w = 1/|c| (aggregate="mean": the mean probability, then the log) or
    alpha = softmax(word_weights[c's words]) (aggregate="weighted"). KPT's renormalisation of the
    calibrated probabilities over all label words adds the same constant to every class score of a
    row, so it is left out (softmax and argmax over classes are unchanged). Backward gives
    dhidden, dweight (the label-word rows plus the normaliser's dense part over all V rows, only
    when weight requires grad), dbias and dword_weights; word_ids, class_offsets and calibration
    are constants. ``validate=False`` skips every check (model code validates once).
    """
    if validate:
        _check(hidden, weight, bias, word_ids, class_offsets, word_weights, calibration, aggregate)
    elif aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    if aggregate == "mean":
        word_weights = None
    args = (hidden, weight, bias, word_ids, class_offsets, word_weights, calibration)
    return call("label_word_logits", _lw_op, args, hidden.device, (hidden, weight, bias, word_weights))[0]


def _check(hidden, weight, bias, word_ids, class_offsets, word_weights, calibration, aggregate) -> None:
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    C.tensor("hidden", hidden, 2, layout="[N, H]")
    C.tensor("weight", weight, 2, layout="[V, H]")
    V, H = weight.shape
    C.dim_equal("hidden.shape[1] (H)", hidden.shape[1], H, f"hidden {C.shape_of(hidden)} vs weight {C.shape_of(weight)}")
    if V == 0:
        raise ValueError(f"weight must hold at least one vocabulary row, got {C.shape_of(weight)}")
    if bias is not None:
        C.tensor("bias", bias, 1, layout="[V]")
        C.dim_equal("bias.shape[0] (V)", bias.shape[0], V, f"bias {C.shape_of(bias)} vs weight {C.shape_of(weight)}")
    C.same_dtype("hidden", hidden, weight=weight, bias=bias)
    C.tensor("word_ids", word_ids, 1, C.INDEX_DTYPES, "[W]")
    C.tensor("class_offsets", class_offsets, 1, C.INDEX_DTYPES, "[C+1]")
    W = word_ids.shape[0]
    if class_offsets.shape[0] < 2:
        raise ValueError(f"class_offsets must be [C+1] with C >= 1 classes, got {C.shape_of(class_offsets)}")
    if aggregate == "weighted":
        if word_weights is None:
            raise ValueError(f"aggregate='weighted' needs word_weights [W={W}], got None")
    elif word_weights is not None:
        raise ValueError(f"word_weights {C.shape_of(word_weights)} given with aggregate='mean': pass "
                         "aggregate='weighted' to use them")
    for name, t in (("word_weights", word_weights), ("calibration", calibration)):
        if t is not None:
            C.tensor(name, t, 1, layout="[W]")
            C.dim_equal(f"{name}.shape[0] (W)", t.shape[0], W, f"one per label word (word_ids {C.shape_of(word_ids)})")
    C.same_device("hidden", hidden, weight=weight, bias=bias, word_ids=word_ids, class_offsets=class_offsets,
                  word_weights=word_weights, calibration=calibration)
    if not C.host_checks_enabled(True):
        return
    offsets = class_offsets.tolist()
    if offsets[0] != 0 or offsets[-1] != W or any(b <= a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"class_offsets must rise strictly from 0 to W={W} (every class owns at least one "
                         f"label word), got {offsets} (class_offsets shape {C.shape_of(class_offsets)})")
    if W and (int(word_ids.min()) < 0 or int(word_ids.max()) >= V):
        raise ValueError(f"word_ids holds values in [{int(word_ids.min())}, {int(word_ids.max())}] but must be in "
                         f"[0, {V}) (weight {C.shape_of(weight)}; word_ids shape {C.shape_of(word_ids)})")
    if calibration is not None and W and not bool((calibration > 0).all()):
        raise ValueError(f"calibration must hold positive priors, got min {float(calibration.min())} "
                         f"(calibration shape {C.shape_of(calibration)})")
