"""Selective fine-tuning: BitFit, LayerNorm tuning and head tuning (no kernels: plain parameter freezing).

Each ``prepare_*`` freezes every parameter of the model, unfreezes the chosen ones, prints the
trainable count like PEFT's ``print_trainable_parameters`` (``verbose=True``) and returns the model
itself, which trains as usual:

- :func:`prepare_bitfit` (Ben Zaken et al. 2022): every ``bias`` parameter, plus the task head
  (``classifier`` / ``score`` modules) when ``train_head=True``, as in the paper. A model with no
  bias parameters at all (Llama, Mistral, ... use ``bias=False`` everywhere) raises a ValueError
  saying so; ``add_bias=True`` instead gives every ``nn.Linear`` without a bias (the output
  embeddings excepted) a zero-initialised bias first, so the model's outputs are unchanged until
  training moves them. Norms without a bias (RMSNorm) get none.
- :func:`prepare_layernorm_tuning` (Zhao et al. 2023): the direct parameters (weight, and bias if
  any) of every normalisation module: ``nn.LayerNorm`` / ``nn.RMSNorm`` / ``nn.GroupNorm``, or any
  module whose class name contains ``"Norm"`` (``LlamaRMSNorm``, T5's ``T5LayerNorm``, ...), plus
  the task head when ``train_head=True``.
- :func:`prepare_head_tuning` (linear probing): only the head. Found as the ``classifier`` /
  ``score`` modules, else ``get_output_embeddings()``; or the modules named in ``head_modules``.
  An LM head tied to the input embeddings is one tensor: training it trains the embeddings too.

The task head of BitFit / LayerNorm tuning means the freshly initialised ``classifier`` / ``score``
modules of ``*ForSequenceClassification``-style models only: a language model's output
embeddings are pretrained and stay frozen.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import torch
from torch import nn

HEAD_NAMES = ("classifier", "score")
NORM_TYPES = (nn.LayerNorm, nn.GroupNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def trainable_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts of ``module``; tied parameters are counted once."""
    trainable = total = 0
    for p in module.parameters():  # a tied (shared) tensor is yielded once
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def trainable_summary(module: nn.Module) -> str:
    """``"trainable params: N || all params: M || trainable%: x"`` (PEFT's format)."""
    trainable, total = trainable_parameters(module)
    return (f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}")


def print_trainable_parameters(module: nn.Module) -> None:
    print(trainable_summary(module))


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def _output_head(model: nn.Module) -> Optional[nn.Module]:
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None


