"""Mixed-adapter LoRA the way PEFT's ``adapter_names=`` does it: one masked pass per adapter.

Mirrors ``peft.tuners.lora.layer.Linear._mixed_batch_forward``: start from the base output,
and for every adapter present in the batch take its rows, run ``lora_B(lora_A(x_rows)) *
scaling`` in the input dtype at that adapter's real rank, and add the result back into those
rows. Works on the stacked banks of ``peft_kernels.multi_lora`` (zero padding is sliced off).
Autograd flows through it (PEFT itself refuses ``adapter_names`` in training mode).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor


def lora_loop(x: Tensor, lora_a: Tensor, lora_b: Tensor, adapter_index: Tensor, scaling: Tensor,
              ranks: Optional[Tensor] = None, base: Optional[Tensor] = None) -> Tensor:
    """Same contract as ``peft_kernels.multi_lora`` for x ``[N, H_in]`` (rank space in x's dtype)."""
    out = base.clone() if base is not None else x.new_zeros(x.shape[0], lora_b.shape[1])
    R = lora_a.shape[1]
    rank_of = ranks.tolist() if ranks is not None else None  # PEFT keeps ranks and scalings on the host
    scale_of = scaling.tolist()
    for t in adapter_index.unique().tolist():  # like PEFT's set(adapter_names): a host round trip
        if t < 0:
            continue
        rows = adapter_index == t
        r = rank_of[t] if rank_of is not None else R
        delta = (x[rows] @ lora_a[t, :r].T) @ lora_b[t, :, :r].T * scale_of[t]
        out[rows] += delta.to(out.dtype)
    return out
