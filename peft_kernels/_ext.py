"""Loads the compiled extensions; a missing one never breaks import.

``peft_kernels._C`` (csrc/cpu) defines the native kernel ops and their CPU kernels;
``peft_kernels._C_cuda`` (csrc/cuda) adds CUDA kernels to the same ops. Each load's outcome is
kept with the reason for ``peft_kernels.info()``.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class Extension:
    name: str
    module: Optional[Any] = None
    error: str = ""
    build_info: dict = field(default_factory=dict)

    @property
    def loaded(self) -> bool:
        return self.module is not None


def _load(name: str, needs: Optional[Extension] = None) -> Extension:
    ext = Extension(name)
    if os.environ.get("PEFT_KERNELS_NO_EXTENSIONS") == "1":
        ext.error = "disabled by PEFT_KERNELS_NO_EXTENSIONS=1"
        return ext
    if needs is not None and not needs.loaded:
        ext.error = f"needs peft_kernels.{needs.name}, which did not load"
        return ext
    try:
        ext.module = importlib.import_module(f"peft_kernels.{name}")
        ext.build_info = dict(ext.module.build_info())
    except Exception as exc:  # ImportError, or an undefined symbol from a torch mismatch
        ext.module = None
        ext.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        if isinstance(exc, ModuleNotFoundError):
            ext.error += " (not built: `pip install --no-build-isolation -e .` builds it)"
    return ext


CPU = _load("_C")
CUDA = _load("_C_cuda", needs=CPU)
