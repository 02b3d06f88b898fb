"""The padded-rank gather ("BGMV", as in Punica / S-LoRA / vLLM serving kernels) for mixed LoRA.

Two Triton kernels, one program per (row, tile): *shrink* ``h[n] = A[t_n] @ x[n]`` over the
full padded rank R (fp32 accumulate), then *expand* ``y[n] = base[n] + s[t_n] * B[t_n] @ h[n]``.
Each row gathers its adapter's weights straight from the bank (no copy), but every row pays
the padded rank R whatever its adapter's real rank, and the kernels are forward only (serving).

On CUDA tensors :func:`lora_bgmv` launches the kernels (also on CPU tensors under
``TRITON_INTERPRET=1``, which the tests use); elsewhere :func:`lora_bgmv_torch` is the same
algorithm in torch (gather padded weights, fp32 rank space): that is what the CPU bench runs,
and its rows say so.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except Exception as exc:  # pragma: no cover - triton ships with torch's CUDA builds
    triton = None
    TRITON_ERROR: Optional[str] = f"{type(exc).__name__}: {exc}"
else:
    TRITON_ERROR = None

    @triton.jit
    def _bgmv_shrink(X, A, IDX, H, H_in, R, stride_xn, stride_at, stride_ar, stride_hn,
                     BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        n = tl.program_id(0)
        r_offs = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        t = tl.load(IDX + n).to(tl.int64)
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        if t >= 0:
            for k0 in range(0, H_in, BLOCK_K):
                k_offs = k0 + tl.arange(0, BLOCK_K)
                xk = tl.load(X + n * stride_xn + k_offs, mask=k_offs < H_in, other=0.0).to(tl.float32)
                a = tl.load(A + t * stride_at + r_offs[:, None] * stride_ar + k_offs[None, :],
                            mask=(r_offs[:, None] < R) & (k_offs[None, :] < H_in), other=0.0).to(tl.float32)
                acc += tl.sum(a * xk[None, :], axis=1)
        tl.store(H + n * stride_hn + r_offs, acc, mask=r_offs < R)

    @triton.jit
    def _bgmv_expand(Hbuf, B, IDX, S, BASE, Y, H_out, R, stride_hn, stride_bt, stride_bo, stride_basen, stride_yn,
                     HAS_BASE: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr):
        n = tl.program_id(0)
        o_offs = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
        o_ok = o_offs < H_out
        t = tl.load(IDX + n).to(tl.int64)
        acc = tl.zeros([BLOCK_O], dtype=tl.float32)
        if t >= 0:
            for r0 in range(0, R, BLOCK_R):
                r_offs = r0 + tl.arange(0, BLOCK_R)
                h = tl.load(Hbuf + n * stride_hn + r_offs, mask=r_offs < R, other=0.0)
                b = tl.load(B + t * stride_bt + o_offs[:, None] * stride_bo + r_offs[None, :],
                            mask=o_ok[:, None] & (r_offs[None, :] < R), other=0.0).to(tl.float32)
                acc += tl.sum(b * h[None, :], axis=1)
            acc = acc * tl.load(S + t)
        if HAS_BASE:
            acc += tl.load(BASE + n * stride_basen + o_offs, mask=o_ok, other=0.0).to(tl.float32)
        tl.store(Y + n * stride_yn + o_offs, acc.to(Y.dtype.element_ty), mask=o_ok)


def triton_runs_on(device: torch.device) -> Optional[str]:
    """None when the Triton kernels can run on ``device`` tensors, else why not."""
    if TRITON_ERROR is not None:
        return f"triton not importable: {TRITON_ERROR}"
    if device.type == "cuda":
        return None
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return "Triton needs CUDA tensors (or TRITON_INTERPRET=1)"


def lora_bgmv(x: Tensor, lora_a: Tensor, lora_b: Tensor, adapter_index: Tensor, scaling: Tensor,
              ranks: Optional[Tensor] = None, base: Optional[Tensor] = None,
              block_r: int = 16, block_k: int = 256, block_o: int = 128) -> Tensor:
    """Triton BGMV, same contract as ``peft_kernels.multi_lora`` for x ``[N, H_in]`` (forward only).

    ``ranks`` is accepted and ignored: like the serving kernels, it computes the full padded rank
    (the bank's padding must be zero).
    """
    N, H_in = x.shape
    T, R, _ = lora_a.shape
    H_out = lora_b.shape[1]
    x = x.contiguous()
    lora_a = lora_a.contiguous()
    lora_b = lora_b.contiguous()
    idx = adapter_index.to(torch.int32).contiguous()
    s = scaling.to(device=x.device, dtype=torch.float32).contiguous()
    h = torch.empty(N, R, device=x.device, dtype=torch.float32)
    y = torch.empty(N, H_out, device=x.device, dtype=x.dtype)
    if N == 0:
        return y
    block_k = min(block_k, triton.next_power_of_2(H_in))
    block_o = min(block_o, triton.next_power_of_2(H_out))
    _bgmv_shrink[(N, triton.cdiv(R, block_r))](
        x, lora_a, idx, h, H_in, R, x.stride(0), lora_a.stride(0), lora_a.stride(1), h.stride(0),
        BLOCK_R=block_r, BLOCK_K=block_k)
    base_arg = base.contiguous() if base is not None else y
    _bgmv_expand[(N, triton.cdiv(H_out, block_o))](
        h, lora_b, idx, s, base_arg, y, H_out, R, h.stride(0), lora_b.stride(0), lora_b.stride(1),
        base_arg.stride(0), y.stride(0), HAS_BASE=base is not None, BLOCK_O=block_o, BLOCK_R=block_r)
    return y


def lora_bgmv_torch(x: Tensor, lora_a: Tensor, lora_b: Tensor, adapter_index: Tensor, scaling: Tensor,
                    ranks: Optional[Tensor] = None, base: Optional[Tensor] = None) -> Tensor:
    """The same padded-rank gather in torch (fp32 rank space): the fallback where Triton cannot run."""
    rows = adapter_index.clamp(min=0).long()
    valid = (adapter_index >= 0).to(torch.float32)
    h = torch.einsum("nri,ni->nr", lora_a[rows].float(), x.float())
    y = torch.einsum("nor,nr->no", lora_b[rows].float(), h) * (scaling.float()[rows] * valid)[:, None]
    if base is not None:
        y = y + base.float()
    return y.to(x.dtype)


def materialised_bytes(N: int, R: int, H_in: int, H_out: int, es: int, triton_kernel: bool) -> int:
    """Triton: only the fp32 rank-space buffer; torch fallback: the gathered weights too (fp32)."""
    if triton_kernel:
        return N * R * 4
    return N * R * (H_in + H_out) * (es + 4) + N * R * 4
