"""LoRA with a bank of adapters per layer: one ``multi_lora`` call serves (and trains) a batch
whose rows use different adapters of different ranks.

:func:`apply_lora` swaps ``nn.Linear`` targets for :class:`LoraLinear`; every swapped layer
shares one :class:`AdapterRouting`, so adapter slots are the same in every layer and the
per-row adapter index is built (and validated) once per batch, not once per layer.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module_hooks

from ..ops.multi_lora import chosen_kernel, fused_linear_kernel, in_place_kernel, multi_lora_rows
from .selection import name_matches


class _Route:
    """One call's routing: the slot index, its per-token expansions (built once per length) and
    the LoRA kernel its layers run on (chosen by the first layer: ``multi_lora_rows``' memo).
    ``eager`` = (rows, dtype, on CUDA, kernel, its in-place form or None, its fused-linear form or None)
    once a layer's rows went straight to a kernel (no autograd): later layers with such rows call it
    directly."""

    __slots__ = ("index", "per_token", "kernels", "eager")

    def __init__(self, index: Optional[Tensor]):
        self.index = index
        self.per_token: dict[int, Tensor] = {}
        self.kernels: dict = {}
        self.eager: Optional[tuple] = None

    def eager_kernels(self, x2: Tensor, dtype: torch.dtype) -> Optional[tuple]:
        """(kernel, in-place form or None, fused-linear form or None) for rows ``x2`` [N, in] of bank
        dtype ``dtype``, when an earlier LoRA layer of this call ran such rows straight on that kernel;
        else None."""
        eager = self.eager
        if eager is not None and eager[0] == x2.shape[0] and eager[1] is dtype and eager[2] is x2.is_cuda:
            return eager[3:]
        return None


_NO_ROUTE = _Route(None)


class AdapterRouting:
    """Which adapter slot each row of the current call uses; shared by all LoRA layers of a model.

    Semantics: ``names`` fixes the slot order, the same in every layer; ``index`` [B] is the
    slot of each row of the current call (-1 = base model; None = adapters off, also outside
    any :meth:`use` block). The index lives in a ``contextvars.ContextVar``, so concurrent
    calls (threads, async tasks) each see their own. Whoever sets it builds it once per batch
    from known names, so the layers call the op with ``validate=False``.
    """

    def __init__(self):
        self.names: list[str] = []
        self._new_var()

    def _new_var(self) -> None:
        self._current: contextvars.ContextVar[_Route] = contextvars.ContextVar(
            f"peft_kernels_routing_{id(self)}", default=_NO_ROUTE)

    def __getstate__(self) -> dict:  # copies and pickles carry the slot order, never a call's routing
        return {"names": list(self.names)}

    def __setstate__(self, state: dict) -> None:
        self.names = state["names"]
        self._new_var()

    @property
    def index(self) -> Optional[Tensor]:
        return self._current.get().index

    def token_index(self, length: int) -> Tensor:
        """The row index repeated for each of ``length`` tokens ([B * length]), built once per
        call and length and shared by every layer (so kernels can reuse their sort of it)."""
        route = self._current.get()
        if length == 1:
            return route.index
        cached = route.per_token.get(length)
        if cached is None:
            B = route.index.shape[0]
            cached = route.per_token[length] = route.index[:, None].expand(B, length).reshape(B * length)
        return cached

    @contextlib.contextmanager
    def use(self, index: Optional[Tensor]) -> Iterator[None]:
        """Route every call inside the block with ``index`` ([B] slots, -1 none; None: adapters off)."""
        token = self._current.set(_Route(index))
        try:
            yield
        finally:
            self._current.reset(token)


def kaiming_uniform(rows: int, fan_in: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """``[rows, fan_in]`` drawn as ``nn.Linear`` initialises its weight (kaiming uniform, a=sqrt(5)),
    which is how PEFT initialises ``lora_A``."""
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(rows, fan_in).uniform_(-bound, bound, generator=generator)


# Rules that map a tensor-parallel base layer to its bank sharding (``peft_kernels.distributed``
# registers one for DTensor-sharded layers); each returns None for a layer it does not shard.
SHARDING_RULES: list = []


def lora_sharding(base: nn.Module):
    """The bank sharding of ``base`` from :data:`SHARDING_RULES` (None: an unsharded layer).

    Semantics: a sharding has ``in_features`` / ``out_features`` (this rank's bank widths),
    ``shard(a, b)`` (this rank's part of full [.., r, in] / [.., out, r] weights), ``gather(a, b)``
    (the full weights, a collective) and ``forward(x, lora_a, lora_b, index, scaling, ranks, base)``
    (the layer's output). A DTensor weight no rule takes is refused (its output is one rank's part).
    """
    for rule in SHARDING_RULES:
        sharding = rule(base)
        if sharding is not None:
            return sharding
    if type(getattr(base, "weight", None)).__name__ == "DTensor":
        raise TypeError(f"{type(base).__name__} has a tensor-parallel (DTensor) weight: import peft_kernels.distributed "
                        "so LoRA banks are sharded with it")
    return None


class LoraLinear(nn.Module):
    """``nn.Linear`` plus a bank of LoRA adapters, applied per row with ``multi_lora``.

    Shapes: lora_A [T, R, in_features], lora_B [T, out_features, R] (R = the largest rank),
    ranks [T] int32, scaling [T] fp32; forward x [..., in_features] -> [..., out_features].
    Semantics: y = base(x) + scaling[t] * dropout_t(x) @ A[t, :r]^T @ B[t, :, :r]^T with t the
    row's slot from the shared routing (rank 0 = this adapter does not target this layer).
    The bank is stored in the adapters' dtype (fp32 by default); x and base(x) are cast to it
    and the result back. ``merge(name)`` folds one adapter into the base weight. On a
    tensor-parallel base (:func:`lora_sharding`) the bank holds this rank's part only (S-LoRA:
    B by output rows for a column-parallel layer, A by input columns for a row-parallel one);
    ``weights`` then gathers the full tensors.
    """

    def __init__(self, base: nn.Linear, routing: AdapterRouting, dtype: torch.dtype = torch.float32):
        super().__init__()
        if not is_linear(base):
            raise TypeError(f"LoraLinear wraps nn.Linear or transformers' Conv1D, got {type(base).__name__}")
        self.base = base
        self.routing = routing
        self.sharding = lora_sharding(base)
        bank_in, bank_out = (self.in_features, self.out_features) if self.sharding is None else (
            self.sharding.in_features, self.sharding.out_features)
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.zeros(0, 0, bank_in, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(0, bank_out, 0, dtype=dtype, device=device))
        self.register_buffer("ranks", torch.zeros(0, dtype=torch.int32, device=device))
        self.register_buffer("scaling", torch.zeros(0, dtype=torch.float32, device=device))
        self.dropout: list[float] = []
        self.merged: Optional[str] = None

    @property
    def in_features(self) -> int:
        return linear_shape(self.base)[0]

    @property
    def out_features(self) -> int:
        return linear_shape(self.base)[1]

    def _rebuild(self, a: Tensor, b: Tensor) -> None:
        self.lora_A = nn.Parameter(a, requires_grad=self.lora_A.requires_grad)
        self.lora_B = nn.Parameter(b, requires_grad=self.lora_B.requires_grad)

    @torch.no_grad()
    def add_slot(self, a: Optional[Tensor], b: Optional[Tensor], scaling: float, dropout: float = 0.0) -> None:
        """Append one slot: ``a`` [r, in], ``b`` [out, r] (both None: rank 0, not targeted here)."""
        T, R = self.lora_A.shape[0], self.lora_A.shape[1]
        r = 0 if a is None else a.shape[0]
        if a is not None and (a.shape != (r, self.in_features) or b is None or b.shape != (self.out_features, r)):
            raise ValueError(f"adapter weights must be A [r, {self.in_features}] and B [{self.out_features}, r], got "
                             f"A {list(a.shape)} and B {None if b is None else list(b.shape)}")
        if r and self.sharding is not None:
            a, b = self.sharding.shard(a, b)
        R2 = max(R, r)
        new_a = self.lora_A.new_zeros(T + 1, R2, self.lora_A.shape[2])
        new_b = self.lora_B.new_zeros(T + 1, self.lora_B.shape[1], R2)
        new_a[:T, :R] = self.lora_A
        new_b[:T, :, :R] = self.lora_B
        if r:
            new_a[T, :r] = a.to(new_a)
            new_b[T, :, :r] = b.to(new_b)
        self._rebuild(new_a, new_b)
        self.ranks = torch.cat([self.ranks, self.ranks.new_tensor([r])])
        self.scaling = torch.cat([self.scaling, self.scaling.new_tensor([scaling if r else 0.0])])
        self.dropout.append(dropout)

    @torch.no_grad()
    def remove_slot(self, slot: int) -> None:
        keep = [t for t in range(self.lora_A.shape[0]) if t != slot]
        ranks = self.ranks[keep]
        R = int(ranks.max()) if len(keep) else 0
        self._rebuild(self.lora_A[keep, :R].clone(), self.lora_B[keep, :, :R].clone())
        self.ranks, self.scaling = ranks, self.scaling[keep]
        self.dropout = [self.dropout[t] for t in keep]

    def weights(self, slot: int) -> tuple[Tensor, Tensor]:
        """(A [r, in], B [out, r]) of one slot (views into the bank; gathered over the ranks when sharded)."""
        r = int(self.ranks[slot])
        a, b = self.lora_A[slot, :r], self.lora_B[slot, :, :r]
        return (a, b) if self.sharding is None else self.sharding.gather(a, b)

    def delta_weight(self, slot: int) -> Tensor:
        a, b = self.weights(slot)
        return (b.float() @ a.float()) * float(self.scaling[slot])

    def _base_delta(self, slot: int) -> Tensor:
        delta = self.delta_weight(slot)  # [out, in]; Conv1D stores its weight as [in, out]
        return (delta if isinstance(self.base, nn.Linear) else delta.T).to(self.base.weight.dtype)

    @torch.no_grad()
    def merge(self, slot: int, name: str) -> None:
        if self.merged is not None:
            raise ValueError(f"adapter {self.merged!r} is already merged; unmerge it first")
        if self.sharding is not None:
            raise ValueError("merging a LoRA adapter into a tensor-parallel base layer is not supported")
        self.base.weight += self._base_delta(slot)
        self.merged = name

    @torch.no_grad()
    def unmerge(self, slot: int) -> None:
        if self.merged is None:
            return
        self.base.weight -= self._base_delta(slot)
        self.merged = None

    def _row_dropout(self, x: Tensor, index: Tensor) -> Tensor:
        """Dropout on x [N, in] at each row's own adapter's rate (index [N])."""
        p = torch.tensor(self.dropout, device=x.device)[index.long().clamp(min=0)][:, None]
        keep = torch.rand_like(x) >= p
        return x * keep / (1 - p)

    def forward(self, x: Tensor) -> Tensor:
        # Called per layer and step: submodules, parameters and buffers are read from their dicts
        # (nn.Module.__getattr__ costs ~0.4 us each), and no-op casts and views by shape are skipped.
        base = self._modules["base"]
        route = self.routing._current.get()
        index = route.index
        lora_a = self._parameters["lora_A"]
        if index is None or lora_a.shape[0] == 0:
            return _base_forward(base, x)
        if (route.eager is not None and x.dtype is lora_a.dtype and self.merged is None and self.sharding is None
                and not self.training and _plain_linear(base)):
            # Inference after the call's first LoRA layer: base GEMM, then the LoRA term added into
            # its fresh output in place, on the kernel that layer chose.
            x2 = x.reshape(-1, x.shape[-1])
            kernels = route.eager_kernels(x2, x.dtype) if x2.shape[0] == index.shape[0] else None
            if kernels is not None:
                params, buffers = base._parameters, self._buffers
                weight = params["weight"]
                if kernels[2] is not None and weight.dtype is x.dtype:  # base GEMM and LoRA term in one pass
                    y2 = kernels[2](x2, weight, params["bias"], lora_a, self._parameters["lora_B"], index,
                                    buffers["scaling"], buffers["ranks"])
                    return y2.view(*x.shape[:-1], y2.shape[-1])
                y = nn.functional.linear(x, weight, params["bias"])
                args = (x2, lora_a, self._parameters["lora_B"], index, buffers["scaling"], buffers["ranks"],
                        y.view(-1, y.shape[-1]))
                if kernels[1] is not None:
                    kernels[1](*args)
                    return y
                return kernels[0](*args).view(y.shape)
        return self._forward(x, _base_forward(base, x), route, index, lora_a)

    def _forward(self, x: Tensor, y: Tensor, route: _Route, index: Tensor, lora_a: Tensor) -> Tensor:
        """``y`` (base(x)) plus the LoRA term of each row; the general path (autograd, sharding,
        dropout, casts, per-sequence indices) that also picks the call's kernel for ``route.eager``."""
        if self.merged is not None:
            raise RuntimeError(f"adapter {self.merged!r} is merged into this layer; unmerge before routing rows")
        dtype = lora_a.dtype
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        y2 = y if y.dim() == 2 else y.reshape(-1, y.shape[-1])
        if x2.dtype != dtype:
            x2 = x2.to(dtype)
        if y2.dtype != dtype:
            y2 = y2.to(dtype)
        if x2.shape[0] != index.shape[0]:  # one adapter per sequence: x [B, L, in], or flattened [B * L, in] (OPT)
            index = self.routing.token_index(x2.shape[0] // index.shape[0])
        if self.training and any(self.dropout):
            x2 = self._row_dropout(x2, index)
        buffers = self._buffers
        args = (x2, lora_a, self._parameters["lora_B"], index, buffers["scaling"], buffers["ranks"], y2)
        if self.sharding is not None:
            out = self.sharding.forward(*args)
        elif (kernels := route.eager_kernels(x2, dtype)) is not None:
            out = kernels[0](*args)
        else:
            out = multi_lora_rows(*args, kernels=route.kernels)
            kernel = chosen_kernel(route.kernels, x2)
            # A new row count (generate: the prefill, then each step) replaces the earlier choice.
            if kernel is not None and (route.eager is None or route.eager[0] != x2.shape[0]):
                route.eager = (x2.shape[0], dtype, x2.is_cuda, kernel, in_place_kernel(kernel),
                               fused_linear_kernel(kernel, x2))
        if out.dtype != y.dtype:
            out = out.to(y.dtype)
        return out if y.dim() == 2 else out.view(y.shape)


_GLOBAL_HOOKS = (_module_hooks._global_forward_pre_hooks, _module_hooks._global_forward_hooks,
                 _module_hooks._global_backward_pre_hooks, _module_hooks._global_backward_hooks)


def _base_forward(base: nn.Module, x: Tensor) -> Tensor:
    """``base(x)``; a plain ``nn.Linear`` (:func:`_plain_linear`) runs as ``F.linear``, without the
    module-call frames."""
    if _plain_linear(base):
        params = base._parameters
        return nn.functional.linear(x, params["weight"], params["bias"])
    return base(x)


def _plain_linear(base: nn.Module) -> bool:
    """Is ``base(x)`` exactly ``F.linear(x, weight, bias)``: a plain ``nn.Linear`` (no hooks, no forward of
    its own) with a plain tensor weight (not a tensor-parallel DTensor)?"""
    return (type(base) is nn.Linear and type(base._parameters["weight"]) is nn.Parameter
            and "forward" not in base.__dict__
            and not (base._forward_pre_hooks or base._forward_hooks or base._backward_pre_hooks
                     or base._backward_hooks or _GLOBAL_HOOKS[0] or _GLOBAL_HOOKS[1] or _GLOBAL_HOOKS[2]
                     or _GLOBAL_HOOKS[3]))


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear``, or transformers' ``Conv1D`` (GPT-2's linear layers, weight [in, out])."""
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf")
                                             and getattr(module, "weight", None) is not None)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear`` or ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.nf


def find_targets(model: nn.Module, target_modules: Union[str, Iterable[str]]) -> list[str]:
    """Names of the linear modules to adapt (plain ``nn.Linear`` or already a :class:`LoraLinear`).

    Semantics: linear layers are ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2), as PEFT's;
    ``"all-linear"`` = every linear layer except the output head (the module the
    model's ``get_output_embeddings`` returns); a list entry matches a module whose name equals
    it or ends with ``.`` + it (PEFT's rule); a plain string is a full-match regex.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    wrapped = {id(m.base) for m in model.modules() if isinstance(m, LoraLinear)}
    found = []
    for name, module in model.named_modules():
        if not (is_linear(module) or isinstance(module, LoraLinear)) or module is head or id(module) in wrapped:
            continue
        if target_modules == "all-linear" or name_matches(name, target_modules):
            found.append(name)
    return found


def apply_lora(model: nn.Module, target_modules: Union[str, Iterable[str]], routing: Optional[AdapterRouting] = None,
               dtype: torch.dtype = torch.float32) -> AdapterRouting:
    """Swap the target ``nn.Linear`` modules of ``model`` for :class:`LoraLinear`, in place.

    Semantics: already-swapped modules are kept; returns the shared routing. The base weights
    are untouched (the frozen path is the original module).
    """
    routing = routing or AdapterRouting()
    names = find_targets(model, target_modules)
    if not names:
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear in {type(model).__name__}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child)
        if not isinstance(module, LoraLinear):
            lora = LoraLinear(module, routing, dtype)
            for _ in routing.names:  # slots that exist already: rank 0 here
                lora.add_slot(None, None, 0.0)
            setattr(parent, child, lora)
    return routing


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """``{module name: LoraLinear}`` of a model (names as in the unwrapped model)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """LoRA's output scale: alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def stack_lora(a: Sequence[Tensor], b: Sequence[Tensor], dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Stack per-adapter LoRA weights into one bank.

    Shapes: a: T tensors [r_t, in]; b: T tensors [out, r_t]; returns (lora_a [T, R, in],
    lora_b [T, out, R], ranks [T] int32) with R = max r_t, zero padding beyond each rank.
    Semantics: differentiable w.r.t. every input (so a training step reaches each adapter).
    """
    dtype = dtype or a[0].dtype
    R = max(w.shape[0] for w in a)
    lora_a = torch.stack([nn.functional.pad(w.to(dtype), (0, 0, 0, R - w.shape[0])) for w in a])
    lora_b = torch.stack([nn.functional.pad(w.to(dtype), (0, R - w.shape[1])) for w in b])
    ranks = torch.tensor([w.shape[0] for w in a], dtype=torch.int32, device=lora_a.device)
    return lora_a, lora_b, ranks
