"""One benchmark row: check every baseline against ours on the row's inputs, then time them all.

A suite builds a :class:`Case` (inputs allocated, one :class:`Impl` for ours and one per
baseline); :func:`run_case` turns it into a row dict:

1. ours runs once: outputs (and, for ``fwd+bwd``, the gradients w.r.t. its ``leaves`` for a
   shared random ``dout``) are kept as the oracle for this shape;
2. each baseline runs once on the same inputs and its outputs/gradients are compared with
   ours (max |diff| relative to max |ours|, per tensor, against a dtype tolerance); a baseline
   that cannot run here is recorded as ``unavailable: <reason>``, one that raises as
   ``error: <reason>``;
3. everything that ran is timed in this process (same inputs, same timer), then peak memory
   is taken on CUDA from a separate call.

A row whose baseline disagrees with ours is kept, marked ``agrees: false``, and makes the
bench exit non-zero.
"""
from __future__ import annotations

import gc
import math
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from .costs import Cost
from .timing import Timer

# Max |a - b| / max |b| allowed per output/gradient tensor.
TOLERANCE = {torch.float64: 1e-8, torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}


@dataclass
class Impl:
    """One implementation of a row's computation.

    ``forward()`` returns a Tensor or a tuple of Tensors (compared position by position with
    ours). For ``fwd+bwd`` rows the harness calls ``torch.autograd.grad(outputs, leaves, dout)``;
    ``canon`` maps the resulting grads (and outputs) onto ours' layout when they differ.
    """

    name: str
    forward: Optional[Callable[[], Any]] = None
    leaves: Sequence[Tensor] = ()
    canon: Optional[Callable[[list], list]] = None
    note: str = ""
    unavailable: Optional[str] = None
    check: bool = True  # False: a different computation (e.g. the model without adapters)
    materialised_bytes: Optional[int] = None  # model of the intermediates it allocates by design
    backend: Optional[Callable[[], Optional[str]]] = None
    no_grad: bool = False  # run forward-only rows under torch.inference_mode()
    optional: bool = False  # an exception means "unavailable here" (e.g. FlexAttention), not an error
    tol: Optional[float] = None  # overrides TOLERANCE[dtype] (whole-model rows accumulate more rounding)


@dataclass
class Case:
    suite: str
    op: str
    mode: str  # "fwd" | "fwd+bwd"
    shape: dict
    label: str
    dtype: torch.dtype
    cost: Cost
    ours: Impl
    baselines: list[Impl] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _as_list(out) -> list:
    if isinstance(out, Tensor):
        return [out]
    return [t for t in out]


def _step(impl: Impl, mode: str, dout: Optional[list]) -> Callable[[], list]:
    """The callable that is timed: forward, or forward + autograd.grad w.r.t. the impl's leaves."""
    if mode == "fwd":
        if impl.no_grad:
            def fwd():
                with torch.inference_mode():
                    return _as_list(impl.forward())
            return fwd
        return lambda: _as_list(impl.forward())

    def fwd_bwd():
        outs = _as_list(impl.forward())
        grads = torch.autograd.grad(outs[: len(dout)], list(impl.leaves), dout, allow_unused=True)
        return outs + [g if g is not None else torch.zeros_like(leaf) for g, leaf in zip(grads, impl.leaves)]

    return fwd_bwd


def _rel_err(got: Tensor, want: Tensor) -> float:
    if got.shape != want.shape:
        raise ValueError(f"shape {list(got.shape)} vs ours {list(want.shape)}")
    g, w = got.detach().double(), want.detach().double()
    scale = w.abs().max().item() if w.numel() else 0.0
    diff = (g - w).abs().max().item() if w.numel() else 0.0
    if math.isnan(diff):
        return float("nan")
    return diff / scale if scale > 0 else diff


def _err_text(exc: BaseException) -> str:
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return "CUDA out of memory"
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0][:300] if msg else ''}"


def _nbytes(tensors: list) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor)))


def _peak_memory(step: Callable[[], list], device: torch.device) -> Optional[int]:
    """Bytes the step allocates at its peak above what was allocated before it (its outputs included).

    CUDA: the caching allocator's peak statistics. CPU: the running sum of every allocation and
    free the profiler records (``profile_memory=True``), in time order.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del out
        return int(peak)
    return cpu_peak_bytes(step)


def cpu_peak_bytes(step: Callable[[], object]) -> int:
    """Peak bytes allocated on the CPU while ``step()`` runs (and its result lives), from the profiler."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = step()
        del out
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    current = peak = 0
    for _, size in sorted(events):
        current += size
        peak = max(peak, current)
    return int(peak)


def _metrics(ms: float, cost: Cost, dtype: torch.dtype, peak: Optional[dict]) -> dict:
    sec = ms * 1e-3
    tbps = cost.bytes / sec / 1e12 if cost.bytes else None
    tflops = cost.flops / sec / 1e12 if cost.flops else None
    pct_bw = pct_flops = None
    if peak is not None:
        if tbps is not None:
            pct_bw = 100.0 * tbps / peak["tbps"]
        if tflops is not None and dtype in (torch.float16, torch.bfloat16):
            pct_flops = 100.0 * tflops / peak["tflops_16bit"]
    have = [p for p in (pct_bw, pct_flops) if p is not None]
    return {"tbps": tbps, "tflops": tflops, "pct_peak_bw": pct_bw, "pct_peak_flops": pct_flops,
            # attainable = min(peak FLOP/s, intensity * peak BW): achieved / attainable = max of the two %.
            "roofline_pct": max(have) if have else None}


