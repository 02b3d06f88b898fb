"""KPT (knowledgeable prompt-tuning): a verbalizer over sets of label words per class.

A masked LM reads a prompt such as "[CLS] text It was [MASK] . [SEP]"; the class is read off
its prediction at the mask through *sets* of label words per class (expanded from a knowledge
base), refined on an unlabeled support set, calibrated by each word's prior over that support
set, and aggregated per class by the mean or by learnable per-word weights. The head runs on
:func:`peft_kernels.label_word_logits`, so the ``[B, V]`` vocabulary logits are never formed.

Label words are token ids (the method needs no tokenizer): a word given as several sub-token
ids is represented by its first sub-token, as KPT does; a word listed twice in one class counts once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..ops.label_words import AGGREGATES, label_word_logits

__all__ = ["KPTConfig", "KPTVerbalizer", "kpt_template"]

LabelWord = Union[int, Sequence[int]]


@dataclass
class KPTConfig:
    """Settings of a :class:`KPTVerbalizer`.

    aggregate: "mean" (mean probability of the class's words) or "weighted" (learnable per-word
    weights, a softmax within each class, initialised uniform). calibrate: divide each word's
    probability by its prior on the support set once :meth:`KPTVerbalizer.fit_support` ran.
    frequency_threshold: frequency refinement drops words whose support prior is below it (0: off).
    relevance_threshold: relevance refinement keeps words whose relevance score is at least it
    (None: off; KPT's cut keeps words scoring about 1 or more). min_words_per_class: refinement
    always keeps this many of a class's best-scoring words. mask_token_id: finds the mask when
    forward gets no mask_positions.
    """

    aggregate: str = "mean"
    calibrate: bool = True
    frequency_threshold: float = 0.0
    relevance_threshold: Optional[float] = None
    min_words_per_class: int = 1
    mask_token_id: Optional[int] = None

    def __post_init__(self):
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {self.aggregate!r}")
        if self.min_words_per_class < 1:
            raise ValueError(f"min_words_per_class must be >= 1, got {self.min_words_per_class}")
        if self.frequency_threshold < 0:
            raise ValueError(f"frequency_threshold must be >= 0, got {self.frequency_threshold}")


def kpt_template(
    texts: Sequence[Sequence[int]],
    *,
    cls_id: int,
    sep_id: int,
    mask_id: int,
    before_mask: Sequence[int] = (),
    after_mask: Sequence[int] = (),
    pad_id: int = 0,
    max_length: Optional[int] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Wrap token-id texts in KPT's prompt: ``[CLS] text <before_mask> [MASK] <after_mask> [SEP]``.

    Shapes: texts B lists of token ids. Returns (input_ids [B, L] int64, attention_mask [B, L]
    int64, mask_positions [B] int64), right-padded with pad_id to the longest row.

    Semantics: before_mask / after_mask are the template's ids ("It was" and "." for the
    sentiment template); with max_length, each text is cut (from its end) so its row fits.
    """
    fixed = 3 + len(before_mask) + len(after_mask)
    if max_length is not None and max_length < fixed:
        raise ValueError(f"max_length={max_length} leaves no room: the template alone takes {fixed} tokens")
    rows, masks = [], []
    for text in texts:
        text = list(text)
        if max_length is not None:
            text = text[: max_length - fixed]
        row = [cls_id, *text, *before_mask, mask_id, *after_mask, sep_id]
        masks.append(1 + len(text) + len(before_mask))
        rows.append(row)
    L = max((len(r) for r in rows), default=fixed)
    input_ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), L, dtype=torch.long)
    for b, row in enumerate(rows):
        input_ids[b, : len(row)] = torch.tensor(row)
        attention_mask[b, : len(row)] = 1
    return input_ids, attention_mask, torch.tensor(masks, dtype=torch.long)


def _first_sub_tokens(label_words: Sequence[Sequence[LabelWord]]) -> list[list[int]]:
    classes = []
    for c, words in enumerate(label_words):
        ids: list[int] = []
        for word in words:
            if isinstance(word, (list, tuple)):
                if not word:
                    raise ValueError(f"label_words[{c}] holds an empty sub-token list")
                word = word[0]
            word = int(word)
            if word not in ids:
                ids.append(word)
        if not ids:
            raise ValueError(f"label_words[{c}] is empty: every class needs at least one label word")
        classes.append(ids)
    return classes


