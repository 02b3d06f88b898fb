"""Soft prompts: prompt tuning and P-tuning v1 prompt modules, and per-task prompt banks.

A prompt module returns its virtual-token embeddings ``[P, H]``; :func:`stack_prompts` turns
several into the bank ``[T, P_max, H]`` + lengths that the ``soft_prompt_*`` ops read, so one
batch can mix tasks (rows pick a prompt with ``prompt_index``, ``-1`` = none).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

INITS = ("random", "sample_vocab", "text")


class SoftPrompt(nn.Module):
    """Prompt tuning: ``num_virtual_tokens`` trained embeddings.

    Shapes: ``forward()`` returns ``weight`` [P, H].
    Semantics: ``init="random"`` draws N(0, 1) like ``nn.Embedding``; ``"sample_vocab"`` copies
    P random rows of ``word_embeddings``; ``"text"`` copies the rows of ``init_token_ids`` (the
    tokenised init text), repeated or cut to P, as PEFT's TEXT init does.
    """

    def __init__(
        self,
        num_virtual_tokens: int,
        hidden_size: int,
        init: str = "random",
        *,
        word_embeddings: Optional[Tensor] = None,
        init_token_ids: Optional[Sequence[int]] = None,
        generator: Optional[torch.Generator] = None,
    ):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init={init!r}: choose one of {', '.join(INITS)}")
        if num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be >= 1, got {num_virtual_tokens}")
        P = num_virtual_tokens
        if init == "random":
            weight = torch.randn(P, hidden_size, generator=generator)
        else:
            if word_embeddings is None or word_embeddings.dim() != 2 or word_embeddings.shape[1] != hidden_size:
                got = None if word_embeddings is None else list(word_embeddings.shape)
                raise ValueError(f"init={init!r} needs word_embeddings [V, H={hidden_size}], got {got}")
            V = word_embeddings.shape[0]
            if init == "sample_vocab":
                ids = torch.randint(0, V, (P,), generator=generator)
            else:
                if not init_token_ids:
                    raise ValueError("init='text' needs init_token_ids (the tokenised init text)")
                reps = -(-P // len(init_token_ids))
                ids = torch.tensor((list(init_token_ids) * reps)[:P])
                if int(ids.min()) < 0 or int(ids.max()) >= V:
                    raise ValueError(f"init_token_ids must be in [0, {V}), got [{int(ids.min())}, {int(ids.max())}]")
            weight = word_embeddings.detach()[ids.to(word_embeddings.device)].float().cpu().clone()
        self.weight = nn.Parameter(weight)

    @property
    def num_virtual_tokens(self) -> int:
        return self.weight.shape[0]

    def forward(self) -> Tensor:
        return self.weight


class PromptEncoder(nn.Module):
    """P-tuning v1: virtual-token embeddings re-parameterised by an MLP or a bidirectional LSTM.

    Shapes: ``forward()`` returns [P, H]; the module layout (``embedding``, ``mlp_head``,
    ``lstm_head``) matches PEFT's ``PromptEncoder`` so its state dicts load unchanged.
    Semantics: MLP: H -> hidden -> hidden -> H with ReLUs; LSTM: biLSTM(H -> hidden) then
    2*hidden -> 2*hidden -> H. :meth:`fold` returns the equivalent :class:`SoftPrompt` for
    inference (the encoder output is constant once trained).
    """

    def __init__(
        self,
        num_virtual_tokens: int,
        hidden_size: int,
        encoder_hidden_size: Optional[int] = None,
        kind: str = "mlp",
        num_layers: int = 2,
        dropout: float = 0.0,
    ):
        super().__init__()
        if kind not in ("mlp", "lstm"):
            raise ValueError(f"kind={kind!r}: choose 'mlp' or 'lstm'")
        hidden = encoder_hidden_size or hidden_size
        self.kind = kind
        self.embedding = nn.Embedding(num_virtual_tokens, hidden_size)
        if kind == "lstm":
            self.lstm_head = nn.LSTM(hidden_size, hidden, num_layers=num_layers, dropout=dropout,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, hidden_size))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(hidden_size, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                          nn.ReLU(), nn.Linear(hidden, hidden_size))

    @property
    def num_virtual_tokens(self) -> int:
        return self.embedding.num_embeddings

    def forward(self) -> Tensor:
        x = self.embedding.weight
        if self.kind == "lstm":
            x = self.lstm_head(x[None])[0][0]
        return self.mlp_head(x)

    @torch.no_grad()
    def fold(self) -> SoftPrompt:
        folded = SoftPrompt(self.num_virtual_tokens, self.embedding.embedding_dim)
        folded.weight.data = self().detach().float().clone()
        return folded


def stack_prompts(
    prompts: Sequence[Tensor], dtype: Optional[torch.dtype] = None, align: str = "left"
) -> tuple[Tensor, Tensor]:
    """Stack per-task prompts into one bank.

    Shapes: prompts: T tensors [P_t, H]; returns (bank [T, max P_t, H], lens [T] int32).
    Semantics: shorter prompts are zero-padded at the end (``align="left"``: the layout the
    ops' ``prompt_lens`` masks) or at the front (``"right"``: the last prompt slot sits next
    to the first token, so a causal LM predicts that token from a real slot; the caller masks
    the leading padding). Differentiable w.r.t. every prompt.
    """
    if align not in ("left", "right"):
        raise ValueError(f"align={align!r}: choose 'left' or 'right'")
    if not prompts:
        raise ValueError("stack_prompts needs at least one prompt")
    H = prompts[0].shape[-1]
    for i, p in enumerate(prompts):
        if p.dim() != 2 or p.shape[1] != H:
            raise ValueError(f"prompt {i} must be [P, H={H}], got {list(p.shape)}")
    dtype = dtype or prompts[0].dtype
    P = max(p.shape[0] for p in prompts)
    pad = (lambda n: (0, 0, 0, n)) if align == "left" else (lambda n: (0, 0, n, 0))
    bank = torch.stack([nn.functional.pad(p.to(dtype), pad(P - p.shape[0])) for p in prompts])
    lens = torch.tensor([p.shape[0] for p in prompts], dtype=torch.int32, device=bank.device)
    return bank, lens
