"""Data-parallel training of a :class:`~peft_kernels.MultiAdapterModel`'s adapters (DDP or FSDP2).

The base model is frozen and replicated on every rank; only the trainable adapter tensors
(LoRA banks, prefix encoders, soft prompts) are wrapped, so only their gradients travel.
:class:`TokenLoss` scales each rank's loss so that the ranks' averaged gradients are exactly the
gradient of the union batch's mean token loss, however the tokens are spread over the ranks.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..multi_adapter import MultiAdapterModel

IGNORE_INDEX = -100


def world(group=None) -> tuple[int, int]:
    """(rank, world size) in ``group``; (0, 1) when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def label_tokens(labels: Tensor, group=None) -> Tensor:
    """Number of predicted tokens (shifted labels != -100) over every rank of ``group`` (an int64 scalar).

    Shapes: labels [B, L]. Semantics: one all-reduce of one number when distributed.
    """
    count = (labels[:, 1:] != IGNORE_INDEX).sum().to(torch.int64)
    if world(group)[1] > 1:
        dist.all_reduce(count, group=group)
    return count


def token_loss(logits: Tensor, labels: Tensor, total_tokens: Union[int, Tensor], world_size: int) -> Tensor:
    """This rank's share of the union batch's mean next-token loss, scaled for gradient averaging.

    Shapes: logits [B, L, V]; labels [B, L] (-100 = not a target); total_tokens: predicted tokens
    of the whole union batch. Returns a scalar.
    Semantics: ``world_size * sum(token losses here) / total_tokens``: DDP and FSDP2 average
    gradients over the ranks, so the averaged gradient is that of ``sum(all token losses) /
    total_tokens``, the union batch's mean (in one process: world_size 1, the plain mean).
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {list(logits.shape)} and labels {list(labels.shape)} must share [B, L]")
    total = torch.as_tensor(total_tokens, device=logits.device).clamp(min=1)
    summed = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                             ignore_index=IGNORE_INDEX, reduction="sum")
    return summed * world_size / total


class TokenLoss(nn.Module):
    """A :class:`MultiAdapterModel` plus its loss: the module DDP / FSDP2 wrap.

    Shapes: forward(input_ids [B, L], attention_mask [B, L] or None, labels [B, L],
    adapter_names [B]) -> scalar loss.
    Semantics: :func:`token_loss` of the model's logits, with the union batch's token count
    all-reduced over ``group`` (one number per step); in one process it is the batch's mean
    token loss.
    """

    def __init__(self, model: MultiAdapterModel, group=None):
        super().__init__()
        if not isinstance(model, MultiAdapterModel):
            raise TypeError(f"TokenLoss wraps a MultiAdapterModel, got {type(model).__name__}")
        self.model = model
        self.group = group

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor], labels: Tensor,
                adapter_names: Sequence[Optional[str]]) -> Tensor:
        logits = self.model(input_ids, attention_mask=attention_mask, adapter_names=list(adapter_names)).logits
        return token_loss(logits, labels, label_tokens(labels, self.group), world(self.group)[1])


def trainable(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``module`` that require grad (the adapters', when the base is frozen)."""
    return [p for p in module.parameters() if p.requires_grad]


def frozen(module: nn.Module) -> set[nn.Parameter]:
    """The parameters of ``module`` that do not require grad (the frozen base model)."""
    return {p for p in module.parameters() if not p.requires_grad}


@torch.no_grad()
def broadcast_trainable(module: nn.Module, src: int = 0, group=None) -> int:
    """Copy every trainable parameter from rank ``src`` to the other ranks; returns the bytes sent per rank.

    Semantics: the frozen base is not touched (every rank loads the same checkpoint), so starting
    a run costs the adapters' size, not the model's.
    """
    sent = 0
    if world(group)[1] == 1:
        return sent
    for p in trainable(module):
        dist.broadcast(p.data, src=src, group=group)
        sent += p.numel() * p.element_size()
    return sent


