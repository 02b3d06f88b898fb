"""peft_kernels.api: every method's config applies, trains, saves and reloads exactly; the reference table."""
import dataclasses

import pytest
import torch

pytest.importorskip("transformers")

import peft_kernels as pk  # noqa: E402
from peft_kernels import api  # noqa: E402
from peft_kernels.methods.bottleneck import BottleneckAdapterModel  # noqa: E402
from peft_kernels.methods.vpt import VisualPromptTuning  # noqa: E402
from models import batch, tiny_llama  # noqa: E402

V = 97


def llama(seed=0):
    model = tiny_llama(seed)
    model.lm_head.weight.data *= 20  # sharper logits: a short run shows the loss going down
    return model


def bert(seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64, num_labels=3,
                                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()


def vit(seed=0):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    return ViTForImageClassification(ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32,
                                               num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                               num_labels=3, hidden_dropout_prob=0.0,
                                               attention_probs_dropout_prob=0.0)).eval()


IDS, MASK = batch(V, B=4, L=6)
LABELS = torch.tensor([0, 1, 2, 1])
PIXELS = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))


def lm_step(runner, multi):
    kw = {"adapter_names": "default"} if multi else {}
    return runner(IDS, attention_mask=MASK, labels=IDS, **kw)


def cls_step(runner, multi):
    return runner(IDS, attention_mask=MASK, labels=LABELS)


def vit_step(runner, multi):
    return runner(PIXELS, labels=LABELS)


