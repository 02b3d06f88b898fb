"""Triton kernels, one file per op (jit kernels + launchers only).

Importing this package registers each kernel with the dispatcher as the ``triton`` backend
when the ``triton`` library imports; kernel files know nothing about models. On CPU tensors
they run under ``TRITON_INTERPRET=1`` (set before this package is imported).
"""
from __future__ import annotations

import importlib

KERNEL_MODULES: tuple[str, ...] = ("soft_prompt", "soft_prompt_varlen", "prefix_attention", "prefix_attention_varlen",
                                   "multi_lora", "label_words")
LOAD_ERRORS: dict[str, str] = {}

try:
    import triton  # noqa: F401  (the library, not this package: absolute import)
except Exception as exc:  # pragma: no cover - triton ships with torch's CUDA builds
    LOAD_ERRORS["triton"] = f"{type(exc).__name__}: {exc}"
else:
    for _name in KERNEL_MODULES:
        try:
            importlib.import_module(f"{__name__}.{_name}")
        except Exception as exc:
            LOAD_ERRORS[_name] = f"{type(exc).__name__}: {exc}"
