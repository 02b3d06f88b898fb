"""Adapters on a tensor-parallel base (transformers ``tp_plan``: DTensor weights on a 1-D mesh).

LoRA banks are sharded the S-LoRA way. Column-parallel base (weight ``Shard(0)``; input
replicated, output this rank's features): B is sharded by output rows, A replicated, and the
forward needs no communication (in training the rank-space gradient, R numbers per token, is
all-reduced). Row-parallel base (weight ``Shard(1)``; input this rank's features, output
all-reduced): A is sharded by input columns, B replicated, and the rank-space partial sums
``x_r @ A_r^T`` (R numbers per token, not H) are all-reduced before B. Prefix banks keep the KV
heads of this rank's attention (:func:`kv_head_slice`). Importing this module registers both
rules with the method layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard

from ..methods import lora as lora_method
from ..methods import prefix_tuning
from ..ops import lora_expand, lora_shrink
from ..ops.multi_lora import multi_lora_rows


def shard_range(size: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank ``rank``'s part of a dim of ``size`` sharded over ``world`` ranks
    (DTensor's ``Shard``: chunks of ceil(size / world), the last ones shorter or empty)."""
    chunk = math.ceil(size / world)
    start = min(rank * chunk, size)
    return start, min(start + chunk, size)


class _SumRanks(torch.autograd.Function):
    """Forward: the sum of every rank's partial tensor; backward: the (replicated) gradient as is."""

    @staticmethod
    def forward(ctx, partial: Tensor, group) -> Tensor:
        total = partial.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _SumGradRanks(torch.autograd.Function):
    """Forward: identity (a replicated tensor); backward: the sum of every rank's partial gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


@dataclass
class LoraSharding:
    """How one tensor-parallel linear layer's LoRA bank is split over the ranks.

    Semantics: ``style`` "colwise" (B sharded by output rows ``rows``) or "rowwise" (A sharded by
    input columns ``cols``); ``in_features`` / ``out_features`` are this rank's bank widths;
    ``forward`` is the layer's output (``base`` = this rank's base output) and is exact: the
    colwise forward is local, the rowwise one all-reduces [N, R] rank-space sums.
    """

    style: str
    full_in: int
    full_out: int
    start: int
    stop: int
    mesh: object

    @property
    def group(self):
        return self.mesh.get_group()

    @property
    def in_features(self) -> int:
        return self.stop - self.start if self.style == "rowwise" else self.full_in

    @property
    def out_features(self) -> int:
        return self.stop - self.start if self.style == "colwise" else self.full_out

    def shard(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """This rank's (A, B) of full A [..., r, in] and B [..., out, r] (slices, differentiable)."""
        if self.style == "colwise":
            return a, b[..., self.start:self.stop, :]
        return a[..., self.start:self.stop], b

    def local(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """This rank's (A, B) of weights that are full, DTensors sharded as this layer, or already local.

        Shapes: a [..., r, in or in_features], b [..., out or out_features, r]. Semantics: DTensors
        (PEFT shards its own LoRA weights on a tensor-parallel base) give their local part; plain
        full-width tensors are sliced as :meth:`shard`; plain local-width ones are kept.
        """
        a, b = (t.to_local() if isinstance(t, DTensor) else t for t in (a, b))
        if self.style == "colwise" and b.shape[-2] == self.full_out:
            b = b[..., self.start:self.stop, :]
        if self.style == "rowwise" and a.shape[-1] == self.full_in:
            a = a[..., self.start:self.stop]
        return a, b

    def gather(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """Full (A [r, in], B [out, r]) from this rank's parts (a collective: every rank calls it)."""
        if self.style == "colwise":
            return a, self._full(b, 0, (self.full_out, b.shape[1]))
        return self._full(a, 1, (a.shape[0], self.full_in)), b

    def _full(self, local: Tensor, dim: int, shape: tuple) -> Tensor:
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(local.contiguous(), self.mesh, [Shard(dim)], run_check=False, shape=shape,
                                  stride=stride).full_tensor()

    def forward(self, x: Tensor, lora_a: Tensor, lora_b: Tensor, index: Optional[Tensor], scaling: Tensor,
                ranks: Tensor, base: Tensor) -> Tensor:
        """Shapes: x [N, in_features], base [N, out_features] (this rank's widths); returns [N, out_features]."""
        if x.shape[-1] != lora_a.shape[2] or base.shape[-1] != lora_b.shape[1]:
            raise ValueError(f"tensor-parallel LoRA ({self.style}) expects x [N, {lora_a.shape[2]}] and a base output "
                             f"[N, {lora_b.shape[1]}], got {list(x.shape)} and {list(base.shape)}: a layer whose "
                             "output is gathered (or input replicated) by its parallel style is not supported")
        grad = torch.is_grad_enabled() and (x.requires_grad or lora_a.requires_grad or lora_b.requires_grad)
        if self.style == "colwise":
            if not grad:
                return multi_lora_rows(x, lora_a, lora_b, index, scaling, ranks, base)
            h = _SumGradRanks.apply(lora_shrink(x, lora_a, index, ranks=ranks, validate=False), self.group)
        else:
            h = lora_shrink(x, lora_a, index, ranks=ranks, validate=False)
            h = _SumRanks.apply(h, self.group) if grad else _sum_now(h, self.group)
        return lora_expand(h, lora_b, index, scaling, ranks=ranks, base=base, validate=False)


def _sum_now(h: Tensor, group) -> Tensor:
    dist.all_reduce(h, group=group)
    return h


def _sharded_weight(module: nn.Module) -> Optional[DTensor]:
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, DTensor) else None


def lora_sharding(base: nn.Module) -> Optional[LoraSharding]:
    """The :class:`LoraSharding` of a tensor-parallel ``nn.Linear`` (None when its weight is not a DTensor).

    Semantics: a 1-D mesh with weight ``Shard(0)`` is column-parallel, ``Shard(1)`` row-parallel;
    anything else (replicated, 2-D meshes, packed layouts) raises ValueError naming the placement.
    """
    weight = _sharded_weight(base)
    if weight is None:
        return None
    if not isinstance(base, nn.Linear):
        raise ValueError(f"tensor-parallel LoRA shards nn.Linear layers, got {type(base).__name__}")
    mesh = weight.device_mesh
    placements = tuple(weight.placements)
    if mesh.ndim != 1 or len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim not in (0, 1):
        raise ValueError(f"tensor-parallel LoRA supports weights sharded Shard(0) or Shard(1) on a 1-D mesh, got "
                         f"{placements} on a {mesh.ndim}-D mesh")
    style = "colwise" if placements[0].dim == 0 else "rowwise"
    size = base.out_features if style == "colwise" else base.in_features
    start, stop = shard_range(size, mesh.get_local_rank(), mesh.size())
    local = weight.to_local().shape[placements[0].dim]
    if stop - start != local:
        raise ValueError(f"{style} weight holds {local} of {size} features on this rank, expected {stop - start}")
    return LoraSharding(style, base.in_features, base.out_features, start, stop, mesh)


def kv_head_slice(model: nn.Module) -> Optional[slice]:
    """The KV heads this rank's attention holds in a tensor-parallel model (None: all of them).

    Semantics: read from the first attention layer's ``k_proj``: sharded ``Shard(0)`` by whole
    heads, rank r holds heads [start, stop); prefixes then keep only those heads.
    """
    for module in model.modules():
        k_proj = getattr(module, "k_proj", None)
        if k_proj is None:
            continue
        while isinstance(getattr(k_proj, "base", None), nn.Module) or isinstance(getattr(k_proj, "base_layer", None),
                                                                                 nn.Module):
            k_proj = getattr(k_proj, "base", None) or k_proj.base_layer  # inside a LoRA wrapper (ours or PEFT's)
        weight = _sharded_weight(k_proj)
        if weight is None:
            return None
        head_dim = getattr(module, "head_dim", None)
        if not isinstance(head_dim, int) or weight.placements[0] != Shard(0) or k_proj.out_features % head_dim:
            raise ValueError(f"prefixes on a tensor-parallel model need k_proj sharded Shard(0) by whole heads, got "
                             f"{weight.placements} with head_dim {head_dim}")
        mesh = weight.device_mesh
        start, stop = shard_range(k_proj.out_features, mesh.get_local_rank(), mesh.size())
        if start % head_dim or stop % head_dim:
            raise ValueError(f"k_proj rows [{start}, {stop}) of this rank split a head (head_dim {head_dim})")
        return slice(start // head_dim, stop // head_dim)
    return None


if lora_sharding not in lora_method.SHARDING_RULES:
    lora_method.SHARDING_RULES.append(lora_sharding)
if kv_head_slice not in prefix_tuning.KV_HEAD_RULES:
    prefix_tuning.KV_HEAD_RULES.append(kv_head_slice)
