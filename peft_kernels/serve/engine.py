"""The continuous-batching engine: one worker thread running one ``MultiAdapterModel`` step after step.

Requests join the running batch at the next step (their whole prompt prefilled in the same packed
call as the running requests' decode) and leave it as soon as they finish or are cancelled; every
sequence uses its own adapter, of any kind. KV memory is the packed cache's real tokens only; each
admitted request reserves the bytes of its longest length, so the budget is never overrun and no
request is ever preempted; requests that do not fit wait in a bounded queue. Adapters load and
unload between steps.
"""
from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..cache_utils import cache_layers
from ..methods.geometry import model_geometry
from ..methods.packed_generation import Sampling
from ..multi_adapter import MultiAdapterModel, check_adapter_name
from ..packing import keep_sequences, packed_cache
from .metrics import Metrics
from .request import Event, GenerationRequest, RequestError
from .sampling import Chooser, choose, sampling_of
from .step import StepRunner
from .text import TextStream

log = logging.getLogger("peft_kernels.serve")


@dataclass
class _Sequence:
    request: GenerationRequest
    adapter: Optional[str]
    on_event: Callable[[Event], None]
    chooser: Chooser
    text: Optional[TextStream]
    virtual: int  # soft-prompt slots (they come with the first prompt chunk)
    reserved: int  # KV bytes of its longest length
    arrival: float
    feed: list[int] = field(default_factory=list)  # what is left of the prompt, then the last token
    generated: list[int] = field(default_factory=list)
    past: int = 0
    next_position: int = 0
    first_token_at: Optional[float] = None
    cancelled: bool = False


