"""The interface every adapter kind implements, the per-call :class:`Batch` and the kind registry.

A *kind* (LoRA, prefix tuning, prompt tuning, ...) is one :class:`AdapterKind` subclass that
knows how to create, load, save, export, remove and route its adapters. A
:class:`~peft_kernels.MultiAdapterModel` holds one instance of each kind it uses and, per call,
asks each to :meth:`~AdapterKind.route` the batch's rows that use it. Adding a kind is one new
file with its config dataclass and kind class, and one :func:`register_kind` line in
``adapters/__init__.py``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, fields
from typing import ClassVar, Optional, Union

import torch
from torch import Tensor, nn

from ..methods.geometry import model_device


class PeftConfig:
    """Mixin of the config dataclasses: conversion to and from PEFT-style configs.

    Subclasses set ``peft_type`` (and may override :meth:`to_peft_dict`); their dataclass field
    defaults are the library's one source of defaults.
    """

    peft_type: ClassVar[str]

    def to_peft_dict(self) -> dict:
        """The PEFT ``adapter_config.json`` dict of this config."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for key, value in values.items():
            if isinstance(value, (set, tuple)):
                values[key] = sorted(value) if isinstance(value, set) else list(value)
        return {"peft_type": self.peft_type, **values}

    @classmethod
    def from_peft(cls, config) -> "PeftConfig":
        """This dataclass from a PEFT config object or dict (unknown keys ignored, missing ones defaulted)."""
        config = as_config_dict(config)
        return cls(**{f.name: config[f.name] for f in fields(cls) if f.name in config})


def as_config_dict(config) -> dict:
    """A plain dict of a PEFT config object, one of our config dataclasses, or a dict."""
    if isinstance(config, PeftConfig):
        return config.to_peft_dict()
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, dict):
        raise TypeError(f"an adapter config must be a dict, a peft config or a peft_kernels config, "
                        f"got {type(config).__name__}")
    config = {k: (v.value if hasattr(v, "value") else v) for k, v in dict(config).items()}
    if isinstance(config.get("target_modules"), (set, frozenset)):
        config["target_modules"] = sorted(config["target_modules"])
    return config


@dataclass
class Batch:
    """One call's routing, built by the kinds and kept in the call (never on a module).

    Semantics: ``names`` [B] is each row's adapter (None: base model); ``kind_of`` maps each
    of these names to its kind's ``peft_type``; kinds enter their per-call state (a
    ``contextvars``-backed ``use`` block) with :meth:`enter`; soft-prompt kinds put each
    row's prompt module in ``prompts`` (``{name: module}``) so one fused embed serves them all.
    A packed call sets ``slots_per_row`` [B] (the stream slots of each row's sequence): per-token
    indices then come from :meth:`token_index`. Prefix kinds put each row's position offset in
    ``position_offset``. ``memo`` (None, or a dict the caller keeps across calls whose adapter
    weights it knows to be unchanged, as a server's steps) lets kinds reuse what they derive
    from the weights (the prefix kind: its stacked banks).
    """

    names: list[Optional[str]]
    kind_of: dict[str, str]
    device: torch.device
    stack: contextlib.ExitStack
    prompts: dict[str, nn.Module] = field(default_factory=dict)
    slots_per_row: Optional[Tensor] = None
    position_offset: Union[int, Tensor] = 0
    memo: Optional[dict] = None

    def token_index(self, per_row: Tensor) -> Tensor:
        """A per-row index [B] as the layers consume it: unchanged in a padded call, one entry per
        stream slot ([N]) in a packed one."""
        if self.slots_per_row is None:
            return per_row
        return torch.repeat_interleave(per_row, self.slots_per_row.to(per_row.device))

    def rows_of(self, kind: "AdapterKind") -> list[Optional[str]]:
        """Each row's adapter if it is of ``kind``, else None."""
        return [n if n is not None and self.kind_of[n] == kind.peft_type else None for n in self.names]

    def enter(self, context) -> None:
        self.stack.enter_context(context)

    @property
    def prompt_rows(self) -> Optional[list[Optional[str]]]:
        """Each row's prompt adapter (None: no prompt), or None when no row has one."""
        if not self.prompts:
            return None
        return [n if n in self.prompts else None for n in self.names]


