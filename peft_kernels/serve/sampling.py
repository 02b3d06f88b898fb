"""Each request's own token choice: greedy, or sampled with its temperature, top-p and seed."""
from __future__ import annotations

import random
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..methods.packed_generation import Sampling, packed_settings


def sampling_of(model: nn.Module, temperature: float, top_p: float, top_k: int = 0) -> Sampling:
    """``packed_settings``' stop tokens and logits warpers of a request's settings (temperature 0:
    greedy); ValueError when the model's generation config has settings continuous batching
    cannot reproduce."""
    greedy = temperature == 0
    kwargs = dict(max_new_tokens=1, do_sample=not greedy)  # the engine counts each request's tokens itself
    if not greedy:
        kwargs.update(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k))
    settings: Optional[Sampling] = packed_settings(model, 0, kwargs)
    if settings is None:
        raise ValueError(f"the model's generation config has settings continuous batching cannot reproduce "
                         f"({sorted(kwargs)} given)")
    return settings


class Chooser:
    """The token choice of one request: its :func:`sampling_of` settings, and a generator of its
    own (seeded with the request's seed, else at random) so that a seeded request samples the
    same tokens whatever else is in the batch."""

    def __init__(self, settings: Sampling, seed: Optional[int] = None, device: torch.device = torch.device("cpu")):
        self.settings = settings
        self.eos: list[int] = [] if settings.eos is None else settings.eos.tolist()
        self.generator: Optional[torch.Generator] = None
        if settings.do_sample:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(seed if seed is not None else random.SystemRandom().randrange(2 ** 63))

    def sample(self, logits: Tensor, step: int) -> Tensor:
        """A [1] token from this request's logits [1, V] at its new-token ``step``."""
        if self.settings.eos is not None and step < self.settings.min_new_tokens:
            logits = logits.index_fill(-1, self.settings.eos.to(logits.device), float("-inf"))
        scores = self.settings.warpers(None, logits.float())
        return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=self.generator)[:, 0]


def choose(choosers: Sequence[Chooser], logits: Tensor, steps: Sequence[int]) -> list[int]:
    """Each sequence's next token.

    Shapes: logits [S, V]; choosers, steps [S] (steps[s]: tokens sequence s generated so far).
    Semantics: greedy rows take one batched argmax (``Sampling.choose``, as ``generate`` does);
    sampled rows draw from their own generator.
    """
    tokens = logits.argmax(-1)
    for s, (chooser, step) in enumerate(zip(choosers, steps)):
        if chooser.generator is not None:
            tokens[s] = chooser.sample(logits[s:s + 1], step)[0]
        elif chooser.settings.eos is not None and step < chooser.settings.min_new_tokens:
            tokens[s] = chooser.settings.choose(None, logits[s:s + 1], step)[0]
    return tokens.tolist()
