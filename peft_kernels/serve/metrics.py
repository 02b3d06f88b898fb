"""The server's counters and gauges, rendered in Prometheus' text format."""
from __future__ import annotations

import bisect
import threading
from collections import Counter

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PREFIX = "peft_kernels_serve"


class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics: ``le`` buckets, ``_sum``, ``_count``)."""

    def __init__(self, buckets=TTFT_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts):
            total += n
            out.append(f'{name}_bucket{{le="{"+Inf" if bound == float("inf") else bound}"}} {total}')
        return out + [f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]


class Metrics:
    """What ``/metrics`` reports; updated by the engine (any thread), read by the app.

    Semantics: counters only grow (requests by outcome, prompt and generated tokens, steps and the
    sequences / tokens they ran); gauges are the engine's state after its last step (running and
    waiting requests, KV cache bytes held, reserved and allowed); time to first token is a histogram.
    """

    def __init__(self, kv_limit_bytes: int):
        self._lock = threading.Lock()
        self.requests = Counter()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.steps = 0
        self.step_sequences = 0
        self.step_tokens = 0
        self.last_batch_size = 0
        self.running = 0
        self.waiting = 0
        self.kv_bytes = 0
        self.kv_reserved_bytes = 0
        self.kv_limit_bytes = kv_limit_bytes
        self.ttft = Histogram()

    def count_request(self, outcome: str, prompt_tokens: int = 0) -> None:
        with self._lock:
            self.requests[outcome] += 1
            self.prompt_tokens += prompt_tokens

    def count_step(self, sequences: int, tokens: int, generated: int) -> None:
        with self._lock:
            self.steps += 1
            self.step_sequences += sequences
            self.step_tokens += tokens
            self.last_batch_size = sequences
            self.generation_tokens += generated

    def observe_ttft(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def set_state(self, running: int, waiting: int, kv_bytes: int, kv_reserved_bytes: int) -> None:
        with self._lock:
            self.running, self.waiting = running, waiting
            self.kv_bytes, self.kv_reserved_bytes = kv_bytes, kv_reserved_bytes

    def render(self) -> str:
        """The Prometheus text exposition (format 0.0.4)."""
        p = PREFIX
        with self._lock:
            lines = [f"# HELP {p}_requests_total Requests by outcome.", f"# TYPE {p}_requests_total counter"]
            for outcome in ("admitted", "finished", "cancelled", "rejected", "failed"):
                lines.append(f'{p}_requests_total{{outcome="{outcome}"}} {self.requests[outcome]}')

            def one(name, kind, help_, value):
                lines.extend([f"# HELP {p}_{name} {help_}", f"# TYPE {p}_{name} {kind}", f"{p}_{name} {value}"])

            one("prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", self.prompt_tokens)
            one("generation_tokens_total", "counter", "Tokens generated.", self.generation_tokens)
            one("steps_total", "counter", "Model steps run.", self.steps)
            one("step_sequences_total", "counter",
                "Sequences summed over steps (mean batch size = this / steps_total).",
                self.step_sequences)
            one("step_tokens_total", "counter", "Tokens fed summed over steps (prefill and decode).", self.step_tokens)
            one("batch_size", "gauge", "Sequences in the last step.", self.last_batch_size)
            one("running_requests", "gauge", "Requests in the running batch.", self.running)
            one("waiting_requests", "gauge", "Requests in the queue.", self.waiting)
            one("kv_cache_bytes", "gauge", "Bytes of keys and values the KV cache holds.", self.kv_bytes)
            one("kv_cache_reserved_bytes", "gauge", "KV bytes reserved by running requests (their longest length).",
                self.kv_reserved_bytes)
            one("kv_cache_limit_bytes", "gauge", "The KV budget (--kv-cache-bytes).", self.kv_limit_bytes)
            usage = self.kv_reserved_bytes / self.kv_limit_bytes if self.kv_limit_bytes else 0.0
            one("kv_cache_usage_ratio", "gauge", "Reserved KV bytes over the budget.", f"{usage:.6f}")
            lines += [f"# HELP {p}_time_to_first_token_seconds Arrival to first token.",
                      f"# TYPE {p}_time_to_first_token_seconds histogram",
                      *self.ttft.lines(f"{p}_time_to_first_token_seconds")]
        return "\n".join(lines) + "\n"
