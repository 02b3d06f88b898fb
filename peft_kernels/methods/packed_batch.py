"""A padded batch as packed sequences: real tokens only, each row's soft prompt in front of them.

:func:`pack_rows` turns ``[B, L]`` inputs with any padding into the ``[1, N]`` stream of a packed
call (FlashAttention's varlen layout): sequence b is [its prompt slots ; its real tokens], with
positions counted from 0 per sequence (plus the row's prefix offset); :class:`PackedRows` maps
inputs in and outputs back out.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..ops import soft_prompt_concat_varlen, soft_prompt_embed_varlen
from ..packing import Packing, cu_seqlens_of, make_packing
from .prompt_model import _plain_embedding
from .selection import used_in_order
from .soft_prompt import stack_prompts

IGNORE_INDEX = -100


@dataclass
class PackedRows:
    """How B padded rows sit in one packed stream.

    Shapes: mask [B, L] bool (real tokens); prompt_lens, seq_lens [B] int64 (prompt slots; slots
    of the whole sequence); cu_tokens, cu_seqs int32 [B+1] (boundaries of the real tokens alone,
    and of the sequences); token_slots [N_tokens] int64 (where each real token sits in the
    stream); positions [1, N] int64; packing the prefill step's :class:`Packing`.
    """

    mask: Tensor
    prompt_lens: Tensor
    seq_lens: Tensor
    cu_tokens: Tensor
    cu_seqs: Tensor
    token_slots: Tensor
    positions: Tensor
    packing: Packing

    @property
    def total(self) -> int:
        return self.positions.shape[1]

    def tokens(self, per_row: Tensor) -> Tensor:
        """``per_row`` [B, L, ...] -> its real tokens [N_tokens, ...] in stream order."""
        return per_row[self.mask]

    def per_slot(self, per_row: Tensor) -> Tensor:
        """``per_row`` [B] -> [N]: each slot of the stream gets its row's value."""
        return torch.repeat_interleave(per_row, self.seq_lens, output_size=self.total)

    def labels(self, labels: Tensor) -> Tensor:
        """[1, N] labels of the stream: the rows' labels at their real tokens, -100 on prompt slots
        and on the first slot of every sequence (its previous slot belongs to another sequence)."""
        out = labels.new_full((self.total,), IGNORE_INDEX)
        out[self.token_slots] = self.tokens(labels)
        starts = self.cu_seqs[:-1].long()
        out[starts[self.seq_lens > 0]] = IGNORE_INDEX
        return out[None]

    def unpack(self, stream: Tensor) -> Tensor:
        """[1, N, ...] (every slot) or [1, N_tokens, ...] (the real tokens, as ``logits_to_keep=token_slots``
        leaves them) -> [B, L, ...]: each real token's output at its row and column, 0 on padding."""
        kept = stream[0] if stream.shape[1] == self.token_slots.numel() else stream[0, self.token_slots]
        if kept.shape[0] == self.mask.numel():  # no padding: the tokens are the rows, in order
            return kept.view(*self.mask.shape, *stream.shape[2:])
        out = stream.new_zeros(*self.mask.shape, *stream.shape[2:])
        out[self.mask] = kept
        return out

    def last_slots(self) -> Tensor:
        """[B] int64: the stream index of each sequence's last slot (rows must not be empty)."""
        return self.cu_seqs[1:].long() - 1

    def shifted(self, position_offset: Union[int, Tensor]) -> "PackedRows":
        """These rows with every sequence's positions shifted by ``position_offset`` (an int or [B])."""
        if isinstance(position_offset, int) and position_offset == 0:
            return self
        if isinstance(position_offset, Tensor):
            position_offset = self.per_slot(position_offset.to(self.positions.device).long())
        return dataclasses.replace(self, positions=self.positions + position_offset)