CASES = {
    "lora": (llama, api.LoraConfig(r=4), lm_step, pk.MultiAdapterModel),
    "prefix": (llama, api.PrefixTuningConfig(num_virtual_tokens=4), lm_step, pk.MultiAdapterModel),
    "ptuning_v2": (llama, api.PTuningV2Config(num_virtual_tokens=4), lm_step, pk.MultiAdapterModel),
    "prompt": (llama, api.PromptTuningConfig(num_virtual_tokens=4), lm_step, pk.MultiAdapterModel),
    "ptuning": (llama, api.PTuningConfig(num_virtual_tokens=4), lm_step, pk.MultiAdapterModel),
    "vpt_deep": (vit, api.VPTConfig(num_prompts=3, deep=True), vit_step, VisualPromptTuning),
    "bottleneck": (llama, api.BottleneckConfig(r=4), lm_step, BottleneckAdapterModel),
    "bottleneck_pfeiffer_bert": (bert, api.BottleneckConfig(r=4, placement="pfeiffer", train_head=True), cls_step,
                                 BottleneckAdapterModel),
    "bitfit": (bert, api.BitFitConfig(), cls_step, None),
    "bitfit_added_biases": (llama, api.BitFitConfig(add_bias=True), lm_step, None),
    "layernorm": (llama, api.LayerNormTuningConfig(), lm_step, None),
    "head": (bert, api.HeadTuningConfig(), cls_step, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_apply_trains_saves_and_reloads_exactly(case):
    make, config, step, kind = CASES[case]
    model = make()
    runner = api.apply(model, config)
    multi = isinstance(runner, pk.MultiAdapterModel)
    assert isinstance(runner, kind) if kind else runner is model
    trainable, total = api.trainable_parameters(runner)
    assert 0 < trainable < total
    frozen = {n: p.detach().clone() for n, p in runner.named_parameters() if not p.requires_grad}

    runner.train()
    opt = torch.optim.Adam([p for p in runner.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(8):
        loss = step(runner, multi).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(torch.equal(p, frozen[n]) for n, p in runner.named_parameters() if n in frozen)

    runner.eval()
    state = api.trainable_state_dict(runner)
    assert sum(t.numel() for t in state.values()) == trainable
    fresh = api.apply(make(seed=0), config)
    with torch.no_grad():
        want = step(runner, multi).logits
        assert not torch.equal(step(fresh, multi).logits, want)
        api.load_trainable_state_dict(fresh, state)
        torch.testing.assert_close(step(fresh, multi).logits, want, atol=0, rtol=0)
    with pytest.raises(ValueError, match="missing"):
        api.load_trainable_state_dict(fresh, dict(list(state.items())[1:]))


def test_adapters_of_several_kinds_share_one_multi_adapter_model():
    runner = api.apply(llama(), api.LoraConfig(r=2), name="lora")
    assert api.apply(runner, api.PromptTuningConfig(num_virtual_tokens=3), name="prompt") is runner
    assert runner.adapters == {"lora": "LORA", "prompt": "PROMPT_TUNING"}
    bottleneck = api.apply(llama(), api.BottleneckConfig(r=2), name="a")
    assert api.apply(bottleneck, api.BottleneckConfig(r=3, placement="pfeiffer"), name="b") is bottleneck
    with torch.no_grad():
        out = bottleneck(IDS, attention_mask=MASK, adapter_names=["a", "b", None, "a"]).logits
    assert out.shape == (4, 6, V)
    with pytest.raises(TypeError, match="BitFitConfig cannot be applied to a MultiAdapterModel"):
        api.apply(runner, api.BitFitConfig())
    with pytest.raises(TypeError, match="config must be one of"):
        api.apply(llama(), {"peft_type": "LORA"})


def test_configs_have_docstrings_defaults_and_peft_dicts():
    assert len(api.CONFIGS) == 11
    for cls in api.CONFIGS:
        assert cls.__doc__ and len(cls.__doc__) > 40, cls
        cls()  # every field has a default
    assert api.LoraConfig(target_modules=("q_proj",)).to_peft_dict()["target_modules"] == ["q_proj"]
    assert api.PrefixTuningConfig().to_peft_dict()["prefix_projection"] is True
    assert api.PTuningV2Config().to_peft_dict() == {"peft_type": "PREFIX_TUNING", "prefix_projection": False,
                                                    "num_virtual_tokens": 20}
    assert dataclasses.asdict(api.BottleneckConfig())["placement"] == "houlsby"
    for cls in (api.LoraConfig, api.PromptTuningConfig, api.PTuningConfig, api.BottleneckConfig):  # and back
        assert cls.from_peft(cls().to_peft_dict()) == cls()
    peft = pytest.importorskip("peft")
    got = api.LoraConfig.from_peft(peft.LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj"]))
    assert (got.r, got.lora_alpha, got.target_modules) == (4, 2, ["q_proj"])


def test_bitfit_config_on_llama_raises_the_clear_error():
    with pytest.raises(ValueError, match="no bias parameters"):
        api.apply(tiny_llama(), api.BitFitConfig())


def test_method_table_measures_every_method_on_the_reference_models():
    state = torch.random.get_rng_state()
    rows = api.method_table()
    assert torch.equal(torch.random.get_rng_state(), state)
    by_method = {(r["method"], r["model"].split()[0]): r for r in rows}
    assert len(rows) == len(api.TABLE)
    assert {r["op"] for r in rows} == {"multi_lora", "prefix_attention", "soft_prompt_embed+concat",
                                       "soft_prompt_concat", "lora_shrink+expand", "none"}
    for r in rows:  # top-k layers trains a whole block: the one method above 10%
        assert 0 < r["percent"] < (30 if r["method"] == "Top-k layers" else 10) and r["trainable"] < r["total"], r
    # LoRA r=8 on every linear of 4 Llama layers (256 hidden, 128 KV, 688 MLP): r * (in + out) summed
    assert by_method["LoRA", "Llama"]["trainable"] == 4 * 8 * (2 * 512 + 2 * 384 + 3 * (256 + 688))
    # Houlsby r = 256 / 16 = 16, two sites in each of 4 BERT layers: down, up and both biases
    assert by_method["Bottleneck (Houlsby)", "BERT"]["trainable"] == 8 * (2 * 16 * 256 + 16 + 256)
    assert by_method["Head tuning", "BERT"]["trainable"] == 256 * 2 + 2
    table = api.method_table_markdown(rows)
    assert table.count("\n") == len(rows) + 1 and "| LoRA |" in table


def test_topk_layers_trains_only_the_last_blocks_and_the_head():
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=3,
                                                     num_attention_heads=4, intermediate_size=64, num_labels=2))
    runner = api.apply(model, api.TopKLayersConfig(k=2))
    trainable = {n for n, p in runner.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("bert.encoder.layer.1.", "bert.encoder.layer.2.", "classifier."))
                             for n in trainable)
    assert any(n.startswith("bert.encoder.layer.1.") for n in trainable) and any("classifier" in n for n in trainable)
    with pytest.raises(ValueError, match="1 <= k <= 3"):
        api.apply(model, api.TopKLayersConfig(k=4))
