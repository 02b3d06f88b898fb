"""Visual prompt tuning (VPT, Jia et al. 2022) on a Hugging Face ViT, shallow or deep, many tasks per batch.

:class:`VisualPromptTuning` wraps a ``ViTModel`` / ``ViTForImageClassification`` without
copying any model code: a forward hook on the embeddings module inserts each image's prompt
tokens after CLS (``soft_prompt_concat(..., insert_at=1)``), and for deep VPT a forward
pre-hook on every encoder layer after the first overwrites the prompt slots with that layer's
prompts (``replace=True``). The backbone is frozen; prompts and the classifier head train.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..ops import soft_prompt_concat, soft_prompt_mask

_INDEX_DTYPES = (torch.int32, torch.int64)


def _backbone(model: nn.Module) -> nn.Module:
    """The ViT trunk: ``model.vit`` for a task model, ``model`` itself for a bare ``ViTModel``."""
    prefix = getattr(model, "base_model_prefix", None)
    if prefix and isinstance(getattr(model, prefix, None), nn.Module):
        return getattr(model, prefix)
    vit = getattr(model, "vit", None)
    return vit if isinstance(vit, nn.Module) else model


def _layer_list(backbone: nn.Module) -> nn.ModuleList:
    """The encoder's layers: ``encoder.layer`` (transformers 4.x), ``encoder.layers`` or ``layers`` (5.x)."""
    encoder = getattr(backbone, "encoder", None)
    for owner, name in ((encoder, "layer"), (encoder, "layers"), (backbone, "layers"), (backbone, "layer")):
        layers = getattr(owner, name, None) if owner is not None else None
        if isinstance(layers, nn.ModuleList) and len(layers):
            return layers
    raise ValueError(
        f"cannot find the encoder's layer list on {type(backbone).__name__}: looked for "
        "encoder.layer, encoder.layers, layers and layer (an nn.ModuleList)"
    )


def _patch_area(config) -> int:
    patch = getattr(config, "patch_size", None)
    if patch is None:
        raise ValueError(f"the model's config ({type(config).__name__}) has no patch_size, needed for VPT's init")
    sizes = tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)
    return math.prod(int(s) for s in sizes)


