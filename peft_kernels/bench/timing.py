"""Timers: CUDA events through ``triton.testing.do_bench`` on GPU; on CPU, the compared sides
interleaved sample by sample (so a noisy neighbour slows both alike), median of >= 7 samples.

Both return the median and the inter-quartile range (IQR) in milliseconds. Every call of the
timed function must be self-contained (it allocates its own outputs), so repeated runs do not
accumulate anything.
"""
from __future__ import annotations

import math
import statistics
import time
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
    event loop if triton is missing. CPU (:meth:`interleaved`): after three warm-up calls each, a
    sample is a block of calls lasting about ``cpu_sample_s``; the sides take turns, one sample
    each per round, for ``cpu_samples`` (>= 7) rounds; all of torch's threads. Each sample follows
    a third as many untimed calls of the same side: right after another side's sample, a model's
    first calls (measured: about ten decode steps of a 4-layer Llama on a 2-core VM) run slower
    while the caches refill with its own weights, which no user running one of them pays.
    """

    def __init__(self, device: torch.device, quick: bool, cpu_samples: Optional[int] = None,
                 cpu_sample_s: Optional[float] = None):
        self.device = device
        self.quick = quick
        self.warmup_ms, self.rep_ms = (10, 40) if quick else (25, 100)
        self.cpu_samples = max(7, cpu_samples or (7 if quick else 15))
        self.cpu_sample_s = cpu_sample_s or (0.01 if quick else 0.1)

    @property
    def description(self) -> str:
        if self.device.type == "cuda":
            return (f"CUDA events via triton.testing.do_bench(warmup={self.warmup_ms} ms, rep={self.rep_ms} ms, "
                    "L2 flushed between runs), median and IQR of the runs")
        return (f"CPU wall clock, the compared implementations interleaved: {self.cpu_samples} rounds of one "
                f"~{self.cpu_sample_s * 1e3:.0f} ms sample each, after a third as many untimed calls "
                f"(num_threads={torch.get_num_threads()}), median and IQR of the samples")

    def __call__(self, fn: Callable[[], object]) -> Timing:
        return self.interleaved({"fn": fn})["fn"]

    def interleaved(self, fns: dict[str, Callable[[], object]]) -> dict[str, Timing]:
        """Time every function of ``fns``; on CPU in interleaved rounds, on GPU one after another."""
        if self.device.type == "cuda":
            return {name: self._cuda(fn) for name, fn in fns.items()}
        return self._cpu(fns)

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

    def _cpu(self, fns: dict[str, Callable[[], object]]) -> dict[str, Timing]:
        number = {}
        for name, fn in fns.items():
            for _ in range(3):  # warm-up: lazy initialisation, allocator, caches
                fn()
            start = time.perf_counter()
            fn()
            once = max(time.perf_counter() - start, 1e-7)
            number[name] = max(1, math.ceil(self.cpu_sample_s / once))
        samples: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(self.cpu_samples):
            for name, fn in fns.items():
                n = number[name]
                for _ in range(max(1, n // 3)):  # untimed: refill the caches the previous side's sample used
                    fn()
                start = time.perf_counter()
                for _ in range(n):
                    fn()
                samples[name].append((time.perf_counter() - start) / n * 1e3)
        out = {}
        for name, times in samples.items():
            q = statistics.quantiles(sorted(times), n=4, method="inclusive")
            out[name] = Timing(statistics.median(times), q[0], q[2], len(times), "interleaved perf_counter")
        return out
