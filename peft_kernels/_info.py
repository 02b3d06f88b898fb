"""``peft_kernels.info()``: versions, device, and which backends loaded (and why not)."""
from __future__ import annotations

import importlib.metadata
import platform

import torch

from . import _ext
from . import triton as triton_kernels
from .ops import _dispatch


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info() -> dict:
    """Everything ``python -m peft_kernels info`` prints, as a dict.

    Semantics: ``backends[device_type][name] = (usable, reason)`` for device types "cpu" and
    "cuda"; ``kernels[name]`` lists the ops each backend has a kernel for.
    """
    cuda = torch.cuda.is_available()
    return {
        "versions": {
            "python": platform.python_version(),
            **{pkg: _version(pkg) for pkg in ("peft_kernels", "torch", "triton", "transformers", "peft")},
            "torch.version.cuda": torch.version.cuda or "none (CPU build)",
        },
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads), no CUDA device",
        "forced_backend": _dispatch.forced_backend(),  # raises BackendUnavailableError naming a bogus value
        "backends": {dev: _dispatch.status(dev) for dev in ("cpu", "cuda")},
        "kernels": {name: _dispatch.ops_of(name) for name in _dispatch.BACKENDS},
        "triton_load_errors": dict(triton_kernels.LOAD_ERRORS),
        "extensions": {
            ext.name: {"loaded": ext.loaded, "error": ext.error, "build_info": ext.build_info}
            for ext in (_ext.CPU, _ext.CUDA)
        },
    }


def format_info(data: dict) -> str:
    lines = ["peft_kernels info", "", "versions:"]
    lines += [f"  {k:<20} {v}" for k, v in data["versions"].items()]
    lines += ["", f"device: {data['device']}"]
    if data.get("forced_backend"):
        lines.append(f"forced backend: {data['forced_backend']} (PEFT_KERNELS_BACKEND or use_backend)")
    lines += ["", "backends (usable for CPU tensors | CUDA tensors):"]
    for name in _dispatch.BACKENDS:
        cells = []
        for dev in ("cpu", "cuda"):
            ok, why = data["backends"][dev][name]
            cells.append(f"{'yes' if ok else 'no '} ({why})")
        lines.append(f"  {name:<10} cpu: {cells[0]}")
        lines.append(f"  {'':<10} cuda: {cells[1]}")
        lines.append(f"  {'':<10} ops: {', '.join(data['kernels'][name]) or 'none yet'}")
    for module, error in data["triton_load_errors"].items():
        lines.append(f"  triton kernels {module!r} failed to load: {error}")
    lines += ["", "extensions:"]
    for name, ext in data["extensions"].items():
        state = "loaded" if ext["loaded"] else f"not loaded: {ext['error']}"
        lines.append(f"  peft_kernels.{name:<8} {state}")
        for k, v in ext["build_info"].items():
            lines.append(f"      {k}: {v}")
    return "\n".join(lines)