class Engine:
    """Continuous batching over one :class:`MultiAdapterModel`.

    Semantics: :meth:`submit` checks a request against the model and queues it (or raises
    :class:`RequestError`); its ``on_event`` callback then gets an :class:`Event` after every step
    that gave it a token (called from the worker thread), the last with a finish reason. A
    request's greedy tokens equal its own ``MultiAdapterModel.generate`` run alone. ``deliver``, when
    set, gets each step's ``[(on_event, event), ...]`` in one call instead (an event loop hands them
    on with one wake-up per step, not one per request). One step feeds
    at most ``max_batch_tokens`` slots (one per running request, plus prompt chunks: a longer
    prompt is prefilled over several steps); admitted requests reserve at most
    ``kv_cache_bytes``; at most ``max_queue`` requests wait.
    """

    def __init__(self, model: MultiAdapterModel, *, base_name: str, tokenizer=None, max_batch_tokens: int = 2048,
                 kv_cache_bytes: int = 1 << 30, max_queue: int = 256):
        for arg, value in (("max_batch_tokens", max_batch_tokens), ("kv_cache_bytes", kv_cache_bytes),
                           ("max_queue", max_queue)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg} must be an int >= 1, got {value!r}")
        self.model = model.eval()
        self.runner = StepRunner(model)
        self.base_name = base_name
        self.tokenizer = tokenizer
        self.max_batch_tokens = max_batch_tokens
        self.kv_cache_bytes = kv_cache_bytes
        self.max_queue = max_queue
        config = model.model.config
        g = model_geometry(config)
        dtype = next(model.model.parameters()).dtype
        self.bytes_per_token = 2 * g.layers * g.kv_width * torch.empty((), dtype=dtype).element_size()
        self.vocab_size = model.model.get_input_embeddings().weight.shape[0]
        self.max_positions = getattr(config, "max_position_embeddings", None)
        self.adapter_paths: dict[str, str] = {}
        self.metrics = Metrics(kv_cache_bytes)
        self._cv = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._by_id: dict[str, _Sequence] = {}
        self._commands: list[tuple[Callable[[], object], Future]] = []
        self._unloading: dict[str, list[Future]] = {}
        self._reserved = 0
        self._cache = packed_cache()
        self._settings: dict[tuple, Sampling] = {}
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self.error: Optional[str] = None  # set if the worker itself dies
        self.deliver: Optional[Callable[[list[tuple[Callable[[Event], None], Event]]], None]] = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "Engine":
        """Start the worker thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._worker, name="peft-kernels-engine", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop the worker after its current step; waiting and running requests get an error event."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._send([(seq, Event([], finish_reason="error", error="the server is shutting down"))
                    for seq in list(self._running) + list(self._waiting)])

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ adapters

    def served(self) -> dict[str, Optional[str]]:
        """``{name: peft_type}`` of the base model (None) and every adapter requests may name."""
        with self._cv:
            return {self.base_name: None, **{n: t for n, t in self.model.adapters.items() if n not in self._unloading}}

    def load_adapter(self, name: str, path: str) -> Future:
        """Load adapter directory ``path`` as ``name`` between two steps; the future's result is None,
        or its exception a :class:`RequestError`."""
        try:
            check_adapter_name(name)
        except ValueError as exc:
            return _failed(RequestError(str(exc), "lora_name"))
        if name == self.base_name:
            return _failed(RequestError(f"{name!r} is the base model's name", "lora_name"))

        def load():
            if name in self.model.configs:
                raise RequestError(f"an adapter named {name!r} is already loaded", "lora_name")
            try:
                self.model.load_adapter(path, name)
            except (ValueError, TypeError, OSError) as exc:
                raise RequestError(f"cannot load adapter {name!r}: {exc}", "lora_path") from exc
            finally:
                self.runner.forget()
            self.adapter_paths[name] = str(path)

        return self._command(load)

    def unload_adapter(self, name: str) -> Future:
        """Unload adapter ``name`` once no queued or running request uses it; from now on new requests
        naming it are refused. The future's result is None, or its exception a :class:`RequestError`."""
        future: Future = Future()
        with self._cv:
            if name not in self.model.configs:
                future.set_exception(RequestError(f"no adapter named {name!r} is loaded; loaded: "
                                                  f"{list(self.model.configs)}", "lora_name", 404, code="not_found"))
                return future
            self._unloading.setdefault(name, []).append(future)
            self._cv.notify_all()
        return future

    def _command(self, fn: Callable[[], object]) -> Future:
        future: Future = Future()
        with self._cv:
            self._commands.append((fn, future))
            self._cv.notify_all()
        return future

    # ------------------------------------------------------------------ requests

    def submit(self, request: GenerationRequest, on_event: Callable[[Event], None]) -> None:
        """Check ``request`` against the model and queue it; raises :class:`RequestError` (4xx) if it is refused."""
        try:
            seq = self._prepare(request, on_event)
            with self._cv:
                adapter = seq.adapter
                if adapter is not None and (adapter in self._unloading or adapter not in self.model.configs):
                    raise _unknown_model(request.model, self.served())
                if len(self._waiting) >= self.max_queue:
                    raise RequestError(f"the server is at capacity: {len(self._waiting)} requests are already waiting "
                                       f"(--max-queue {self.max_queue}); retry later", None, 429,
                                       type="rate_limit_error", code="queue_full")
                if request.request_id in self._by_id:
                    raise RequestError(f"request id {request.request_id!r} is already in flight", "request_id")
                self._waiting.append(seq)
                self._by_id[request.request_id] = seq
                self._cv.notify_all()
        except RequestError:
            self.metrics.count_request("rejected")
            raise

    def cancel(self, request_id: str) -> None:
        """Drop a request (its client went away): it leaves the queue or the batch before the next step."""
        with self._cv:
            seq = self._by_id.get(request_id)
            if seq is not None:
                seq.cancelled = True
                self._cv.notify_all()

    def _prepare(self, request: GenerationRequest, on_event) -> _Sequence:
        if request.model == self.base_name:
            adapter = None
        elif request.model in self.served():
            adapter = request.model
        else:
            raise _unknown_model(request.model, self.served())
        ids = request.prompt_ids
        if not ids:
            raise RequestError("prompt is empty: give at least one token", "prompt")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(f"prompt has token ids outside the vocabulary [0, {self.vocab_size}): {bad[:8]}",
                               "prompt")
        bad = [t for t in request.stop_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(f"stop_token_ids outside the vocabulary [0, {self.vocab_size}): {bad[:8]}",
                               "stop_token_ids")
        if request.stop and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer and the model directory has none; use stop_token_ids",
                               "stop")
        try:
            virtual, offset = self.model.virtual_tokens(adapter), self.model.position_offset(adapter)
        except ValueError:
            raise _unknown_model(request.model, self.served()) from None
        slots = virtual + len(ids)
        if virtual + 1 > self.max_batch_tokens:  # longer prompts are prefilled in chunks, the soft prompt in one
            raise RequestError(f"adapter {adapter!r} puts {virtual} soft-prompt slots before the prompt: one step takes "
                               f"at most {self.max_batch_tokens} (--max-batch-tokens)", "model")
        if self.max_positions is not None and offset + slots + request.max_tokens > self.max_positions:
            raise RequestError(f"max_tokens={request.max_tokens} is too large: the prompt takes {offset + slots} "
                               f"positions and the model has {self.max_positions}, so at most "
                               f"{self.max_positions - offset - slots} tokens can be generated", "max_tokens")
        reserved = (slots + request.max_tokens - 1) * self.bytes_per_token
        if reserved > self.kv_cache_bytes:
            raise RequestError(f"prompt and max_tokens={request.max_tokens} need {reserved} bytes of KV cache, more "
                               f"than the server holds (--kv-cache-bytes {self.kv_cache_bytes})", "max_tokens")
        try:
            chooser = Chooser(self._sampling(request), request.seed, self.runner.device)
        except ValueError as exc:  # the model's generation config, not the request
            raise RequestError(str(exc), None) from exc
        text = TextStream(self.tokenizer, request.stop, request.stream) if self.tokenizer is not None else None
        return _Sequence(request, adapter, on_event, chooser, text, virtual, reserved, time.monotonic(), feed=list(ids))

    def _sampling(self, request: GenerationRequest) -> Sampling:
        """The stop tokens and logits warpers of a request's temperature / top-p / top-k (built
        once per setting: reading the model's generation config costs ~1 ms)."""
        key = (request.temperature, request.top_p, request.top_k)
        settings = self._settings.get(key)
        if settings is None:
            settings = self._settings[key] = sampling_of(self.model.model, *key)
        return settings

    # ------------------------------------------------------------------ the worker

    def _worker(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._stop or self._commands or self._waiting or self._running
                               or self._ready_unloads()):
                        self._cv.wait()
                    if self._stop:
                        return
                    commands, self._commands = self._commands, []
                for fn, future in commands:
                    _run_into(fn, future)
                self._drop_cancelled()
                self._unload_ready()
                self._admit()
                if self._running:
                    self._step()
                self._publish()
        except BaseException:  # the worker must not die silently: say so on /health
            self.error = traceback.format_exc()
            log.exception("the engine's worker died")
            raise

    def _ready_unloads(self) -> list[str]:
        used = {s.adapter for s in (*self._waiting, *self._running)}
        return [n for n in self._unloading if n not in used]

    def _unload_ready(self) -> None:
        with self._cv:
            ready = {n: self._unloading.pop(n) for n in self._ready_unloads()}
        for name, futures in ready.items():
            try:
                self.model.unload_adapter(name)
                self.adapter_paths.pop(name, None)
                error = None
                self.runner.forget()
            except ValueError as exc:
                error = RequestError(str(exc), "lora_name", 404, code="not_found")
            for future in futures:
                future.set_exception(error) if error else future.set_result(None)

    def _drop_cancelled(self) -> None:
        with self._cv:
            gone = [s for s in self._waiting if s.cancelled]
            self._waiting = deque(s for s in self._waiting if not s.cancelled)
        for seq in gone:
            self._finish(seq, "cancelled")
        if any(s.cancelled for s in self._running):
            self._keep([not s.cancelled for s in self._running], "cancelled")

    def _admit(self) -> None:
        budget = self.max_batch_tokens - sum(self._least(s) for s in self._running)
        with self._cv:
            while self._waiting:
                seq = self._waiting[0]
                if self._reserved + seq.reserved > self.kv_cache_bytes or self._least(seq) > budget:
                    break
                self._waiting.popleft()
                self._running.append(seq)
                self._reserved += seq.reserved
                budget -= self._least(seq)
                self.metrics.count_request("admitted", len(seq.request.prompt_ids))

    @staticmethod
    def _least(seq: _Sequence) -> int:
        """The slots a running sequence takes in every step at least: one token (its soft prompt too at first)."""
        return 1 + (seq.virtual if seq.past == 0 else 0)

    def _chunks(self, running: list[_Sequence]) -> list[list[int]]:
        """Each sequence's feed this step: a decode token, or as much of the prompt as the step holds.

        Semantics: chunked prefill: every sequence gets at least :meth:`_least`; what is left of
        ``max_batch_tokens`` goes to the prompts in arrival order, so a long prompt is prefilled
        over several steps while the others keep decoding.
        """
        spare = self.max_batch_tokens - sum(self._least(s) for s in running)
        feeds = []
        for seq in running:
            more = min(spare, len(seq.feed) - 1)
            spare -= more
            feeds.append(seq.feed[:1 + more])
        return feeds

    def _step(self) -> None:
        running = self._running
        feeds = self._chunks(running)
        ready = [len(f) == len(s.feed) for s, f in zip(running, feeds)]  # whole prompt (or a decode token) fed
        try:
            result = self.runner.run(self._cache, [s.adapter for s in running], feeds,
                                     [s.past for s in running], [s.next_position for s in running])
            sampled = [s for s, r in zip(running, ready) if r]  # a prompt still being fed draws no token
            logits = result.logits if len(sampled) == len(running) else \
                result.logits[torch.tensor(ready, device=result.logits.device)]
            chosen = iter(choose([s.chooser for s in sampled], logits, [len(s.generated) for s in sampled]))
            tokens = [next(chosen) if r else None for r in ready]
        except Exception as exc:  # a failed step fails its batch, never the worker
            log.exception("a step failed")
            message = f"the step failed: {type(exc).__name__}: {exc}"
            self._send([(seq, Event([], finish_reason="error", error=message)) for seq in running])
            for seq in running:
                self._finish(seq, "failed")
            self._reserved -= sum(seq.reserved for seq in running)
            self._running = []
            self._cache = packed_cache()
            return
        fed = sum(len(f) for f in feeds)
        slots, positions = result.slots.tolist(), result.next_positions.tolist()
        now = time.monotonic()
        keep, events = [], []
        for seq, token, n, position, chunk in zip(running, tokens, slots, positions, feeds):
            seq.past += n
            seq.next_position = position
            if token is None:  # more of its prompt next step
                seq.feed = seq.feed[len(chunk):]
                keep.append(not seq.cancelled)
                continue
            seq.generated.append(token)
            seq.feed = [token]
            if seq.first_token_at is None:
                seq.first_token_at = now
                self.metrics.observe_ttft(now - seq.arrival)
            reason = self._finish_reason(seq, token)
            keep.append(reason is None and not seq.cancelled)
            text = ""
            if seq.text is not None:
                text = seq.text.push(seq.generated)
                if reason is None and seq.text.stopped:
                    reason = "stop"
                    keep[-1] = False
                elif reason is not None:
                    text += seq.text.finish(seq.generated)
            if not seq.cancelled:
                events.append((seq, Event([token], text, reason, prompt_tokens=len(seq.request.prompt_ids),
                                          completion_tokens=len(seq.generated))))
        self._send(events)
        self.metrics.count_step(len(running), fed, sum(ready))
        if not all(keep):
            self._keep(keep, "finished")

    def _finish_reason(self, seq: _Sequence, token: int) -> Optional[str]:
        if token in seq.request.stop_token_ids or (not seq.request.ignore_eos and token in seq.chooser.eos):
            return "stop"
        if len(seq.generated) >= seq.request.max_tokens:
            return "length"
        return None

    def _keep(self, keep: list[bool], outcome: str) -> None:
        """Drop the running sequences with ``keep`` False (from the cache too)."""
        lengths = torch.tensor([s.past for s in self._running], dtype=torch.long)
        keep_sequences(self._cache, lengths, torch.tensor(keep, dtype=torch.bool))
        for seq, kept in zip(self._running, keep):
            if not kept:
                self._reserved -= seq.reserved
                self._finish(seq, "cancelled" if seq.cancelled else outcome)
        self._running = [s for s, kept in zip(self._running, keep) if kept]
        if not self._running:
            self._cache = packed_cache()

    def _finish(self, seq: _Sequence, outcome: str) -> None:
        with self._cv:
            self._by_id.pop(seq.request.request_id, None)
        self.metrics.count_request(outcome)

    def _send(self, events: list[tuple[_Sequence, Event]]) -> None:
        if self.deliver is not None and events:
            try:
                self.deliver([(seq.on_event, event) for seq, event in events])
                return
            except Exception:  # e.g. the event loop is gone: nobody is listening
                log.exception("delivering events failed")
                for seq, _ in events:
                    seq.cancelled = True
                return
        for seq, event in events:
            try:
                seq.on_event(event)
            except Exception:  # a broken consumer loses its own events only
                log.exception("an event callback failed")
                seq.cancelled = True

    def _publish(self) -> None:
        kv = sum(t.numel() * t.element_size() for kv in cache_layers(self._cache) for t in kv)
        with self._cv:
            waiting = len(self._waiting)
        self.metrics.set_state(len(self._running), waiting, kv, self._reserved)


def _unknown_model(model: str, served) -> RequestError:
    return RequestError(f"the model {model!r} does not exist; served: {list(served)}", "model", 404,
                        code="model_not_found")


def _failed(exc: BaseException) -> Future:
    future: Future = Future()
    future.set_exception(exc)
    return future


def _run_into(fn: Callable[[], object], future: Future) -> None:
    try:
        future.set_result(fn())
    except BaseException as exc:  # handed to whoever waits on the future
        future.set_exception(exc)
