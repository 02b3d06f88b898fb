"""KPT verbalizer on a tiny random BertForMaskedLM: vs a plain implementation on the model's own
logits, the prompt template, refinement and calibration as documented, and the training example."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from transformers import BertConfig, BertForMaskedLM  # noqa: E402

from peft_kernels.methods.kpt import KPTConfig, KPTVerbalizer, kpt_template  # noqa: E402

CLS, SEP, MASK = 1, 2, 3
LABEL_WORDS = [[50, 51, [52, 53]], [60], [70, 71, 72, 70]]


def _model(seed=0, vocab=120):
    torch.manual_seed(seed)
    return BertForMaskedLM(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=40)).eval()


def _batch(B=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    texts = [torch.randint(10, 120, (int(n),), generator=g).tolist() for n in torch.randint(2, 9, (B,), generator=g)]
    return kpt_template(texts, cls_id=CLS, sep_id=SEP, mask_id=MASK, before_mask=[4, 5], after_mask=[6])


def plain_scores(model, label_words, ids, attn, mask, calibration=None, word_weights=None):
    logp = model(input_ids=ids, attention_mask=attn).logits[torch.arange(ids.shape[0]), mask].double().log_softmax(-1)
    out, w0 = [], 0
    for words in label_words:
        lp = logp[:, words]
        if calibration is not None:
            lp = lp - calibration[w0:w0 + len(words)].double().log()
        alpha = (torch.full((len(words),), 1.0 / len(words), dtype=torch.float64) if word_weights is None
                 else word_weights[w0:w0 + len(words)].double().softmax(0))
        out.append(torch.log((lp.exp() * alpha).sum(1)))
        w0 += len(words)
    return torch.stack(out, 1)


def test_template_layout():
    ids, attn, mask = kpt_template([[10, 11, 12], [13]], cls_id=CLS, sep_id=SEP, mask_id=MASK, before_mask=[4, 5],
                                   after_mask=[6], pad_id=0)
    assert ids.tolist() == [[1, 10, 11, 12, 4, 5, 3, 6, 2], [1, 13, 4, 5, 3, 6, 2, 0, 0]]
    assert attn.tolist() == [[1] * 9, [1] * 7 + [0, 0]]
    assert mask.tolist() == [6, 4]
    cut, _, m = kpt_template([[10, 11, 12]], cls_id=CLS, sep_id=SEP, mask_id=MASK, before_mask=[4], max_length=6)
    assert cut.tolist() == [[1, 10, 11, 4, 3, 2]] and m.tolist() == [4]
    with pytest.raises(ValueError, match="max_length"):
        kpt_template([[10]], cls_id=CLS, sep_id=SEP, mask_id=MASK, before_mask=[4, 5], max_length=3)


def test_first_sub_token_and_duplicates():
    v = KPTVerbalizer(_model(), LABEL_WORDS, KPTConfig(mask_token_id=MASK))
    assert v.label_words == [[50, 51, 52], [60], [70, 71, 72]]


@pytest.mark.parametrize("aggregate", ["mean", "weighted"])
def test_matches_plain_on_model_logits(aggregate):
    model = _model()
    v = KPTVerbalizer(model, LABEL_WORDS, KPTConfig(mask_token_id=MASK, aggregate=aggregate))
    if aggregate == "weighted":
        with torch.no_grad():
            v.word_weights.copy_(torch.randn(v.word_weights.shape[0]))
    ids, attn, mask = _batch()
    ww = v.word_weights if aggregate == "weighted" else None
    want = plain_scores(model, v.label_words, ids, attn, mask, word_weights=ww)
    torch.testing.assert_close(v(ids, attn, mask).double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v(ids, attn).double(), want, atol=1e-5, rtol=1e-5)  # mask found by its id
    v.fit_support(ids, attn, mask)
    want = plain_scores(model, v.label_words, ids, attn, mask, calibration=v.calibration, word_weights=ww)
    torch.testing.assert_close(v(ids, attn, mask).double(), want, atol=1e-5, rtol=1e-5)


def test_grads_match_plain():
    model = _model()
    v = KPTVerbalizer(model, LABEL_WORDS, KPTConfig(mask_token_id=MASK, aggregate="weighted"))
    ids, attn, mask = _batch()
    params = [p for p in v.parameters() if p.requires_grad]
    g1 = torch.autograd.grad(v(ids, attn, mask).sum(), params)
    g2 = torch.autograd.grad(plain_scores(model, v.label_words, ids, attn, mask, word_weights=v.word_weights).sum(),
                             params, allow_unused=True)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b.to(a.dtype), atol=1e-5, rtol=1e-4)


def test_calibration_is_the_support_prior():
    model = _model()
    v = KPTVerbalizer(model, LABEL_WORDS, KPTConfig(mask_token_id=MASK))
    ids, attn, mask = _batch(8, seed=1)
    probs = model(input_ids=ids, attention_mask=attn).logits[torch.arange(8), mask].softmax(-1)
    report = v.fit_support(ids, attn, mask)
    torch.testing.assert_close(v.calibration, probs[:, v.word_ids].mean(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(report["prior"], v.calibration)
    off = KPTVerbalizer(model, LABEL_WORDS, KPTConfig(mask_token_id=MASK, calibrate=False))
    off.fit_support(ids, attn, mask)
    torch.testing.assert_close(off(ids, attn, mask).double(), plain_scores(model, off.label_words, ids, attn, mask),
                               atol=1e-5, rtol=1e-5)


def test_frequency_refinement_drops_rare_words_and_keeps_one():
    model = _model()
    ids, attn, mask = _batch(8, seed=2)
    probe = KPTVerbalizer(model, LABEL_WORDS, KPTConfig(mask_token_id=MASK))
    prior = probe.support_probs(ids, attn, mask).mean(0)
    threshold = float(prior.median())
    v = KPTVerbalizer(model, LABEL_WORDS, KPTConfig(mask_token_id=MASK, frequency_threshold=threshold))
    report = v.fit_support(ids, attn, mask)
    flat = probe.word_ids.tolist()
    for before, after in zip(probe.label_words, report["kept"]):
        expect = [w for w in before if float(prior[flat.index(w)]) >= threshold]
        if not expect:  # the class's most frequent word survives
            expect = [max(before, key=lambda w: float(prior[flat.index(w)]))]
        assert after == expect
    assert v.calibration.shape == v.word_ids.shape
    with pytest.raises(ValueError, match="frequency_threshold"):
        KPTConfig(frequency_threshold=-1.0)


def test_relevance_refinement_scores_as_documented():
    model = _model()
    ids, attn, mask = _batch(10, seed=3)
    v = KPTVerbalizer(model, LABEL_WORDS, KPTConfig(mask_token_id=MASK, relevance_threshold=1.0))
    probs = v.support_probs(ids, attn, mask).double()
    q = probs.log() - probs.log().mean(0)
    q = q / q.norm(dim=0)
    classes = [[0, 1, 2], [3], [4, 5, 6]]
    anchors = torch.stack([q[:, ws[0]] for ws in classes], 1)
    sim = q.T @ anchors
    report = v.fit_support(ids, attn, mask)
    rel = report["relevance"]
    for c, ws in enumerate(classes):
        others = [k for k in range(3) if k != c]
        for w in ws:
            if sim[w, c] > 0:
                assert abs(float(rel[w]) - float(sim[w, c] / sim[w, others].abs().mean())) < 1e-4
            else:
                assert rel[w] == float("-inf")
        # each anchor is perfectly relevant to its own class (cos = 1)
        assert float(rel[ws[0]]) > 0
    flat = [50, 51, 52, 60, 70, 71, 72]
    for c, ws in enumerate(classes):
        kept = [flat[w] for w in ws if float(rel[w]) >= 1.0] or [flat[max(ws, key=lambda w: float(rel[w]))]]
        assert report["kept"][c] == kept
    with pytest.raises(ValueError, match="at least 2 classes"):
        KPTVerbalizer(model, [[50, 51]], KPTConfig(mask_token_id=MASK, relevance_threshold=1.0)).fit_support(ids, attn)


def test_refinement_carries_word_weights():
    model = _model()
    ids, attn, mask = _batch(8, seed=2)
    v = KPTVerbalizer(model, LABEL_WORDS, KPTConfig(mask_token_id=MASK, aggregate="weighted", frequency_threshold=1.0))
    with torch.no_grad():
        v.word_weights.copy_(torch.arange(7.0))
    before = v.label_words
    v.fit_support(ids, attn, mask)
    flat = [w for ws in before for w in ws]
    assert all(len(ws) == 1 for ws in v.label_words)
    assert v.word_weights.tolist() == [float(flat.index(ws[0])) for ws in v.label_words]


def test_bad_inputs():
    model = _model()
    with pytest.raises(ValueError, match="empty"):
        KPTVerbalizer(model, [[50], []])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        KPTVerbalizer(model, [[50], [500]])
    with pytest.raises(TypeError, match="cls.predictions"):
        KPTVerbalizer(torch.nn.Linear(2, 2), [[1]])
    with pytest.raises(ValueError, match="aggregate"):
        KPTConfig(aggregate="max")
    v = KPTVerbalizer(model, LABEL_WORDS, KPTConfig(mask_token_id=MASK))
    ids, attn, mask = _batch()
    ids2 = ids.clone()
    ids2[0, 1] = MASK
    with pytest.raises(ValueError, match="exactly one mask"):
        v(ids2, attn)
    with pytest.raises(ValueError, match="mask_positions"):
        KPTVerbalizer(model, LABEL_WORDS)(ids, attn)
    with pytest.raises(ValueError, match=r"mask_positions must be in"):
        v(ids, attn, mask + 100)


def _example():
    path = Path(__file__).resolve().parents[2] / "examples" / "train_kpt.py"
    spec = importlib.util.spec_from_file_location("train_kpt", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_example_loss_goes_down():
    losses = _example().train(steps=40, log=lambda *_: None)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05, losses