def ddp(model: MultiAdapterModel, group=None, **kwargs) -> nn.parallel.DistributedDataParallel:
    """``DistributedDataParallel(TokenLoss(model))`` that communicates only the adapters.

    Semantics: DDP buckets only parameters that require grad, so the frozen base is never
    reduced; buffers (LoRA ranks and scalings, rotary tables) are not re-broadcast each step and
    the construction-time sync is replaced by :func:`broadcast_trainable`; a rank whose rows do
    not use some adapter contributes zeros for it (``find_unused_parameters``), so each adapter's
    gradient is the sum over its own rows on every rank. Other DDP keyword arguments pass through.
    """
    if not trainable(model):
        raise ValueError("the model has no trainable parameters: add or load adapters before wrapping it")
    wrapped = TokenLoss(model, group)
    broadcast_trainable(wrapped, group=group)
    options = dict(broadcast_buffers=False, init_sync=False, find_unused_parameters=True, process_group=group)
    options.update(kwargs)
    return nn.parallel.DistributedDataParallel(wrapped, **options)


def fsdp(model: MultiAdapterModel, mesh=None, **kwargs) -> nn.Module:
    """``fully_shard(TokenLoss(model))`` sharding only the adapters (FSDP2).

    Semantics: the frozen base is passed as ``ignored_params`` (replicated, never gathered or
    reduced); the adapter tensors are sharded over ``mesh`` (default: every rank, on the model's
    device type) along a dim that splits evenly (:func:`even_shard`), all-gathered for the forward and reduce-scattered after the
    backward, with zeros for adapters a rank's rows did not use. Other ``fully_shard`` keyword
    arguments pass through. Returns the wrapped :class:`TokenLoss` (an ``FSDPModule``).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not trainable(model):
        raise ValueError("the model has no trainable parameters: add or load adapters before wrapping it")
    wrapped = TokenLoss(model, None if mesh is None else mesh.get_group())
    if mesh is None:
        mesh = init_device_mesh(next(model.parameters()).device.type, (world()[1],))
    broadcast_trainable(wrapped, group=mesh.get_group())
    kwargs.setdefault("shard_placement_fn", even_shard(mesh.size()))
    fully_shard(wrapped, mesh=mesh, ignored_params=frozen(wrapped) | set(kwargs.pop("ignored_params", ())), **kwargs)
    wrapped.set_reduce_scatter_unused_params(True)
    return wrapped


def even_shard(world_size: int):
    """An FSDP2 ``shard_placement_fn``: shard each parameter on its largest dim that ``world_size``
    divides (dim 0 when none does: FSDP2 pads only dim 0).

    Semantics: a bank [T, R, H] with a few adapters T would be padded up to a multiple of the
    world size on dim 0 (a third more bytes for T = 3 on 2 ranks); an even dim moves no padding.
    """
    from torch.distributed.tensor import Shard

    def placement(param: nn.Parameter):
        even = [d for d in range(param.dim()) if param.shape[d] % world_size == 0]
        return Shard(max(even, key=lambda d: param.shape[d]) if even else 0)

    return placement


def unwrap(module: nn.Module) -> MultiAdapterModel:
    """The :class:`MultiAdapterModel` inside a :func:`ddp` / :func:`fsdp` wrapper (or the model itself)."""
    while not isinstance(module, MultiAdapterModel):
        inner = getattr(module, "module", None) or getattr(module, "model", None)
        if inner is None:
            raise TypeError(f"no MultiAdapterModel inside {type(module).__name__}")
        module = inner
    return module


@contextmanager
def full_adapters(wrapped: nn.Module) -> Iterator[MultiAdapterModel]:
    """The :class:`MultiAdapterModel` with whole (unsharded) adapter tensors inside the block.

    Semantics: for an FSDP2 wrapper every rank must enter (the adapters are all-gathered, and
    re-sharded on exit); for DDP or a plain model nothing moves.
    """
    from torch.distributed.fsdp import FSDPModule

    if isinstance(wrapped, FSDPModule):
        wrapped.unshard()
        try:
            yield unwrap(wrapped)
        finally:
            wrapped.reshard()
    else:
        yield unwrap(wrapped)


def save_adapters(wrapped: nn.Module, root: Union[str, os.PathLike], names: Optional[Iterable[str]] = None,
                  src: int = 0, group=None) -> list[str]:
    """Write each adapter as a PEFT directory ``root/<name>`` from rank ``src``; returns the names.

    Semantics: every rank calls it (FSDP2 gathers the shards first); only rank ``src`` writes
    (each directory atomically, as :meth:`MultiAdapterModel.save_adapter`), and every rank
    returns after the files exist (a barrier).
    """
    with full_adapters(wrapped) as model:
        chosen = list(model.adapters) if names is None else list(names)
        if world(group)[0] == src:
            for name in chosen:
                model.save_adapter(name, os.path.join(os.fspath(root), name))
    if world(group)[1] > 1:
        dist.barrier(group=group)
    return chosen
