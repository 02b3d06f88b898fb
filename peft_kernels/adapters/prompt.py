"""Prompt tuning and P-tuning (v1) adapters in a MultiAdapterModel: soft prompts before the text.

Both kinds put their rows' prompt modules into the call's :class:`Batch`; the host embeds the
whole batch and inserts every row's prompt in one fused ``soft_prompt_embed`` call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor, nn

from ..integrations.peft_io import prompt_table
from ..methods.soft_prompt import PromptEncoder, SoftPrompt
from .base import Batch, PeftConfig, TableKind
from .prefix import _positive


@dataclass
class PromptTuningConfig(PeftConfig):
    """Prompt tuning (Lester et al. 2021): ``num_virtual_tokens`` trained input embeddings before the text.

    Runs on ``soft_prompt_embed`` (embedding lookup and prompt insertion in one write).
    ``prompt_tuning_init``: ``"RANDOM"`` (N(0, 1)) or ``"SAMPLE_VOCAB"`` (copies of random vocabulary rows).
    """

    peft_type = "PROMPT_TUNING"
    num_virtual_tokens: int = 20
    prompt_tuning_init: str = "RANDOM"


@dataclass
class PTuningConfig(PeftConfig):
    """P-tuning v1 (Liu et al. 2021): virtual-token embeddings produced by an MLP or LSTM encoder.

    ``encoder_reparameterization_type`` ``"MLP"`` or ``"LSTM"``; ``encoder_hidden_size=None`` uses
    the model's hidden size. Runs on ``soft_prompt_embed``; the encoder folds into a plain prompt
    for inference.
    """

    peft_type = "P_TUNING"
    num_virtual_tokens: int = 20
    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: Optional[int] = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0


PROMPT_INITS = {"RANDOM": "random", "SAMPLE_VOCAB": "sample_vocab"}


class PromptTuningKind(TableKind):
    """Prompt-tuning adapters: one :class:`SoftPrompt` each (a PEFT directory's table loads as one)."""

    peft_type = "PROMPT_TUNING"
    key = "prompt"
    config_class = PromptTuningConfig

    def _hidden(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    def _add(self, name: str, module: nn.Module, config: dict, P: int) -> dict:
        self._add_table(name, module)
        return {**config, "num_virtual_tokens": P, "token_dim": self._hidden(), "num_transformer_submodules": 1}

    def _module(self, config: dict, P: int) -> nn.Module:
        init = PROMPT_INITS.get(config.get("prompt_tuning_init", PromptTuningConfig.prompt_tuning_init))
        if init is None:
            raise ValueError(f"prompt_tuning_init={config.get('prompt_tuning_init')!r}: choose RANDOM or SAMPLE_VOCAB "
                             "(TEXT needs a tokenizer: create a SoftPrompt(init='text', init_token_ids=...) and use "
                             "PromptTunedModel)")
        return SoftPrompt(P, self._hidden(), init, word_embeddings=self.model.get_input_embeddings().weight)

    def create(self, name: str, config: dict) -> dict:
        P = _positive(config, "num_virtual_tokens", self.config_class.num_virtual_tokens)
        return self._add(name, self._module(config, P), config, P)

    def load(self, name: str, config: dict, state: dict[str, Tensor]) -> dict:
        table = prompt_table(config, state)
        if table.shape[1] != self._hidden():
            raise ValueError(f"prompt_embeddings is {list(table.shape)} but this base model's hidden size is "
                             f"{self._hidden()}: wrong base model?")
        module = SoftPrompt(table.shape[0], table.shape[1])
        module.weight.data.copy_(table)
        return self._add(name, module, config, table.shape[0])

    def virtual_tokens(self, name: str) -> int:
        return self.tables[name].num_virtual_tokens

    def route(self, batch: Batch) -> None:
        for name in batch.rows_of(self):
            if name is not None:
                batch.prompts[name] = self.tables[name]


class PTuningKind(PromptTuningKind):
    """P-tuning adapters: a :class:`PromptEncoder` (MLP / LSTM) each; a PEFT directory holds its
    folded output, which loads as a fixed prompt."""

    peft_type = "P_TUNING"
    key = "ptuning"
    config_class = PTuningConfig

    def _module(self, config: dict, P: int) -> nn.Module:
        cfg = PTuningConfig.from_peft(config)
        return PromptEncoder(P, self._hidden(), cfg.encoder_hidden_size, kind=str(cfg.encoder_reparameterization_type).lower(),
                             num_layers=int(cfg.encoder_num_layers), dropout=float(cfg.encoder_dropout))
