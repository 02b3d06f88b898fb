"""Backend registry and selection: each op runs on the fastest backend that can take the call.

Backends: ``reference`` (torch, any device), ``cpp`` (csrc/cpu, CPU tensors), ``triton``
(CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``), ``cuda`` (csrc/cuda).

``PEFT_KERNELS_BACKEND=<name>`` (or ``with peft_kernels.use_backend(name):``) forces one: an
unknown name, or a backend that cannot run on the tensors' device, raises
:class:`BackendUnavailableError`. An op the forced backend has no kernel for, or whose
shape it does not support, runs on the next backend in the normal order;
``peft_kernels.info()`` lists which ops each backend covers.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from .. import _ext

BACKENDS = ("reference", "cpp", "triton", "cuda")
_PREFERENCE = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpp", "reference")}
# Per thread / async context: two threads forcing different backends never see each other's.
# Autograd runs CUDA backward passes on its own device threads, so each op's autograd setup
# records the forward's choice and its backward restores it (see register_autograd).
_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("peft_kernels_backend", default=None)


class BackendUnavailableError(RuntimeError, ValueError):
    """A forced backend is not a backend, or cannot run here (not built, not importable, or wrong device)."""


@dataclass(frozen=True)
class Kernel:
    fn: Callable
    # Returns None when the kernel takes these arguments, else the reason it does not.
    supports: Optional[Callable[..., Optional[str]]] = None


_KERNELS: dict[str, dict[str, Kernel]] = {}
_LAST: dict[str, str] = {}


def register(op: str, backend: str, fn: Callable, supports: Optional[Callable[..., Optional[str]]] = None) -> None:
    """Register ``fn`` as ``backend``'s kernel for ``op`` (same arguments as the reference)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    _KERNELS.setdefault(op, {})[backend] = Kernel(fn, supports)
    _SELECTED.clear()


def register_native(op: str, native: str, supports: Optional[Callable[..., Optional[str]]] = None) -> None:
    """Register ``torch.ops.peft_kernels.<native>`` as the ``cpp`` and/or ``cuda`` kernel of
    ``op`` for each device its compiled extension has a kernel for (nothing when not built).

    The ``cpp`` kernel is the extension's plain function ``peft_kernels._C.<native>`` (the same C++
    kernel without torch.ops' boxed dispatch, csrc/cpu/direct_call.h); callers hand it plain CPU
    tensors only (inside the registered op, or :func:`call`'s eager path)."""
    qualified = f"peft_kernels::{native}"
    if not _ext.CPU.loaded or not hasattr(torch.ops.peft_kernels, native):
        return
    packet = getattr(torch.ops.peft_kernels, native)
    for backend, ext, key in (("cpp", _ext.CPU, "CPU"), ("cuda", _ext.CUDA, "CUDA")):
        if ext.loaded and torch._C._dispatch_has_kernel_for_dispatch_key(qualified, key):
            fn = getattr(_ext.CPU.module, native, packet) if backend == "cpp" else packet
            register(op, backend, fn, supports)


def kernels(op: str) -> dict[str, Kernel]:
    return _KERNELS.get(op, {})


def ops_of(backend: str) -> list[str]:
    return sorted(op for op, impls in _KERNELS.items() if backend in impls)


@functools.lru_cache(maxsize=None)
def _triton_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return False, f"triton not importable: {exc}"
    return True, f"triton {triton.__version__}"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def status(device_type: str) -> dict[str, tuple[bool, str]]:
    """``{backend: (usable on device_type, why / version)}`` for every backend."""
    out = {"reference": (True, "pure torch")}
    if device_type == "cpu":
        out["cpp"] = (_ext.CPU.loaded, "csrc/cpu loaded" if _ext.CPU.loaded else _ext.CPU.error)
    else:
        out["cpp"] = (False, "CPU tensors only")
    ok, why = _triton_status()
    if ok and device_type == "cpu" and not _interpreting():
        ok, why = False, "CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)"
    if ok and device_type == "cuda" and not torch.cuda.is_available():
        ok, why = False, "no CUDA device"
    out["triton"] = (ok, why)
    if device_type != "cuda":
        out["cuda"] = (False, "CUDA tensors only")
    elif not _ext.CUDA.loaded:
        out["cuda"] = (False, _ext.CUDA.error)
    elif not torch.cuda.is_available():
        out["cuda"] = (False, "csrc/cuda loaded, but no CUDA device")
    else:
        out["cuda"] = (True, "csrc/cuda loaded")
    return out


