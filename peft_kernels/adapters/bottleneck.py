"""Bottleneck adapters (Houlsby / Pfeiffer) in a MultiAdapterModel, next to every other kind."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from torch import Tensor, nn

from ..methods.bottleneck import BottleneckSites
from .base import AdapterKind, Batch, PeftConfig


@dataclass
class BottleneckConfig(PeftConfig):
    """Bottleneck adapters: ``x + scaling * (W_up act(W_down x + b_down) + b_up)`` on sub-layer outputs.

    ``placement="houlsby"``: after attention and after the feed-forward block of every layer
    (Houlsby et al. 2019); ``"pfeiffer"``: after the feed-forward block only (Pfeiffer et al.
    2021). Bottleneck size ``r`` (default ``hidden // reduction_factor``); ``W_up`` starts at 0.
    ``attn_modules`` / ``ffn_modules`` name the hooked modules for architectures other than
    Llama-style, GPT-2 and BERT-style ones. ``train_head`` also trains a ``classifier`` / ``score``
    task head (``api.apply`` only). Both projections run on the ``lora_shrink`` / ``lora_expand``
    ops, so rows may mix adapters. PEFT has no bottleneck type: directories use
    ``peft_type: "BOTTLENECK"`` and keys ``<module>.down|down_bias|up|up_bias``.
    """

    peft_type = "BOTTLENECK"
    r: Optional[int] = None
    reduction_factor: int = 16
    placement: str = "houlsby"
    non_linearity: str = "relu"
    scaling: float = 1.0
    attn_modules: Union[None, str, list] = None
    ffn_modules: Union[None, str, list] = None
    train_head: bool = False


class BottleneckKind(AdapterKind):
    """Bottleneck adapters: one bank per hooked site (:class:`BottleneckSites`), one slot per adapter."""

    peft_type = "BOTTLENECK"
    key = "bottleneck"
    config_class = BottleneckConfig

    def __init__(self, host: nn.Module):
        super().__init__(host)
        self.sites = BottleneckSites(self.model, host.adapter_dtype)

    def _add(self, name: str, cfg: BottleneckConfig, **where) -> dict:
        settings = self.sites.add(name, cfg.r, reduction_factor=cfg.reduction_factor, placement=cfg.placement,
                                  non_linearity=cfg.non_linearity, scaling=cfg.scaling, **where)
        self.sites.train(self.host.training)
        self.names.append(name)
        return {**cfg.to_peft_dict(), "r": settings["r"], "modules": settings["modules"]}

    def create(self, name: str, config: dict) -> dict:
        cfg = BottleneckConfig.from_peft(config)
        return self._add(name, cfg, attn_modules=cfg.attn_modules, ffn_modules=cfg.ffn_modules)

    def load(self, name: str, config: dict, state: dict[str, Tensor]) -> dict:
        cfg = BottleneckConfig.from_peft(config)
        modules = config.get("modules")
        if not modules:
            raise ValueError("a BOTTLENECK config needs 'modules' (the hooked module names)")
        stored = self._add(name, BottleneckConfig.from_peft({**config, "placement": "houlsby"}),
                           ffn_modules=list(modules))
        try:
            self.sites.load_state(name, state)
        except ValueError:
            self.remove(name)
            raise
        return {**stored, "placement": cfg.placement}

    def state_dict_of(self, name: str) -> dict[str, Tensor]:
        return self.sites.state_of(name)

    def remove(self, name: str) -> None:
        self.sites.remove(name)
        self.names.remove(name)

    def route(self, batch: Batch) -> None:
        index = self.sites.index(batch.rows_of(self), batch.device)
        if index is not None:
            batch.enter(self.sites.routing.use(batch.token_index(index)))
