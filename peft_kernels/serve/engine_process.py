"""The engine in a process of its own, so the HTTP event loop and the model never share a GIL.

vLLM's V1 engine core runs the same way: the server process parses requests and streams
responses; the engine process runs step after step. Here the two talk over one
``multiprocessing`` pipe: the server sends calls (submit, cancel, load / unload an adapter,
served models, metrics), the engine process answers each one and sends every step's events in
one message.
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing
import threading
import traceback
from concurrent.futures import Future
from itertools import count
from typing import Callable, Optional

from .request import Event, GenerationRequest, RequestError

log = logging.getLogger("peft_kernels.serve")
Deliver = Callable[[list[tuple[Callable[[Event], None], Event]]], None]


class EngineProcess:
    """An :class:`~peft_kernels.serve.engine.Engine` built from the CLI's arguments in a child process.

    Semantics: :meth:`wait_ready` returns once the child has loaded the model and its adapters
    (ValueError with the child's message when it cannot); every call returns a
    ``concurrent.futures.Future`` (a refusal is its :class:`RequestError`); ``deliver`` gets each
    step's ``[(on_event, event), ...]`` from a reader thread. If the child dies, ``alive`` turns
    False, ``error`` says why, and every request in flight gets an error event.
    """

    def __init__(self, args: argparse.Namespace, tokenizer=None):
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_child_main, args=(child, args), name="peft-kernels-engine", daemon=True)
        self._process.start()
        child.close()
        self.tokenizer = tokenizer
        self.base_name = ""
        self.max_positions: Optional[int] = None
        self.deliver: Optional[Deliver] = None
        self.error: Optional[str] = None
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._ids = count()
        self._replies: dict[int, Future] = {}
        self._listeners: dict[str, Callable[[Event], None]] = {}
        self._reader: Optional[threading.Thread] = None
        self._closing = False

    def wait_ready(self) -> "EngineProcess":
        """Block until the child serves (or raise ValueError with why it cannot)."""
        try:
            kind, info = self._conn.recv()
        except (EOFError, OSError):
            self._process.join(5)
            raise ValueError(f"the engine process exited with code {self._process.exitcode} before it was ready")
        if kind == "failed":
            self._process.join(5)
            raise ValueError(info)
        self.base_name, self.max_positions = info["base_name"], info["max_positions"]
        return self

    def start(self) -> "EngineProcess":
        """Start reading the child's answers and events (set ``deliver`` first)."""
        if self._reader is None:
            self._reader = threading.Thread(target=self._read, name="peft-kernels-engine-reader", daemon=True)
            self._reader.start()
        return self

    @property
    def alive(self) -> bool:
        return self.error is None and self._process.is_alive()

    # ------------------------------------------------------------------ calls

    def submit(self, request: GenerationRequest, on_event: Callable[[Event], None]) -> Future:
        """Queue ``request``; the future is None once the engine accepted it, else a :class:`RequestError`."""
        with self._lock:
            self._listeners[request.request_id] = on_event
        future = self._call("submit", request)
        future.add_done_callback(lambda f: f.exception() is not None and self._forget(request.request_id))
        return future

    def cancel(self, request_id: str) -> None:
        """Drop a request at the engine's next step (its client went away)."""
        self._call("cancel", request_id)

    def load_adapter(self, name: str, path: str) -> Future:
        return self._call("load_adapter", name, path)

    def unload_adapter(self, name: str) -> Future:
        return self._call("unload_adapter", name)

    def served(self) -> Future:
        """Future of ``({name: peft_type or None}, {adapter: path})`` (the base model's type is None)."""
        return self._call("served")

    def metrics_text(self) -> Future:
        """Future of the engine's ``/metrics`` text."""
        return self._call("metrics")

    def close(self) -> None:
        """Stop the engine (requests in flight get an error event) and the child."""
        self._closing = True
        if self._process.is_alive() and self.error is None:
            try:
                self._call("close").result(60)
            except Exception:  # already gone: nothing to stop
                pass
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()

    def _call(self, method: str, *args) -> Future:
        future: Future = Future()
        if self.error is not None:
            future.set_exception(_gone(self.error))
            return future
        with self._lock:
            token = next(self._ids)
            self._replies[token] = future
        try:
            with self._send_lock:
                self._conn.send((token, method, args))
        except (OSError, ValueError) as exc:  # the pipe is closed: the child is gone
            with self._lock:
                self._replies.pop(token, None)
            future.set_exception(_gone(f"the engine process is gone ({exc})"))
        return future

    def _forget(self, request_id: str) -> None:
        with self._lock:
            self._listeners.pop(request_id, None)

    # ------------------------------------------------------------------ the reader thread

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "events":
                self._hand_on(message[1])
            elif kind == "reply":
                _, token, ok, value = message
                with self._lock:
                    future = self._replies.pop(token, None)
                if future is not None:
                    future.set_result(value) if ok else future.set_exception(RequestError(*value))
            elif kind == "dead":
                self.error = message[1]
        self._process.join(5)
        self.error = self.error or f"the engine process exited with code {self._process.exitcode}"
        if not self._closing:
            log.error("the engine process is gone: %s", self.error)
        with self._lock:
            replies, self._replies = self._replies, {}
            listeners, self._listeners = self._listeners, {}
        for future in replies.values():
            future.set_exception(_gone(self.error))
        self._hand_on([(rid, Event([], finish_reason="error", error=self.error)) for rid in listeners], listeners)

    def _hand_on(self, events: list[tuple[str, Event]], listeners: Optional[dict] = None) -> None:
        out = []
        with self._lock:
            listeners = self._listeners if listeners is None else listeners
            for request_id, event in events:
                on_event = listeners.get(request_id)
                if on_event is None:
                    continue
                if event.finish_reason is not None:
                    listeners.pop(request_id, None)
                out.append((on_event, event))
        if out and self.deliver is not None:
            self.deliver(out)


def _gone(why: str) -> RequestError:
    return RequestError(f"the engine is not running: {why}", None, 503, type="internal_error", code="engine_down")


class _Listener:
    """The child's ``on_event`` of one request: only its id crosses the pipe."""

    __slots__ = ("request_id",)

    def __init__(self, request_id: str):
        self.request_id = request_id

    def __call__(self, event: Event) -> None:  # events go out in one message per step (see deliver)
        raise RuntimeError("the engine process hands events on through deliver")


def _child_main(conn, args: argparse.Namespace) -> None:
    """The engine process: build the engine, then answer calls until ``close`` or the pipe closes."""
    from .cli import build_engine, configure

    configure(args)
    try:
        engine = build_engine(args)
    except (ValueError, OSError) as exc:
        conn.send(("failed", str(exc)))
        return
    send_lock = threading.Lock()

    def send(message) -> None:
        with send_lock:
            conn.send(message)

    engine.deliver = lambda events: send(("events", [(on_event.request_id, event) for on_event, event in events]))
    engine.start()
    send(("ready", {"base_name": engine.base_name, "max_positions": engine.max_positions}))

    def reply(token: int, call: Callable[[], object]) -> None:
        try:
            value = call()
        except RequestError as exc:
            send(("reply", token, False, (exc.message, exc.param, exc.status, exc.type, exc.code)))
            return
        except Exception as exc:  # a bug, not the request's fault: a 500 that names it
            log.exception("an engine call failed")
            send(("reply", token, False, (f"internal error: {type(exc).__name__}: {exc}", None, 500,
                                          "internal_error", None)))
            return
        if isinstance(value, Future):  # answered when the engine has done it (between two steps)
            value.add_done_callback(lambda f: reply(token, f.result))
        else:
            send(("reply", token, True, value))

    calls = {
        "submit": lambda request: engine.submit(request, _Listener(request.request_id)),
        "cancel": engine.cancel,
        "load_adapter": engine.load_adapter,
        "unload_adapter": engine.unload_adapter,
        "served": lambda: (engine.served(), dict(engine.adapter_paths)),
        "metrics": engine.metrics.render,
        "close": engine.close,
    }
    reported = closed = False
    while not closed:
        if not conn.poll(0.5):
            if not engine.alive and not reported:  # the worker died: say why once, keep answering
                send(("dead", engine.error or "the engine's worker stopped"))
                reported = True
            continue
        try:
            token, method, call_args = conn.recv()
        except (EOFError, OSError):  # the server is gone
            break
        reply(token, lambda: calls[method](*call_args))
        closed = method == "close"
    if not closed:
        try:
            engine.close()
        except Exception:
            log.error("closing the engine failed:\n%s", traceback.format_exc())