class KPTVerbalizer(nn.Module):
    """A knowledgeable verbalizer on a BERT-style masked LM (``BertForMaskedLM`` and kin).

    Shapes: label_words C lists (one per class) of token ids, or of sub-token id lists (the
    first sub-token stands for the word). forward returns class scores [B, C].

    Semantics: the encoder runs as usual; the hidden state at each row's mask goes through the
    head's transform (``cls.predictions.transform``) and then, instead of the decoder, through
    :func:`label_word_logits` on the decoder's weight and bias: y[b, c] = log sum_{w in c}
    alpha_w p(w | x_b) / prior(w), p the full-vocabulary softmax at the mask, prior the word's
    mean probability over the support set (only after :meth:`fit_support`, with calibrate), alpha
    1/|c| or softmax(word_weights) within c. The model's own parameters are used as they are
    (freeze them, or some of them, as the training setup asks).
    """

    def __init__(self, model: nn.Module, label_words: Sequence[Sequence[LabelWord]], config: Optional[KPTConfig] = None):
        super().__init__()
        self.config = config or KPTConfig()
        head = getattr(getattr(model, "cls", None), "predictions", None)
        if head is None or not hasattr(head, "transform") or not isinstance(getattr(head, "decoder", None), nn.Linear):
            raise TypeError(f"KPTVerbalizer needs a BERT-style masked LM with cls.predictions.transform and "
                            f"cls.predictions.decoder (nn.Linear); got {type(model).__name__}")
        self.model = model
        self.encoder = model.base_model
        self.transform = head.transform
        self.decoder = head.decoder
        classes = _first_sub_tokens(label_words)
        V = self.decoder.weight.shape[0]
        bad = [w for ids in classes for w in ids if not 0 <= w < V]
        if bad:
            raise ValueError(f"label word ids {bad[:5]} are outside the vocabulary [0, {V})")
        self.register_buffer("word_ids", torch.zeros(0, dtype=torch.long), persistent=True)
        self.register_buffer("class_offsets", torch.zeros(1, dtype=torch.long), persistent=True)
        self.register_buffer("calibration", None, persistent=True)
        self.word_weights = nn.Parameter(torch.zeros(0)) if self.config.aggregate == "weighted" else None
        self._set_words(classes, None)

    # ---------------------------------------------------------------- label-word sets
    @property
    def label_words(self) -> list[list[int]]:
        """The current label-word token ids, one list per class (after any refinement)."""
        ids, off = self.word_ids.tolist(), self.class_offsets.tolist()
        return [ids[a:b] for a, b in zip(off, off[1:])]

    @property
    def num_classes(self) -> int:
        return self.class_offsets.shape[0] - 1

    def _set_words(self, classes: list[list[int]], keep: Optional[list[int]]) -> None:
        """Install the label-word sets; ``keep`` (flat indices into the previous words) carries their weights."""
        device = self.decoder.weight.device
        flat = [w for ids in classes for w in ids]
        offsets = [0]
        for ids in classes:
            offsets.append(offsets[-1] + len(ids))
        self.word_ids = torch.tensor(flat, dtype=torch.long, device=device)
        self.class_offsets = torch.tensor(offsets, dtype=torch.long, device=device)
        if self.word_weights is not None:
            old = self.word_weights.detach()
            new = old[torch.tensor(keep, dtype=torch.long, device=old.device)] if keep is not None else \
                torch.zeros(len(flat), device=device)
            self.word_weights = nn.Parameter(new.clone())

    # ---------------------------------------------------------------- model pieces
    def mask_hidden(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                    mask_positions: Optional[Tensor] = None) -> Tensor:
        """The head-transformed hidden state at each row's mask.

        Shapes: input_ids [B, L]; attention_mask [B, L] or None; mask_positions [B] or None.
        Returns [B, H]. Semantics: without mask_positions, each row must hold exactly one
        config.mask_token_id; the transform runs on those B positions only.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, L], got {list(input_ids.shape)}")
        B, L = input_ids.shape
        if mask_positions is None:
            if self.config.mask_token_id is None:
                raise ValueError("pass mask_positions [B], or set KPTConfig.mask_token_id to find the mask")
            is_mask = input_ids == self.config.mask_token_id
            counts = is_mask.sum(1)
            if not bool((counts == 1).all()):
                raise ValueError(f"every row needs exactly one mask token {self.config.mask_token_id}; "
                                 f"rows hold {counts.tolist()} (input_ids {list(input_ids.shape)})")
            mask_positions = is_mask.long().argmax(1)
        else:
            if mask_positions.shape != (B,):
                raise ValueError(f"mask_positions must be [B={B}], got {list(mask_positions.shape)}")
            if B and (int(mask_positions.min()) < 0 or int(mask_positions.max()) >= L):
                raise ValueError(f"mask_positions must be in [0, {L}), got {mask_positions.tolist()}")
        sequence = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
        rows = torch.arange(B, device=sequence.device)
        return self.transform(sequence[rows, mask_positions.to(sequence.device)])

    def _head(self, hidden: Tensor, word_ids: Tensor, class_offsets: Tensor, word_weights: Optional[Tensor],
              calibration: Optional[Tensor], aggregate: str) -> Tensor:
        return label_word_logits(hidden, self.decoder.weight, self.decoder.bias, word_ids, class_offsets,
                                 word_weights=word_weights, calibration=calibration, aggregate=aggregate,
                                 validate=False)

    def word_log_probs(self, hidden: Tensor) -> Tensor:
        """log p(w | x) of every current label word at the mask: [B, H] -> [B, W] (no calibration)."""
        singletons = torch.arange(self.word_ids.shape[0] + 1, device=self.word_ids.device)
        return self._head(hidden, self.word_ids, singletons, None, None, "mean")

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                mask_positions: Optional[Tensor] = None) -> Tensor:
        """Class scores of a batch of prompts.

        Shapes: input_ids [B, L]; attention_mask [B, L] or None; mask_positions [B] or None (then
        config.mask_token_id finds the mask). Returns [B, C] (a log of aggregated probabilities:
        feed it to cross_entropy as logits).
        Semantics: see the class docstring.
        """
        hidden = self.mask_hidden(input_ids, attention_mask, mask_positions)
        calibration = self.calibration if self.config.calibrate else None
        return self._head(hidden, self.word_ids, self.class_offsets, self.word_weights, calibration,
                          self.config.aggregate)

    # ---------------------------------------------------------------- support set: refinement + calibration
    @torch.no_grad()
    def support_probs(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                      mask_positions: Optional[Tensor] = None, batch_size: int = 32) -> Tensor:
        """p(w | x) of every current label word on each support example: [S, L] -> [S, W] (fp32)."""
        out = []
        for s in range(0, input_ids.shape[0], batch_size):
            sl = slice(s, s + batch_size)
            hidden = self.mask_hidden(input_ids[sl], None if attention_mask is None else attention_mask[sl],
                                      None if mask_positions is None else mask_positions[sl])
            out.append(self.word_log_probs(hidden).float().exp())
        return torch.cat(out) if out else self.word_ids.new_zeros(0, self.word_ids.shape[0], dtype=torch.float32)

    @torch.no_grad()
    def fit_support(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                    mask_positions: Optional[Tensor] = None, batch_size: int = 32) -> dict:
        """Refine the label words and set their calibration from an unlabeled support set.

        Shapes: input_ids [S, L] (S >= 1 prompts), attention_mask [S, L] or None, mask_positions
        [S] or None. Returns {"prior": [W] (before refinement), "relevance": [W] or None,
        "kept": the kept label words per class}.

        Semantics: prior(w) = mean over the support set of p(w | x) at the mask. Frequency
        refinement drops words with prior below config.frequency_threshold. Relevance
        refinement (KPT's TF-IDF-like score, simplified): with q_w the support-set profile of
        log p(w | x) centred over the examples, and a_c the first remaining word of class c (its
        anchor), r(w, c) = cos(q_w, q_{a_c}) and R(w) = r(w, own class) / mean_{c' != own}
        |r(w, c')| (-inf when r(w, own) <= 0); words with R(w) < config.relevance_threshold are
        dropped (needs C >= 2). Each step keeps a class's config.min_words_per_class best words.
        Then the calibration is the prior of the kept words (used when config.calibrate).
        Refinement replaces word_weights by the kept words' weights: build optimizers after it.
        """
        if input_ids.shape[0] == 0:
            raise ValueError("fit_support needs at least one support example, got input_ids "
                             f"{list(input_ids.shape)}")
        cfg = self.config
        probs = self.support_probs(input_ids, attention_mask, mask_positions, batch_size)
        prior = probs.mean(0)
        classes = [list(range(a, b)) for a, b in zip(self.class_offsets.tolist(), self.class_offsets.tolist()[1:])]
        if cfg.frequency_threshold > 0:
            classes = [self._keep(ws, prior, prior >= cfg.frequency_threshold) for ws in classes]
        relevance = None
        if cfg.relevance_threshold is not None:
            if len(classes) < 2:
                raise ValueError("relevance refinement compares a word's classes: it needs at least 2 classes")
            relevance = self._relevance(probs, classes)
            classes = [self._keep(ws, relevance, relevance >= cfg.relevance_threshold) for ws in classes]
        ids = self.word_ids.tolist()
        keep = [w for ws in classes for w in ws]
        self._set_words([[ids[w] for w in ws] for ws in classes], keep)
        self.calibration = prior[torch.tensor(keep, dtype=torch.long, device=prior.device)].to(
            self.decoder.weight.dtype).clamp_min(torch.finfo(torch.float32).tiny)
        return {"prior": prior, "relevance": relevance, "kept": self.label_words}

    def _keep(self, words: list[int], score: Tensor, ok: Tensor) -> list[int]:
        kept = [w for w in words if bool(ok[w])]
        if len(kept) < min(self.config.min_words_per_class, len(words)):
            best = sorted(words, key=lambda w: -float(score[w]))[: self.config.min_words_per_class]
            kept = [w for w in words if w in best]
        return kept

    @staticmethod
    def _relevance(probs: Tensor, classes: list[list[int]]) -> Tensor:
        logp = probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
        q = logp - logp.mean(0, keepdim=True)
        q = q / q.norm(dim=0, keepdim=True).clamp_min(1e-12)
        anchors = torch.stack([q[:, ws[0]] for ws in classes], dim=1)  # [S, C]
        sim = q.T @ anchors  # [W, C]
        score = torch.full((probs.shape[1],), float("-inf"))
        for c, ws in enumerate(classes):
            others = [k for k in range(len(classes)) if k != c]
            for w in ws:
                own = float(sim[w, c])
                if own > 0:
                    score[w] = own / max(float(sim[w, others].abs().mean()), 1e-12)
        return score
