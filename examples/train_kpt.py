"""Train a KPT verbalizer on synthetic data: the class is given by one trigger token in the text.

A tiny random BertForMaskedLM reads "[CLS] text It was [MASK] . [SEP]"; each class has a few
label words (token ids). The support set calibrates the label words, then the word weights,
the last encoder layer and the head's transform train (embeddings, the other layers and the
decoder stay frozen: the fast path of the op, no dense vocabulary gradient).

    python examples/train_kpt.py --steps 60
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch
from torch import nn
from transformers import BertConfig, BertForMaskedLM

from peft_kernels.methods.kpt import KPTConfig, KPTVerbalizer, kpt_template

VOCAB, CLS, SEP, MASK, IT, WAS, DOT = 200, 1, 2, 3, 4, 5, 6
TRIGGERS = [[20, 21, 22], [30, 31, 32], [40, 41, 42]]  # class c is signalled by one of TRIGGERS[c]
LABEL_WORDS = [[150, 151, [152, 153]], [160], [170, 171, 172, 173]]  # [152, 153]: a two-sub-token word


def make_batch(n: int, g: torch.Generator):
    """n prompts with their classes: 6 filler tokens from [60, 140) and one trigger token."""
    labels = torch.randint(0, len(TRIGGERS), (n,), generator=g)
    texts = []
    for c in labels.tolist():
        text = torch.randint(60, 140, (6,), generator=g).tolist()
        trigger = TRIGGERS[c][int(torch.randint(0, 3, (1,), generator=g))]
        text.insert(int(torch.randint(0, 7, (1,), generator=g)), trigger)
        texts.append(text)
    ids, attn, mask = kpt_template(texts, cls_id=CLS, sep_id=SEP, mask_id=MASK, before_mask=[IT, WAS], after_mask=[DOT])
    return ids, attn, mask, labels


def build(seed: int = 0) -> KPTVerbalizer:
    torch.manual_seed(seed)
    model = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=96, max_position_embeddings=32, initializer_range=0.2,
                                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    verbalizer = KPTVerbalizer(model, LABEL_WORDS, KPTConfig(aggregate="weighted", mask_token_id=MASK))
    for p in model.parameters():
        p.requires_grad_(False)
    for module in (model.bert.encoder.layer[-1], model.cls.predictions.transform):
        for p in module.parameters():
            p.requires_grad_(True)
    return verbalizer


def train(steps: int = 60, batch: int = 32, lr: float = 3e-3, seed: int = 0,
          log: Callable[[str], None] = print) -> list[float]:
    """Calibrate on a support set, then train; returns the loss of every step."""
    g = torch.Generator().manual_seed(seed)
    verbalizer = build(seed)
    support = make_batch(64, g)
    verbalizer.eval()
    verbalizer.fit_support(support[0], support[1], support[2])
    verbalizer.train()
    params = [p for p in verbalizer.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for step in range(steps):
        ids, attn, mask, labels = make_batch(batch, g)
        loss = nn.functional.cross_entropy(verbalizer(ids, attn, mask), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step % 10 == 0 or step == steps - 1:
            log(f"step {step:4d}  loss {losses[-1]:.4f}")
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    losses = train(args.steps, seed=args.seed)
    print(f"first loss {losses[0]:.4f} last loss {losses[-1]:.4f}")


if __name__ == "__main__":
    main()
