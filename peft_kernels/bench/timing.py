"""Timers: CUDA events through ``triton.testing.do_bench`` on GPU, ``torch.utils.benchmark`` on CPU.

Both return the median and the inter-quartile range (IQR) in milliseconds. Every call of the
timed function must be self-contained (it allocates its own outputs), so repeated runs do not
accumulate anything.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class Timing:
    median_ms: float
    q25_ms: float
    q75_ms: float
    runs: int  # timed runs (do_bench: its repeat count; CPU: blocks of number_per_run calls)
    method: str

    @property
    def iqr_ms(self) -> float:
        return self.q75_ms - self.q25_ms

    def as_dict(self) -> dict:
        return {"median_ms": self.median_ms, "q25_ms": self.q25_ms, "q75_ms": self.q75_ms,
                "iqr_ms": self.iqr_ms, "runs": self.runs, "timer": self.method}


class Timer:
    """``Timer(device, quick)(fn) -> Timing``.

    GPU: ``triton.testing.do_bench(fn, warmup, rep, quantiles=[.25, .5, .75])`` (CUDA events around
    each call, L2 flushed between calls; warm-up ``warmup`` ms, measurement ``rep`` ms), or a CUDA
    event loop if triton is missing. CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` with
    all of torch's threads (its default is one thread), after three warm-up calls.
    """

    def __init__(self, device: torch.device, quick: bool, cpu_min_run_time: Optional[float] = None):
        self.device = device
        self.quick = quick
        self.warmup_ms, self.rep_ms = (10, 40) if quick else (25, 100)
        self.cpu_min_run_time = cpu_min_run_time or (0.05 if quick else 1.0)

    @property
    def description(self) -> str:
        if self.device.type == "cuda":
            return (f"CUDA events via triton.testing.do_bench(warmup={self.warmup_ms} ms, rep={self.rep_ms} ms, "
                    "L2 flushed between runs), median and IQR of the runs")
        return (f"torch.utils.benchmark.Timer.blocked_autorange(min_run_time={self.cpu_min_run_time} s, "
                f"num_threads={torch.get_num_threads()}), median and IQR of the blocks")

    def __call__(self, fn: Callable[[], object]) -> Timing:
        if self.device.type == "cuda":
            return self._cuda(fn)
        return self._cpu(fn)

    def _cuda(self, fn) -> Timing:
        try:
            from triton.testing import do_bench
        except Exception:  # pragma: no cover - triton ships with CUDA builds of torch
            return self._cuda_events(fn)
        q25, q50, q75 = do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, quantiles=[0.25, 0.5, 0.75])
        est = max(q50, 1e-4)
        return Timing(q50, q25, q75, max(1, int(self.rep_ms / est)), "triton.testing.do_bench")

    def _cuda_events(self, fn) -> Timing:  # pragma: no cover - used only without triton
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        times = []
        budget = self.rep_ms
        while budget > 0 or len(times) < 5:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
            budget -= times[-1]
        q = statistics.quantiles(times, n=4)
        return Timing(statistics.median(times), q[0], q[2], len(times), "cuda events")

    def _cpu(self, fn) -> Timing:
        import torch.utils.benchmark as tb

        for _ in range(3):  # warm-up: lazy initialisation, allocator, caches
            fn()
        m = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
            min_run_time=self.cpu_min_run_time
        )
        times = sorted(m.times)
        if len(times) >= 2:
            q = statistics.quantiles(times, n=4, method="inclusive")
            q25, q75 = q[0], q[2]
        else:
            q25 = q75 = times[0]
        return Timing(m.median * 1e3, q25 * 1e3, q75 * 1e3, len(times), "torch.utils.benchmark")
