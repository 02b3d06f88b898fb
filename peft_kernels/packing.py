"""Packed (varlen) calls: the sequence boundaries of one model step, and a KV cache that holds
exactly the real tokens of each sequence.

A packed call runs S sequences back to back as one batch row (``[1, N]`` tokens, FlashAttention's
varlen layout): no padding is computed, and attention reads the boundaries from the current
:class:`Packing` (a ``contextvars`` value set with :func:`packed`, so concurrent calls never see
each other's). :class:`PackedLayer` keeps each layer's keys and values as ``[N_k, H, D]``, every
sequence's tokens contiguous, so the attention kernel reads them in place.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class Packing:
    """One packed step's sequence boundaries, shared by every layer of the call.

    Shapes: cu_seqlens_q, cu_seqlens_k int32 [S+1] (each sequence's new tokens; its keys after
    the cache update); cache_old_to_new [N_k_old] and cache_new_to_new [N_q] int64 (where the
    cached keys and the new keys go in the updated packed cache; None without a cache).
    Semantics: ``uniform`` says every sequence has the same number of queries and of keys, so
    the stream is an ``[S, L]`` batch viewed without a copy.
    """

    cu_seqlens_q: Tensor
    cu_seqlens_k: Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    uniform: bool
    cache_old_to_new: Optional[Tensor] = None
    cache_new_to_new: Optional[Tensor] = None

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens_q.shape[0] - 1


def cu_seqlens_of(lengths: Tensor) -> Tensor:
    """int32 [S+1] sequence boundaries (0, then the running sum) of ``lengths`` [S]."""
    return torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)


def make_packing(new_lengths: Tensor, past_lengths: Optional[Tensor] = None) -> Packing:
    """The :class:`Packing` of a step that adds ``new_lengths`` [S] tokens to sequences holding
    ``past_lengths`` [S] cached tokens (None: no cache yet).

    Semantics: reads the lengths on the host once (launch sizes), so the method layer calls it
    once per step, never per layer.
    """
    new_lengths = new_lengths.long()
    cu_q = cu_seqlens_of(new_lengths)
    if past_lengths is None:
        past_lengths = torch.zeros_like(new_lengths)
    past_lengths = past_lengths.to(new_lengths.device).long()
    total = new_lengths + past_lengths
    cu_k = cu_seqlens_of(total)
    stats = torch.stack([new_lengths.max(), new_lengths.min(), total.max(), total.min(), past_lengths.sum()]).tolist() \
        if new_lengths.numel() else [0, 0, 0, 0, 0]
    max_q, min_q, max_k, min_k, cached = stats
    old_to_new = new_to_new = None
    if cached:
        starts = cu_k[:-1].long()
        old_seq = torch.repeat_interleave(torch.arange(len(past_lengths), device=cu_k.device), past_lengths,
                                          output_size=cached)
        old_offset = torch.arange(cached, device=cu_k.device) - cu_seqlens_of(past_lengths)[:-1].long()[old_seq]
        old_to_new = starts[old_seq] + old_offset
        n_new = int(cu_q[-1])
        new_seq = torch.repeat_interleave(torch.arange(len(new_lengths), device=cu_k.device), new_lengths,
                                          output_size=n_new)
        new_offset = torch.arange(n_new, device=cu_k.device) - cu_q[:-1].long()[new_seq]
        new_to_new = starts[new_seq] + past_lengths[new_seq] + new_offset
    return Packing(cu_q, cu_k, int(max_q), int(max_k), max_q == min_q and max_k == min_k, old_to_new, new_to_new)


_PACKING: contextvars.ContextVar[Optional[Packing]] = contextvars.ContextVar("peft_kernels_packing", default=None)


def current_packing() -> Optional[Packing]:
    """The packing of the innermost :func:`packed` block of this thread / async task (None: padded call)."""
    return _PACKING.get()


@contextlib.contextmanager
def packed(packing: Packing) -> Iterator[Packing]:
    """Run the model calls inside the block as the packed step ``packing`` describes."""
    token = _PACKING.set(packing)
    try:
        yield packing
    finally:
        _PACKING.reset(token)


def _as_tokens(states: Tensor) -> Tensor:
    """[1, H, N, D] -> [N, H, D] (a view)."""
    return states[0].transpose(0, 1)


def _as_heads(tokens: Tensor) -> Tensor:
    """[N, H, D] -> [1, H, N, D] (a view)."""
    return tokens.transpose(0, 1)[None]


def _repacked(old: Tensor, new: Tensor, packing: Packing) -> Tensor:
    out = old.new_empty(old.shape[0] + new.shape[0], *old.shape[1:])
    out.index_copy_(0, packing.cache_old_to_new, old)
    out.index_copy_(0, packing.cache_new_to_new, new)
    return out


def keep_sequences(cache, lengths: Tensor, keep: Tensor) -> None:
    """Drop whole sequences from a packed cache, in place (continuous batching: finished requests leave).

    Shapes: lengths [S] cached tokens per sequence (int); keep [S] bool.
    Semantics: every layer keeps the kept sequences' tokens, in order; the caller's lengths for the
    next step are ``lengths[keep]``.
    """
    token_keep = torch.repeat_interleave(keep.to(lengths.device), lengths.long())
    index = token_keep.nonzero().squeeze(1)
    for layer in cache.layers:
        if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
            continue
        layer.keys = _as_heads(_as_tokens(layer.keys).index_select(0, index))
        layer.values = _as_heads(_as_tokens(layer.values).index_select(0, index))


def packed_cache():
    """A transformers ``Cache`` for packed calls: one ``PackedLayer`` per layer, created lazily."""
    from transformers.cache_utils import Cache

    return Cache(layer_class_to_replicate=packed_layer_class())


@functools.lru_cache(maxsize=None)
def packed_layer_class() -> type:
    """The ``PackedLayer`` class (built on first use: transformers is imported only then)."""
    from transformers.cache_utils import DynamicLayer

    class PackedLayer(DynamicLayer):
        """A cache layer holding each sequence's keys / values contiguously, real tokens only.

        Shapes: ``keys`` / ``values`` [1, H, N_k, D] views of [N_k, H, D] storage.
        Semantics: ``update`` inserts each sequence's new tokens after its cached ones at the
        places the current :class:`Packing` gives (one copy per layer and step, as a growing
        cache's concatenation costs); outside a packed call it refuses (a padded call would read
        the packed keys as one sequence).
        """

        def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
            packing = current_packing()
            if packing is None:
                raise RuntimeError("a packed KV cache was used outside a packed call")
            new_k, new_v = _as_tokens(key_states), _as_tokens(value_states)
            if not self.is_initialized or self.keys is None or self.keys.numel() == 0:
                self.lazy_initialization(key_states, value_states)
                keys, values = new_k, new_v
            else:
                keys = _repacked(_as_tokens(self.keys), new_k, packing)
                values = _repacked(_as_tokens(self.values), new_v, packing)
            self.keys, self.values = _as_heads(keys), _as_heads(values)
            return self.keys, self.values

    return PackedLayer

