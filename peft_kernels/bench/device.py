"""Which device the bench runs on, its peak numbers, and the environment a result file records.

Peaks are looked up by the CUDA device name. Only devices in :data:`PEAKS` get a "% of peak";
anything else (other GPUs, every CPU) leaves the % columns empty and says so, rather than
guessing. FLOP/s peaks are the dense fp16/bf16 tensor-core numbers, so they are applied to
fp16/bf16 rows only (an fp32 row on an H100 runs on other units with other peaks).
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import re
import subprocess
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class Peak:
    name: str
    tbps: float  # HBM bandwidth, TB/s (10^12 bytes per second)
    tflops_16bit: float  # dense fp16/bf16 tensor-core TFLOP/s
    source: str = "vendor datasheet"


# Order matters: the first entry whose test matches the device name wins.
PEAKS: tuple[tuple[str, Peak], ...] = (
    ("H200 NVL", Peak("H200 NVL", float("nan"), float("nan"), "not in table")),  # different clocks: no guess
    ("H200", Peak("H200 SXM", 4.8, 989.0)),
    ("H100 NVL", Peak("H100 NVL", float("nan"), float("nan"), "not in table")),
    ("H100 PCIe", Peak("H100 PCIe", 2.0, 756.0)),
    ("H100", Peak("H100 SXM", 3.35, 989.0)),  # "NVIDIA H100 80GB HBM3" is the SXM part
    ("A100-SXM4-80GB", Peak("A100 80GB", 2.0, 312.0)),
    ("A100 80GB", Peak("A100 80GB", 2.0, 312.0)),
    ("A100-PCIE-80GB", Peak("A100 80GB", 2.0, 312.0)),
)


def peak_for(device_name: str) -> Optional[Peak]:
    """The peak entry for a CUDA device name, or None when unknown (then no % is reported)."""
    for key, peak in PEAKS:
        if key.lower() in device_name.lower():
            return None if peak.source == "not in table" else peak
    return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    n = torch.get_num_threads()
    return f"CPU {cpu_name()} ({n} thread{'s' if n != 1 else ''})"


def slug(device: torch.device) -> str:
    """Directory name for results: ``nvidia-h100-80gb-hbm3``, ``cpu-amd-epyc``."""
    if device.type == "cuda":
        raw = torch.cuda.get_device_name(device).lower()
    else:
        raw = re.sub(r"\((r|tm)\)|@.*$|\b(cpu|processor)\b", " ", cpu_name().lower())
        raw = "cpu " + raw
    return re.sub(r"[^a-z0-9]+", "-", raw).strip("-") or device.type


def version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_commit(root: Optional[str] = None) -> dict:
    """``{"commit": sha or reason, "dirty": bool or None}`` of the repo holding this package."""
    root = root or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return {"commit": f"unknown ({(sha.stderr.strip().splitlines() or ['git failed'])[-1]})", "dirty": None}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return {"commit": sha.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError) as exc:
        return {"commit": f"unknown ({type(exc).__name__}: {exc})", "dirty": None}


def environment(device: torch.device) -> dict:
    """Everything a result file records about where and with what it ran."""
    name = device_name(device)
    peak = peak_for(name) if device.type == "cuda" else None
    if peak is not None:
        peak_note = f"{peak.name}: {peak.tbps} TB/s, {peak.tflops_16bit} TFLOP/s dense fp16/bf16 ({peak.source})"
    elif device.type == "cuda":
        peak_note = f"no peak known for {name!r}: % of peak left empty"
    else:
        peak_note = "CPU: no peak table for CPUs, % of peak left empty"
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **git_commit(),
        "device": name,
        "device_type": device.type,
        "device_slug": slug(device),
        "peak": None if peak is None else {"name": peak.name, "tbps": peak.tbps, "tflops_16bit": peak.tflops_16bit},
        "peak_note": peak_note,
        "versions": {
            "python": platform.python_version(),
            **{pkg: version(pkg) for pkg in ("peft_kernels", "torch", "triton", "transformers", "peft")},
            "cuda": torch.version.cuda or "none",
        },
        "threads": torch.get_num_threads(),
        "host": platform.node(),
    }
