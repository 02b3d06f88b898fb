"""One continuous-batching step: new requests' prefill packed with the running requests' decode.

The step is the continuous form of ``MultiAdapterModel``'s packed decode loop: sequence s of the
step feeds ``feeds[s]`` (a new request: its whole prompt, after its soft prompt when its adapter
has one; a running request: its last token) after the ``past[s]`` tokens the packed KV cache
already holds for it, under its own adapter, all in one varlen call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..cache_utils import cache_kw
from ..methods.packed_batch import pack_rows, packed_prompt_inputs
from ..multi_adapter import MultiAdapterModel


@dataclass
class StepResult:
    """What one step produced.

    Shapes: logits [S, V] (each sequence's last slot), next_positions [S] int64 (the position of
    each sequence's next token), slots [S] int64 (tokens this step added to each sequence's cache).
    """

    logits: Tensor
    next_positions: Tensor
    slots: Tensor


class StepRunner:
    """Runs packed mixed prefill / decode steps of one :class:`MultiAdapterModel` on one packed cache.

    Semantics: the caller keeps the cache's sequences in step order (new sequences last, with
    ``past`` 0) and drops finished ones with :func:`~peft_kernels.packing.keep_sequences`.
    """

    def __init__(self, model: MultiAdapterModel):
        why = model.pack_refusal()
        if why:
            raise ValueError(f"this model cannot be served with continuous batching: {why}")
        model.attention()
        self.model = model
        self.device = model.device
        self._cache_kw = cache_kw()
        self._keeps_logits = model.keeps_logits()
        self.memo: dict = {}  # what kinds derive from adapter weights, kept across steps (see forget)

    def forget(self) -> None:
        """Drop what was derived from adapter weights (call after loading or unloading an adapter)."""
        self.memo.clear()

    def virtual_tokens(self, name: Optional[str]) -> int:
        """Soft-prompt slots a new sequence of adapter ``name`` starts with (0: none)."""
        return self.model.virtual_tokens(name)

    @torch.no_grad()
    def run(self, cache, names: Sequence[Optional[str]], feeds: Sequence[Sequence[int]], past: Sequence[int],
            next_positions: Sequence[int]) -> StepResult:
        """Run one step.

        Shapes: names, feeds, past, next_positions [S] (feeds[s] holds >= 1 token ids;
        next_positions[s] is read only where past[s] > 0: a new sequence's positions start at its
        adapter's offset, as when it runs alone).
        Semantics: a sequence with ``past`` 0 gets its adapter's soft prompt in front of its feed;
        each sequence attends its own cached tokens (and its prefix) only.
        """
        S = len(names)
        device = self.device
        lengths = [len(f) for f in feeds]
        if S == 0 or min(lengths) < 1:
            raise ValueError(f"a step needs >= 1 sequence with >= 1 token each, got feed lengths {lengths}")
        width = max(lengths)
        mask = torch.arange(width)[None] < torch.tensor(lengths)[:, None]  # each feed left-aligned in its row
        ids = torch.zeros(S, width, dtype=torch.long)
        ids[mask] = torch.tensor([t for feed in feeds for t in feed], dtype=torch.long)
        ids, mask = ids.to(device), mask.to(device)
        new = [p == 0 for p in past]
        prompt_lens = torch.tensor([self.virtual_tokens(n) if fresh else 0 for n, fresh in zip(names, new)],
                                   dtype=torch.long, device=device)
        past_t = torch.tensor(list(past), dtype=torch.long, device=device)
        rows = pack_rows(mask, (S, width), device, prompt_lens=prompt_lens, past_lengths=past_t)
        with self.model.route(list(names), S, device, slots_per_row=rows.seq_lens, memo=self.memo) as batch:
            offset = batch.position_offset
            offset = (offset.to(device).long() if isinstance(offset, Tensor)
                      else torch.full((S,), int(offset), dtype=torch.long, device=device))
            running = torch.tensor([p > 0 for p in past], dtype=torch.bool, device=device)
            offset = torch.where(running, torch.tensor(list(next_positions), dtype=torch.long, device=device), offset)
            rows = rows.shifted(offset)
            prompt_rows = [n if fresh and n in batch.prompts else None for n, fresh in zip(names, new)]
            inputs = packed_prompt_inputs(self.model.model, batch.prompts,
                                          prompt_rows if any(p is not None for p in prompt_rows) else None,
                                          rows, input_ids=ids)
            last = rows.last_slots()
            keep = {"logits_to_keep": last} if self._keeps_logits else {}
            out = self.model.packed_call(rows, inputs, use_cache=True, **{self._cache_kw: cache}, **keep)
        logits = out.logits[0] if keep else out.logits[0, last]
        return StepResult(logits, rows.positions[0, last] + 1, rows.seq_lens)