def pack_rows(attention_mask: Optional[Tensor], shape: tuple[int, int], device, *,
              prompt_lens: Optional[Tensor] = None, past_lengths: Optional[Tensor] = None) -> PackedRows:
    """The packed layout of a ``shape`` = (B, L) batch.

    Shapes: attention_mask [B, L] (1 = real token, padding anywhere) or None (all real);
    prompt_lens [B] soft-prompt slots per row or None; past_lengths [B] tokens a packed cache
    already holds per sequence, or None (no cache yet).
    Semantics: row b becomes sequence b = [prompt_lens[b] prompt slots ; its real tokens in
    order], positions ``0, 1, ...`` over the whole sequence, which is how the row counts its
    positions when it runs alone and unpadded (:meth:`PackedRows.shifted` adds a prefix's or a
    running request's offset). One host read (the lengths).
    """
    B, L = shape
    mask = (torch.ones(B, L, dtype=torch.bool, device=device) if attention_mask is None
            else attention_mask.to(device=device).bool())
    lengths = mask.sum(1)
    prompt_lens = torch.zeros_like(lengths) if prompt_lens is None else prompt_lens.to(device).long()
    seq_lens = lengths + prompt_lens
    cu_tokens = cu_seqlens_of(lengths)
    packing = make_packing(seq_lens, past_lengths)
    cu_seqs = packing.cu_seqlens_q
    total = int(cu_seqs[-1])  # one host read; make_packing already synchronised
    n_tokens = total - int(prompt_lens.sum())
    token_row = torch.repeat_interleave(torch.arange(B, device=device), lengths, output_size=n_tokens)
    token_slots = (torch.arange(n_tokens, device=device) - cu_tokens[:-1].long()[token_row]
                   + cu_seqs[:-1].long()[token_row] + prompt_lens[token_row])
    slot_row = torch.repeat_interleave(torch.arange(B, device=device), seq_lens, output_size=total)
    positions = (torch.arange(total, device=device) - cu_seqs[:-1].long()[slot_row])[None]
    return PackedRows(mask, prompt_lens, seq_lens, cu_tokens, cu_seqs, token_slots, positions, packing)


def packed_prompt_inputs(model: nn.Module, prompts: Mapping[str, nn.Module], names: Optional[Sequence[Optional[str]]],
                         rows: PackedRows, *, input_ids: Optional[Tensor] = None,
                         inputs_embeds: Optional[Tensor] = None) -> dict:
    """The model inputs of a packed call: ``input_ids`` [1, N] or ``inputs_embeds`` [1, N, H].

    Shapes: input_ids [B, L] or inputs_embeds [B, L, H] (padded rows); prompts ``{name: module}``
    returning [P_t, H]; names [B] each row's prompt (None: none) or None when no row has one.
    Semantics: without prompts the real tokens go in as they are; with prompts each sequence is
    [its prompt ; its token embeddings] in one fused varlen embed (a plain ``nn.Embedding``) or
    the model's embedding then one varlen insertion; a row without a prompt gets no slot.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    if names is None:
        return ({"input_ids": rows.tokens(input_ids)[None]} if input_ids is not None
                else {"inputs_embeds": rows.tokens(inputs_embeds)[None]})
    embedding = model.get_input_embeddings()
    used = used_in_order(names, list(prompts))
    dtype = embedding.weight.dtype if inputs_embeds is None else inputs_embeds.dtype
    bank, lens = stack_prompts([prompts[n]() for n in used], dtype=dtype)
    device = rows.positions.device
    index = torch.tensor([-1 if n is None else used.index(n) for n in names], dtype=torch.int32, device=device)
    kw = dict(cu_seqlens=rows.cu_tokens, prompt_index=index, prompt_lens=lens.to(device),
              cu_seqlens_out=rows.cu_seqs, total_out=rows.total, validate=False)
    if inputs_embeds is None and _plain_embedding(embedding):
        embeds = soft_prompt_embed_varlen(rows.tokens(input_ids), embedding.weight, bank.to(device), **kw)
    else:
        tokens = embedding(rows.tokens(input_ids)) if inputs_embeds is None else rows.tokens(inputs_embeds)
        embeds = soft_prompt_concat_varlen(tokens, bank.to(device), **kw)
    return {"inputs_embeds": embeds[None]}
