"""Shared test setup: the Triton interpreter on CPU-only machines, backend fixtures, tolerances."""
from __future__ import annotations

import os

import torch

# Triton decides interpret-vs-compile when a kernel is decorated, so set this before
# peft_kernels (and its Triton kernels) is imported. Without CUDA, Triton kernels can only
# run on CPU tensors under the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import peft_kernels  # noqa: E402
from peft_kernels.ops import _dispatch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def backends_for(op: str, device: str = "cpu") -> list[str]:
    """Backends with a kernel for ``op`` that can run on ``device`` here (reference first)."""
    usable = _dispatch.status(device)
    return [name for name in _dispatch.kernels(op) if usable[name][0]]


def kernel_backends(op: str, device: str = "cpu") -> list[str]:
    """Like :func:`backends_for` without the reference (what the kernel-vs-reference tests run)."""
    return [b for b in backends_for(op, device) if b != "reference"]


@pytest.fixture
def triton_interpret():
    """Run the test's ops on the Triton backend (interpreter on CPU); skip with the reason if absent."""
    ok, why = _dispatch.status(DEVICE)["triton"]
    if not ok:
        pytest.skip(f"triton backend unavailable on {DEVICE}: {why}")
    with peft_kernels.use_backend("triton"):
        yield DEVICE


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def tolerances(dtype: torch.dtype) -> dict:
    return {
        torch.float64: dict(atol=1e-10, rtol=1e-10),
        torch.float32: dict(atol=2e-5, rtol=2e-5),
        torch.float16: dict(atol=2e-3, rtol=2e-3),
        torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    }[dtype]
