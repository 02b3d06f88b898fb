"""Token choice for packed generation: greedy or sampled, with transformers' own logits warpers.

Packed generation runs its own decode loop (transformers' ``generate`` expects padded rows); it
takes the generation settings it can reproduce exactly and :func:`packed_settings` says None for
any other, so the caller runs those through ``generate`` on a padded batch instead.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

# GenerationConfig fields the packed loop implements; any other non-default setting goes padded.
_SUPPORTED = {"max_new_tokens", "max_length", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "eos_token_id",
              "pad_token_id", "bos_token_id", "decoder_start_token_id", "use_cache", "transformers_version",
              "_from_model_config"}


@dataclass
class Sampling:
    """What a packed decode loop needs: max_new_tokens, the stop tokens, the pad token, the warpers."""

    max_new_tokens: int
    min_new_tokens: int
    eos: Optional[Tensor]
    pad_token_id: int
    do_sample: bool
    warpers: object

    def choose(self, sequences: Tensor, logits: Tensor, step: int) -> Tensor:
        """[B] next tokens from logits [B, V] at new-token ``step``; no stop token before
        ``min_new_tokens``. ``sequences`` [B, *] is handed to the warpers (temperature, top-k and
        top-p do not read it)."""
        if self.eos is not None and step < self.min_new_tokens:
            logits = logits.index_fill(-1, self.eos.to(logits.device), float("-inf"))
        if not self.do_sample:
            return logits.argmax(-1)
        scores = self.warpers(sequences, logits.float())
        return torch.multinomial(torch.softmax(scores, dim=-1), 1).squeeze(1)


def packed_settings(model: nn.Module, input_length: int, kwargs: dict) -> Optional[Sampling]:
    """The :class:`Sampling` of ``model.generate(**kwargs)``, or None when a setting needs transformers' loop.

    Semantics: the model's generation config updated by ``kwargs`` (as ``generate`` does);
    greedy, or sampling with temperature / top-k / top-p (transformers' warpers, its defaults);
    stops at ``eos_token_id`` (never before ``min_new_tokens``), pads finished rows with
    ``pad_token_id`` (eos when unset).
    """
    from transformers import GenerationConfig
    from transformers.generation import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    if set(kwargs) - _SUPPORTED:
        return None
    config = copy.deepcopy(getattr(model, "generation_config", None) or GenerationConfig())
    config.update(**kwargs)
    if any(key not in _SUPPORTED and value not in (None, False) for key, value in config.to_diff_dict().items()):
        return None
    max_new = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - input_length
    eos = config.eos_token_id
    eos_list = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = config.pad_token_id if config.pad_token_id is not None else (eos_list[0] if eos_list else 0)
    warpers = LogitsProcessorList()
    if config.do_sample:
        if config.temperature is not None and config.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k is not None and config.top_k != 0:
            warpers.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
        if config.top_p is not None and config.top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
    return Sampling(max(int(max_new), 0), int(config.min_new_tokens or 0), torch.tensor(eos_list) if eos_list else None, int(pad),
                    bool(config.do_sample), warpers)