def task_heads(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` of the task heads: modules named ``classifier`` or ``score`` (outermost only)."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if name.rpartition(".")[2] in HEAD_NAMES and any(True for _ in module.parameters()):
            if not any(name.startswith(outer + ".") for outer in found):
                found[name] = module
    return found


def find_heads(model: nn.Module, names: Union[None, str, Sequence[str]] = None) -> dict[str, nn.Module]:
    """The head to tune: the modules ``names`` (exact names), else the task heads, else the output embeddings.

    Raises ValueError when a named module does not exist or no head is found.
    """
    if names is not None:
        names = [names] if isinstance(names, str) else list(names)
        found = {}
        for name in names:
            try:
                found[name] = model.get_submodule(name)
            except AttributeError as exc:
                raise ValueError(f"head module {name!r} is not in {type(model).__name__}") from exc
        return found
    found = task_heads(model)
    if found:
        return found
    head = _output_head(model)
    if head is not None:
        for name, module in model.named_modules():
            if module is head:
                return {name: module}
    raise ValueError(f"cannot find a head in {type(model).__name__}: no 'classifier' or 'score' module and no "
                     "get_output_embeddings(); pass head_modules=[...] (module names)")


def bias_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{name: parameter}`` of every parameter whose own name is ``bias`` (or ends in ``_bias``)."""
    return {name: p for name, p in model.named_parameters()
            if name.rpartition(".")[2] == "bias" or name.endswith("_bias")}


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, NORM_TYPES) or "Norm" in type(module).__name__


def norm_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` of every normalisation module that holds parameters of its own."""
    return {name: m for name, m in model.named_modules()
            if is_norm(m) and any(True for _ in m.parameters(recurse=False))}


@torch.no_grad()
def add_zero_biases(model: nn.Module) -> list[str]:
    """Give every ``nn.Linear`` without a bias (except the output embeddings) a zero bias; returns their names."""
    head = _output_head(model)
    added = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.bias is None and module is not head:
            w = module.weight
            module.bias = nn.Parameter(torch.zeros(module.out_features, dtype=w.dtype, device=w.device))
            added.append(name)
    return added


def _finish(model: nn.Module, params: Iterable[nn.Parameter], verbose: bool) -> nn.Module:
    freeze(model)
    for p in params:
        p.requires_grad_(True)
    if verbose:
        print_trainable_parameters(model)
    return model


def _head_params(model: nn.Module, train_head: bool) -> list[nn.Parameter]:
    return [p for m in task_heads(model).values() for p in m.parameters()] if train_head else []


def prepare_bitfit(model: nn.Module, *, add_bias: bool = False, train_head: bool = True,
                   verbose: bool = True) -> nn.Module:
    """BitFit: train the bias terms only (and the task head); returns ``model``, frozen otherwise.

    Raises ValueError when the model has no bias parameter and ``add_bias`` is False.
    """
    biases = bias_parameters(model)
    if not biases:
        if not add_bias:
            raise ValueError(
                f"BitFit trains bias terms, but {type(model).__name__} has no bias parameters (its linear layers and "
                "norms are built with bias=False, as in Llama-style models): nothing would train. Use LayerNorm "
                "tuning, LoRA or bottleneck adapters instead, or pass add_bias=True (BitFitConfig(add_bias=True)) to "
                "add zero-initialised biases to every nn.Linear (outputs unchanged at the start) and train those")
        add_zero_biases(model)
        biases = bias_parameters(model)
    return _finish(model, [*biases.values(), *_head_params(model, train_head)], verbose)


def prepare_layernorm_tuning(model: nn.Module, *, train_head: bool = True, verbose: bool = True) -> nn.Module:
    """LayerNorm tuning: train every norm's weight/bias (and the task head); returns ``model``."""
    norms = norm_modules(model)
    if not norms:
        raise ValueError(f"{type(model).__name__} has no normalisation module with parameters (looked for "
                         "nn.LayerNorm / RMSNorm / GroupNorm and classes named *Norm*)")
    params = [p for m in norms.values() for p in m.parameters(recurse=False)]
    return _finish(model, [*params, *_head_params(model, train_head)], verbose)


def prepare_head_tuning(model: nn.Module, *, head_modules: Union[None, str, Sequence[str]] = None,
                        verbose: bool = True) -> nn.Module:
    """Head tuning (linear probing): train only the head (see :func:`find_heads`); returns ``model``."""
    heads = find_heads(model, head_modules)
    return _finish(model, [p for m in heads.values() for p in m.parameters()], verbose)


def transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, blocks) of the model's stack of transformer blocks: the longest ``nn.ModuleList`` whose
    entries are all of one class (``model.layers``, ``transformer.h``, ``encoder.layer``, ...).

    Raises ValueError when the model has none.
    """
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}: no nn.ModuleList of "
                         "identical blocks")
    return best


def prepare_topk_layers(model: nn.Module, k: int, *, train_head: bool = True, verbose: bool = True) -> nn.Module:
    """Top-k layer tuning: train only the last ``k`` transformer blocks (and the head); returns ``model``.

    Semantics: blocks from :func:`transformer_blocks`; ``train_head`` trains the task head
    (``classifier`` / ``score``), else the output embeddings (:func:`find_heads`: a head tied to the
    input embeddings trains both). Norms after the last block stay frozen.
    """
    name, blocks = transformer_blocks(model)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(blocks):
        raise ValueError(f"k={k!r}: choose 1 <= k <= {len(blocks)} (the blocks of {type(model).__name__}.{name})")
    params = [p for block in list(blocks)[-k:] for p in block.parameters()]
    if train_head:
        params += [p for m in find_heads(model).values() for p in m.parameters()]
    return _finish(model, params, verbose)
