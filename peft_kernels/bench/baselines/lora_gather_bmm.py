"""Mixed-adapter LoRA in plain torch: gather each row's A and B (padded to max rank), then bmm.

No Python loop and no host sync, but every row materialises its own copy of its adapter's
weights at the padded rank R: ``N * R * (H_in + H_out)`` elements, and pays R, not its real
rank, in FLOPs. Relies on the banks being zero beyond each adapter's rank. Differentiable.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def lora_gather_bmm(x: Tensor, lora_a: Tensor, lora_b: Tensor, adapter_index: Tensor, scaling: Tensor,
                    ranks: Optional[Tensor] = None, base: Optional[Tensor] = None) -> Tensor:
    """Same contract as ``peft_kernels.multi_lora`` for x ``[N, H_in]`` (``ranks`` unused: padding is zero)."""
    rows = adapter_index.clamp(min=0).long()
    a = lora_a[rows]  # [N, R, H_in]
    b = lora_b[rows]  # [N, H_out, R]
    h = torch.bmm(a, x.unsqueeze(2))  # [N, R, 1]
    y = torch.bmm(b, h).squeeze(2)  # [N, H_out]
    scale = scaling.to(y.dtype)[rows] * (adapter_index >= 0).to(y.dtype)
    y = y * scale[:, None]
    return y + base if base is not None else y


def materialised_bytes(N: int, R: int, H_in: int, H_out: int, es: int) -> int:
    """The gathered per-row weights (the rank-space and output intermediates are small)."""
    return N * R * (H_in + H_out) * es
