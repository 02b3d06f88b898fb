"""BitFit, LayerNorm tuning and head tuning: what trains, counts, the no-bias error, training and reload."""
import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from peft_kernels.methods import freeze  # noqa: E402
from models import batch, tiny_llama  # noqa: E402

V = 97


def tiny_bert(seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64, num_labels=3,
                                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_trainable_counts_and_summary_format():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    model[0].weight.requires_grad_(False)
    assert freeze.trainable_parameters(model) == (3 + 6, 12 + 3 + 6)
    assert freeze.trainable_summary(model) == "trainable params: 9 || all params: 21 || trainable%: 42.8571"
    tied = nn.ModuleDict({"a": nn.Linear(2, 2, bias=False)})
    tied["b"] = nn.Linear(2, 2, bias=False)
    tied["b"].weight = tied["a"].weight
    assert freeze.trainable_parameters(tied) == (4, 4)  # a tied tensor counts once


def test_bitfit_on_bert_trains_biases_and_the_classifier(capsys):
    model = tiny_bert()
    assert freeze.prepare_bitfit(model) is model
    names = trainable_names(model)
    assert names == {n for n, _ in model.named_parameters() if n.endswith(".bias")} | {"classifier.weight"}
    trainable, total = freeze.trainable_parameters(model)
    assert capsys.readouterr().out.strip() == (
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
    freeze.prepare_bitfit(model, train_head=False, verbose=False)
    assert "classifier.weight" not in trainable_names(model) and "classifier.bias" in trainable_names(model)


def test_bitfit_on_llama_raises_a_clear_error_or_adds_zero_biases():
    model = tiny_llama()
    with pytest.raises(ValueError, match="no bias parameters.*add_bias=True"):
        freeze.prepare_bitfit(model, verbose=False)
    ids, _ = batch(V)
    with torch.no_grad():
        want = model(ids).logits
    freeze.prepare_bitfit(model, add_bias=True, verbose=False)
    names = trainable_names(model)
    assert names and all(n.endswith(".bias") for n in names)
    assert "lm_head.bias" not in names and "model.layers.0.mlp.down_proj.bias" in names
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down per layer
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, atol=0, rtol=0)  # zero biases: same model


def test_layernorm_tuning_finds_layernorm_and_rmsnorm():
    llama = tiny_llama()
    freeze.prepare_layernorm_tuning(llama, verbose=False)
    names = trainable_names(llama)
    assert names == {"model.norm.weight"} | {f"model.layers.{i}.{k}.weight" for i in range(2)
                                             for k in ("input_layernorm", "post_attention_layernorm")}
    bert = freeze.prepare_layernorm_tuning(tiny_bert(), verbose=False)
    names = trainable_names(bert)
    assert "bert.embeddings.LayerNorm.weight" in names and "bert.encoder.layer.1.output.LayerNorm.bias" in names
    assert {"classifier.weight", "classifier.bias"} <= names
    assert all("LayerNorm" in n or n.startswith("classifier") for n in names)
    with pytest.raises(ValueError, match="no normalisation module"):
        freeze.prepare_layernorm_tuning(nn.Linear(2, 2), verbose=False)


def test_head_tuning_finds_the_head():
    bert = freeze.prepare_head_tuning(tiny_bert(), verbose=False)
    assert trainable_names(bert) == {"classifier.weight", "classifier.bias"}
    llama = freeze.prepare_head_tuning(tiny_llama(), verbose=False)
    assert trainable_names(llama) == {"lm_head.weight"}
    named = freeze.prepare_head_tuning(tiny_llama(), head_modules=["model.norm"], verbose=False)
    assert trainable_names(named) == {"model.norm.weight"}
    with pytest.raises(ValueError, match="not in"):
        freeze.prepare_head_tuning(tiny_llama(), head_modules="nope", verbose=False)
    with pytest.raises(ValueError, match="cannot find a head"):
        freeze.prepare_head_tuning(nn.Sequential(nn.Linear(2, 2)), verbose=False)


@pytest.mark.parametrize("prepare", [
    lambda m: freeze.prepare_bitfit(m, verbose=False),
    lambda m: freeze.prepare_layernorm_tuning(m, verbose=False),
    lambda m: freeze.prepare_head_tuning(m, verbose=False),
], ids=["bitfit", "layernorm", "head"])
def test_each_trains_and_reloads_exactly(prepare):
    model = prepare(tiny_bert()).train()
    ids, mask = batch(V, B=6, L=6)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(12):
        loss = model(ids, attention_mask=mask, labels=labels).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0] - 0.3, losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)

    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    fresh = prepare(tiny_bert())
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) == {n for n, _ in fresh.state_dict().items()} - set(state)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits,
                                   atol=0, rtol=0)