class AdapterKind(nn.Module):
    """One kind of adapter inside a :class:`~peft_kernels.MultiAdapterModel` (the *host*).

    Semantics: ``peft_type`` is the ``adapter_config.json`` type it reads and writes;
    ``config_class`` the dataclass of its defaults. ``create``/``load`` validate everything
    before changing the model (a failure leaves it exactly as before) and return the config
    dict :meth:`save` will write. Its trainable tensors are parameters of this module or of
    layers it swapped into the host's model.
    """

    peft_type: ClassVar[str]
    key: ClassVar[str]  # the attribute name under MultiAdapterModel.kinds
    config_class: ClassVar[type]

    def __init__(self, host: nn.Module):
        super().__init__()
        object.__setattr__(self, "host", host)  # a plain reference, not a submodule: the host owns this kind
        self.names: list[str] = []

    @property
    def model(self) -> nn.Module:
        return self.host.model

    def device(self) -> torch.device:
        return model_device(self.model)

    def _placed(self, module: nn.Module) -> nn.Module:
        """``module`` on the model's device, in the host's train/eval mode."""
        return module.to(self.device()).train(self.host.training)

    # ------------------------------------------------------------------ lifecycle (override)

    def create(self, name: str, config: dict) -> dict:
        """Add a new trainable adapter from a PEFT-style config dict; returns the config to store."""
        raise NotImplementedError

    def load(self, name: str, config: dict, state: dict[str, Tensor]) -> dict:
        """Add an adapter from a PEFT directory's config and state dict; returns the config to store.

        Raises ValueError (turned into AdapterFormatError by the host) when it does not fit the model.
        """
        raise NotImplementedError

    def state_dict_of(self, name: str) -> dict[str, Tensor]:
        """The adapter's tensors under the key names its directory format uses (detached)."""
        raise NotImplementedError

    def remove(self, name: str) -> None:
        """Remove the adapter; the other adapters are unchanged."""
        raise NotImplementedError

    def route(self, batch: Batch) -> None:
        """Set up this call for the rows of ``batch`` that use this kind (enter per-call state)."""
        raise NotImplementedError

    def virtual_tokens(self, name: str) -> int:
        """Soft-prompt slots adapter ``name`` puts before a row's tokens (0 unless a prompt kind)."""
        return 0

    def position_offset(self, name: str) -> int:
        """The position a row of adapter ``name`` gives its first token (0 unless a prefix kind)."""
        return 0


class TableKind(AdapterKind):
    """A kind whose adapters are modules returning PEFT's ``prompt_embeddings`` table (prefix and
    soft-prompt kinds): ``tables[name]()`` is what a directory stores, and what is removed with it."""

    def __init__(self, host: nn.Module):
        super().__init__(host)
        self.tables = nn.ModuleDict()

    def _add_table(self, name: str, module: nn.Module) -> None:
        self.tables[name] = self._placed(module)
        self.names.append(name)

    def state_dict_of(self, name: str) -> dict[str, Tensor]:
        return {"prompt_embeddings": self.tables[name]().detach()}

    def remove(self, name: str) -> None:
        del self.tables[name]
        self.names.remove(name)


KINDS: dict[str, type[AdapterKind]] = {}


def register_kind(kind: type[AdapterKind]) -> type[AdapterKind]:
    """Make ``kind`` available to every MultiAdapterModel under its ``peft_type``."""
    KINDS[kind.peft_type] = kind
    return kind


def kind_class(peft_type) -> type[AdapterKind]:
    """The registered kind of ``peft_type``; ValueError listing the supported types otherwise."""
    kind = KINDS.get(peft_type)
    if kind is None:
        raise ValueError(f"peft_type {peft_type!r} is not supported; choose one of {', '.join(KINDS)}")
    return kind