def forced_backend() -> Optional[str]:
    """The backend forced for this context (``use_backend``), else by ``PEFT_KERNELS_BACKEND``, else None."""
    name = _forced.get() or os.environ.get("PEFT_KERNELS_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise BackendUnavailableError(
            f"PEFT_KERNELS_BACKEND={name!r} is not a backend; choose one of {', '.join(BACKENDS)}"
        )
    return name


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force ``name`` for every op called inside the block, in this thread / async context only
    (``None`` restores automatic choice); the backward of an op keeps its forward's backend."""
    if name is not None and name not in BACKENDS:
        raise BackendUnavailableError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def register_autograd(op, backward: Callable, setup_context: Callable) -> None:
    """``op.register_autograd(backward, setup_context=...)`` with the backward run under the backend
    forced at forward time (autograd may run it on another thread, which has its own context)."""
    def setup(ctx, inputs, output):
        setup_context(ctx, inputs, output)
        ctx.peft_kernels_backend = _forced.get()

    def run_backward(ctx, *grads):
        with use_backend(getattr(ctx, "peft_kernels_backend", None)):
            return backward(ctx, *grads)

    op.register_autograd(run_backward, setup_context=setup)


def last_backend(op: str) -> Optional[str]:
    """The backend that ran the most recent call of ``op`` in this process (None before any)."""
    return _LAST.get(op)


def _usable(device_type: str) -> dict[str, tuple[bool, str]]:
    key = (device_type, _interpreting(), id(_ext.CPU), id(_ext.CUDA))
    cached = _STATUS_CACHE.get(key)
    if cached is None:
        cached = _STATUS_CACHE[key] = status(device_type)
    return cached


_STATUS_CACHE: dict = {}
_PLAIN = (torch.Tensor, torch.nn.Parameter)
# (op, device type, forced, interpreting, extensions) -> the usable kernels in preference order
# (cleared whenever a kernel is registered).
_SELECTED: dict = {}


def call(op: str, registered: Callable, args: tuple, device: torch.device, differentiable: tuple,
         memo: Optional[dict] = None, key: tuple = ()):
    """Run a forward op: straight on the selected kernel when nothing needs autograd (eager
    inference on plain tensors: no custom-op dispatch cost), else through the registered op
    (autograd, torch.compile, a dispatch mode such as FakeTensorMode, tensor subclasses).

    ``memo`` (a dict that lives in one model call) keeps the kernel chosen for ``(op, device,
    *key)``, where ``key`` holds what the kernels' ``supports`` checks read, when grad mode is off
    (nothing in the call can then need autograd): the call's later layers run it at once.
    """
    memo_key = None
    if memo is not None:
        memo_key = memo_key_of(op, device, key)
        kernel = memo.get(memo_key)
        if kernel is not None:
            return kernel(*args)
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or any(t is not None and type(t) not in _PLAIN for t in differentiable)
            or torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in differentiable)):
        return registered(*args)
    kernel = select(op, device, *args)[1]
    if memo_key is not None and not torch.is_grad_enabled():
        memo[memo_key] = kernel
    return kernel(*args)


def memo_key_of(op: str, device: torch.device, key: tuple) -> tuple:
    """Where :func:`call` keeps, in a call's memo, the kernel it chose for ``op`` on ``device`` with ``key``."""
    return (op, device, *key)


def _has_bf16(args: tuple) -> bool:
    return any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args)


def select(op: str, device: torch.device, *args) -> tuple[str, Callable]:
    """The backend name and kernel that will run ``op`` on ``args`` (tensors on ``device``)."""
    device_type = device.type if device.type in _PREFERENCE else "cpu"
    forced = forced_backend()
    key = (op, device_type, forced, _interpreting(), id(_ext.CPU), id(_ext.CUDA))
    candidates = _SELECTED.get(key)
    if candidates is None:
        candidates = _SELECTED[key] = _candidates(op, device, device_type, forced)
    for name, kernel in candidates:
        if name == "triton" and device_type == "cpu" and _has_bf16(args):
            if forced == "triton":
                raise BackendUnavailableError(
                    f"backend 'triton' forced for {op} on bfloat16 CPU tensors: the Triton interpreter computes "
                    "bf16 tl.dot wrongly (a known Triton limitation); use fp32/fp16 under TRITON_INTERPRET=1, "
                    "or bf16 on a GPU")
            continue
        if kernel.supports is not None and kernel.supports(*args) is not None:
            continue
        _LAST[op] = name
        return name, kernel.fn
    raise BackendUnavailableError(f"no backend can run {op} on {device}")  # reference takes anything


def _candidates(op: str, device: torch.device, device_type: str, forced: Optional[str]) -> list[tuple[str, Kernel]]:
    """The usable kernels of ``op`` in preference order (the forced backend first); what remains
    per call is each kernel's ``supports`` check on the arguments."""
    usable = _usable(device_type)
    order = _PREFERENCE[device_type]
    if forced is not None:
        ok, why = usable[forced]
        if not ok:
            raise BackendUnavailableError(f"backend {forced!r} forced but unavailable for {device} tensors: {why}")
        order = (forced,) + tuple(b for b in order if b != forced)
    impls = _KERNELS[op]
    return [(name, impls[name]) for name in order if name in impls and usable[name][0]]