def _free(device: torch.device, collect: bool = False) -> None:
    if collect:  # after an exception (its traceback holds tensors); a full gc per call costs seconds
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_case(case: Case, timer: Timer, device: torch.device, env: dict, seed: int = 0) -> dict:
    """Check, time and measure one case; returns the JSON row."""
    row = {"suite": case.suite, "op": case.op, "mode": case.mode, "shape": case.shape, "shape_label": case.label,
           "dtype": str(case.dtype).replace("torch.", ""), "device": env["device"],
           "cost": {"bytes": case.cost.bytes, "flops": case.cost.flops, "model": case.cost.model},
           "notes": list(case.notes)}
    tol = TOLERANCE[case.dtype]
    ours = case.ours
    dout = None
    try:
        ref_out = _as_list(ours.forward())
        if case.mode == "fwd+bwd":
            g = torch.Generator(device=device).manual_seed(seed + 1)
            dout = [torch.randn(t.shape, generator=g, device=t.device, dtype=t.dtype) for t in ref_out[:1]]
        del ref_out  # (and the autograd graph it holds)
        ours_step = _step(ours, case.mode, dout)
        ref = [t.detach() for t in ours_step()]
        if ours.canon:
            ref = ours.canon(ref)
    except Exception as exc:
        row["ours"] = {"name": "ours", "status": f"error: {_err_text(exc)}", "traceback": traceback.format_exc(limit=4)}
        row["baselines"] = {b.name: {"status": "not run: ours failed"} for b in case.baselines}
        row["speedup"] = {b.name: None for b in case.baselines}
        _free(device, collect=True)
        return row

    backend = ours.backend() if ours.backend else None
    entries: dict[str, dict] = {}
    steps: dict[str, Callable] = {}
    for b in case.baselines:
        e: dict[str, Any] = {"note": b.note} if b.note else {}
        if b.unavailable:
            e["status"] = f"unavailable: {b.unavailable}"
            entries[b.name] = e
            continue
        try:
            step = _step(b, case.mode, dout)
            got = [t.detach() for t in step()]
            if b.canon:
                got = b.canon(got)
            if b.check:
                if len(got) != len(ref):
                    raise ValueError(f"{len(got)} outputs/grads vs ours {len(ref)}")
                errs = [_rel_err(a, w) for a, w in zip(got, ref)]
                worst = float("nan") if any(math.isnan(x) for x in errs) else max(errs, default=0.0)
                btol = b.tol if b.tol is not None else tol
                e.update(max_rel_err=worst, tol=btol, agrees=bool(worst <= btol))
            else:
                e.update(max_rel_err=None, tol=None, agrees=None)
            e["out_bytes"] = _nbytes(got)
            e["materialised_bytes"] = b.materialised_bytes
            del got
            steps[b.name] = step
            e["status"] = "ok"
        except Exception as exc:
            unavailable = b.optional or isinstance(exc, NotImplementedError)
            e["status"] = f"{'unavailable' if unavailable else 'error'}: {_err_text(exc)}"
            if not unavailable:
                e["traceback"] = traceback.format_exc(limit=4)
            _free(device, collect=True)
        entries[b.name] = e

    o = {"name": "ours", "status": "ok", "backend": backend, "note": ours.note, "out_bytes": _nbytes(ref)}
    del ref
    timings: dict = {}
    try:
        timings = timer.interleaved({"ours": ours_step, **steps})
    except Exception as exc:
        o["status"] = f"error: {_err_text(exc)}"
    _free(device)
    speedup = {}
    if "ours" in timings:
        t = timings["ours"]
        o.update(t.as_dict(), **_metrics(t.median_ms, case.cost, case.dtype, env["peak"]))
    for name, step in [("ours", ours_step), *steps.items()]:
        e = o if name == "ours" else entries[name]
        try:
            e["peak_mem_bytes"] = _peak_memory(step, device)
        except Exception as exc:
            e["status"] = f"error: {_err_text(exc)}"
        _free(device)
        if name == "ours" or name not in timings:
            continue
        t = timings[name]
        e.update(t.as_dict(), **_metrics(t.median_ms, case.cost, case.dtype, env["peak"]))
        if o.get("median_ms"):
            speedup[name] = t.median_ms / o["median_ms"]
    for b in case.baselines:
        speedup.setdefault(b.name, None)
        entries[b.name]["speedup"] = speedup[b.name]
    row.update(ours=o, baselines=entries, speedup=speedup)
    return row


def row_failures(row: dict) -> list[str]:
    """Why this row should fail the run: ours errored, or a baseline disagrees with ours."""
    bad = []
    if row["ours"].get("status") != "ok":
        bad.append(f"{row['op']} {row['mode']} {row['shape_label']}: ours {row['ours']['status']}")
    for name, e in row["baselines"].items():
        if e.get("agrees") is False:
            bad.append(f"{row['op']} {row['mode']} {row['shape_label']}: {name} disagrees with ours "
                       f"(max rel err {e['max_rel_err']:.3g} > {e['tol']:.3g})")
    return bad