class VisualPromptTuning(nn.Module):
    """Visual prompt tuning on a transformers ViT: ``num_prompts`` learned tokens after CLS.

    Shapes: prompts live in ``self.prompts``, an ``nn.ParameterList`` with one ``[num_tasks, P, H]``
    entry (shallow) or one per encoder layer (deep), P = ``num_prompts``, H = hidden size.
    ``forward(pixel_values [B, C, H_img, W_img], task_index=[B] or None)`` returns the wrapped
    model's output; its sequence outputs (``last_hidden_state``, hidden states) have
    1 + P + N positions: CLS, the prompts, then the N patches.

    Semantics (VPT, Jia et al. 2022):

    - shallow: the embeddings' output ``[B, 1 + N, H]`` becomes ``[CLS, prompts[0][t_b], patches]``;
    - deep: additionally, before encoder layer i >= 1 the prompt slots 1..P of the hidden
      states are overwritten with ``prompts[i][t_b]`` (layer 0 sees the inserted ``prompts[0]``);
    - the classifier (and a ``ViTModel``'s pooler) read position 0 (CLS), so they run unchanged.
      Heads that read patch positions (e.g. ``ViTForMaskedImageModeling``) are not supported.

    Every prompt is initialised as in the VPT paper: uniform(-v, v) with
    ``v = sqrt(6 / (3 * patch_size**2 + H))`` (Xavier-uniform over the patch projection's fan-in
    ``3 * patch_size**2`` and the fan-out H; 3 is ``config.num_channels`` and a non-square patch
    uses its area). ``dropout`` is VPT's prompt dropout: in training each image's prompt copy is
    dropped independently (per row, as in the paper); in eval the bank is used as is.

    Tasks: ``task_index[b]`` in ``[0, num_tasks)`` (int32/int64) picks row b's prompt set, so one
    batch can mix tasks and each task's prompts get the gradients of its own rows only.
    ``task_index=None`` means task 0 for every row and is only allowed when ``num_tasks == 1``.
    Unlike the language-model prompt methods, a row can NOT opt out with ``-1``: ViT runs with
    no attention mask, so the zeroed prompt slots of such a row would still be attended and
    change its output; ``-1`` raises ``ValueError`` (use a separate forward of the plain model).
    ``task_index`` is checked once per forward (one host sync; pass ``validate=False`` to skip
    it, e.g. under CUDA-graph capture) and the ops inside the hooks run with ``validate=False``.

    The constructor freezes the whole ViT except its head (every parameter outside the
    backbone, e.g. ``classifier``) and reports the trainable parameter count;
    :meth:`remove` / :meth:`unwrap` take the hooks off and restore the original
    ``requires_grad`` flags, leaving the plain model exactly as it was. Calling the wrapped
    model directly (not through this module) while the hooks are on uses task 0 and is only
    allowed when ``num_tasks == 1``.

    With ``output_hidden_states=True`` and deep VPT, ``hidden_states[i]`` (i >= 1) is layer
    i-1's output as transformers records it, before layer i's prompts overwrite its slots.
    """

    def __init__(
        self,
        vit_model: nn.Module,
        num_prompts: int,
        deep: bool = False,
        *,
        num_tasks: int = 1,
        dropout: float = 0.0,
        generator: Optional[torch.Generator] = None,
        verbose: bool = True,
    ):
        super().__init__()
        if not isinstance(num_prompts, int) or num_prompts < 1:
            raise ValueError(f"num_prompts must be an int >= 1, got {num_prompts!r}")
        if not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be an int >= 1, got {num_tasks!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        backbone = _backbone(vit_model)
        embeddings = getattr(backbone, "embeddings", None)
        if not isinstance(embeddings, nn.Module):
            raise ValueError(
                f"cannot find the embeddings module on {type(vit_model).__name__} (looked for .embeddings)"
            )
        layers = _layer_list(backbone)
        config = getattr(vit_model, "config", None) or getattr(backbone, "config", None)
        ref = next(embeddings.parameters())
        hidden = int(getattr(config, "hidden_size", ref.shape[-1]))
        channels = int(getattr(config, "num_channels", 3))

        self.model = vit_model
        self.num_prompts, self.num_tasks, self.deep = num_prompts, num_tasks, bool(deep)
        self.hidden_size, self.num_layers = hidden, len(layers)
        self.init_bound = math.sqrt(6.0 / (channels * _patch_area(config) + hidden))
        count = len(layers) if deep else 1
        self.prompts = nn.ParameterList([
            nn.Parameter(
                (torch.rand(num_tasks, num_prompts, hidden, generator=generator) * 2 - 1).mul_(self.init_bound)
                .to(device=ref.device, dtype=ref.dtype)
            )
            for _ in range(count)
        ])
        self.prompt_dropout = nn.Dropout(dropout)
        self._index: Optional[Tensor] = None  # the batch's validated task index while forward runs
        self._in_forward = False

        # Freeze the backbone; the head (every parameter outside it) stays trainable.
        self._saved_requires_grad = {name: p.requires_grad for name, p in vit_model.named_parameters()}
        trunk = {id(p) for p in backbone.parameters()} if backbone is not vit_model else None
        for p in vit_model.parameters():
            p.requires_grad_(trunk is not None and id(p) not in trunk)

        self._handles = [embeddings.register_forward_hook(self._insert_hook)]
        if self.deep:
            for i, layer in enumerate(layers):
                if i:
                    self._handles.append(layer.register_forward_pre_hook(self._replace_hook(i), with_kwargs=True))
        if verbose:
            self.print_trainable_parameters()

    # ------------------------------------------------------------------ parameters

    def trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts, prompts included (shared tensors counted once)."""
        trainable = total = 0
        for p in self.parameters():
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

    # ------------------------------------------------------------------ hooks

    def _active_index(self, rows: int) -> Optional[Tensor]:
        if self._in_forward:
            return self._index
        if self.num_tasks != 1:
            raise RuntimeError(
                f"the wrapped ViT was called directly but VPT holds {self.num_tasks} tasks: call the "
                "VisualPromptTuning module with task_index=[B]"
            )
        return None

    def _bank(self, layer: int, like: Tensor, index: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """Layer ``layer``'s bank in ``like``'s dtype and the index to read it with."""
        bank = self.prompts[layer].to(like.dtype)
        if self.training and self.prompt_dropout.p > 0:
            # VPT drops each image's prompt copy independently: one [B, P, H] block, row b -> entry b.
            rows = like.shape[0]
            per_row = bank.expand(rows, -1, -1) if index is None else bank.index_select(0, index.long())
            return self.prompt_dropout(per_row), None
        return bank, index

    def _insert_hook(self, module: nn.Module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        index = self._active_index(hidden.shape[0])
        bank, index = self._bank(0, hidden, index)
        out = soft_prompt_concat(hidden, bank, prompt_index=index, insert_at=1, validate=False)
        return (out, *output[1:]) if isinstance(output, tuple) else out

    def _replace_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            positional = len(args) > 0
            hidden = args[0] if positional else kwargs.get("hidden_states")
            if hidden is None:
                raise RuntimeError(f"deep VPT: encoder layer {layer} was called without hidden_states")
            index = self._active_index(hidden.shape[0])
            bank, index = self._bank(layer, hidden, index)
            out = soft_prompt_concat(hidden, bank, prompt_index=index, insert_at=1, replace=True, validate=False)
            if positional:
                return (out, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": out}

        return hook

    # ------------------------------------------------------------------ forward

    def check_task_index(
        self, task_index: Union[None, Tensor, Sequence[int]], rows: int, device: torch.device, validate: bool = True,
    ) -> Optional[Tensor]:
        """``task_index`` as the index the ops read (None when every row uses the only task).

        Raises ValueError (naming ``task_index``) for a wrong shape, ``-1`` or an out-of-range
        task, and TypeError for a non-integer dtype.
        """
        T = self.num_tasks
        if task_index is None:
            if T != 1:
                raise ValueError(f"task_index is required: VPT holds {T} tasks; pass task_index [B={rows}] in [0, {T})")
            return None
        if not isinstance(task_index, Tensor):
            task_index = torch.as_tensor(task_index)
        if task_index.dtype not in _INDEX_DTYPES:
            raise TypeError(
                f"task_index must be int32 or int64, got {task_index.dtype} (shape {list(task_index.shape)})"
            )
        if task_index.dim() != 1 or task_index.shape[0] != rows:
            raise ValueError(
                f"task_index must have shape [B={rows}] (one task per image), got {list(task_index.shape)}"
            )
        task_index = task_index.to(device, non_blocking=True)
        if validate and rows and not torch.compiler.is_compiling():
            lo, hi = (int(v) for v in torch.stack(torch.aminmax(task_index)).tolist())
            if lo == -1:
                raise ValueError(
                    "task_index holds -1, but VPT rows cannot go without a prompt: ViT has no attention "
                    "mask, so a zeroed prompt would still be attended; give every row a task in "
                    f"[0, {T}) (run prompt-free images through the plain model)"
                )
            if lo < 0 or hi >= T:
                raise ValueError(
                    f"task_index holds values in [{lo}, {hi}] but VPT holds {T} tasks: need [0, {T}) "
                    f"(task_index shape {list(task_index.shape)})"
                )
            if T == 1:
                return None
        return task_index

    def forward(self, pixel_values: Tensor, *, task_index=None, validate: bool = True, **kwargs):
        """Run the ViT with each image's prompts; ``kwargs`` go to the wrapped model.

        Shapes: pixel_values [B, C, H_img, W_img]; task_index [B] int32/int64 or None;
        an ``attention_mask`` [B, 1 + N] in kwargs (transformers >= 5 ViTs take one) is widened
        to [B, 1 + P + N] with the prompt slots attended.
        """
        if not self._handles:
            raise RuntimeError("VisualPromptTuning.remove() was called: the hooks are gone; wrap the model again")
        device = self.prompts[0].device
        index = self.check_task_index(task_index, pixel_values.shape[0], device, validate)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            kwargs["attention_mask"] = soft_prompt_mask(
                mask, self.num_prompts, num_prompts=self.num_tasks, prompt_index=index, insert_at=1, validate=False
            )
        self._index, self._in_forward = index, True
        try:
            return self.model(pixel_values, **kwargs)
        finally:
            self._index, self._in_forward = None, False

    # ------------------------------------------------------------------ teardown

    def remove(self) -> None:
        """Take every hook off and restore the model's original ``requires_grad`` flags (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        saved = self._saved_requires_grad
        for name, p in self.model.named_parameters():
            if name in saved:
                p.requires_grad_(saved[name])

    def unwrap(self) -> nn.Module:
        """:meth:`remove`, then return the plain model."""
        self.remove()
        return self.model

    def extra_repr(self) -> str:
        return (f"num_prompts={self.num_prompts}, deep={self.deep}, num_tasks={self.num_tasks}, "
                f"layers={self.num_layers}, hidden={self.hidden_size}, dropout={self.prompt_dropout.p}")
