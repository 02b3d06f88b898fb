"""Packed (varlen) MultiAdapterModel batches: real tokens only, each row equal to that row alone."""

import pytest
import torch

import peft_kernels as pk
import peft_kernels.multi_adapter as multi_adapter_module
from models import tiny_llama
from peft_kernels.api import BottleneckConfig, LoraConfig, PromptTuningConfig, PTuningConfig, PTuningV2Config
from peft_kernels.cache_utils import cache_layers
from peft_kernels.packing import make_packing

NAMES = ["lora4", "prefix5", "prompt3", None, "ptuning4", "lora8", "bottleneck", "prefix2"]


def _model(layers: int = 2):
    torch.manual_seed(0)
    model = pk.MultiAdapterModel(tiny_llama(layers=layers))
    model.add_adapter("lora4", LoraConfig(r=4, init_lora_weights=False))
    model.add_adapter("lora8", LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.add_adapter("prefix5", PTuningV2Config(num_virtual_tokens=5))
    model.add_adapter("prefix2", PTuningV2Config(num_virtual_tokens=2))
    model.add_adapter("prompt3", PromptTuningConfig(num_virtual_tokens=3))
    model.add_adapter("ptuning4", PTuningConfig(num_virtual_tokens=4, encoder_hidden_size=16))
    model.add_adapter("bottleneck", BottleneckConfig(r=4))
    with torch.no_grad():
        for kind in ("prefix", "prompt", "bottleneck"):
            for p in model.kinds[kind].parameters():
                p.normal_(0, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return _model()


def _ragged(B: int, L: int, seed: int = 3):
    """Ids and a mask with left, right, middle-free and no padding, lengths 1..L."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (B, L), generator=g)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    lengths[0] = L
    mask = torch.zeros(B, L, dtype=torch.long)
    for b, n in enumerate(lengths.tolist()):
        start = 0 if b % 2 else L - n  # odd rows right-padded, even rows left-padded
        mask[b, start:start + n] = 1
    return ids, mask


def _alone(model, ids, mask, names, r, **kw):
    keep = mask[r].bool()
    return model(ids[r:r + 1, keep], adapter_names=[names[r]], packed=False, **kw)


def test_every_row_of_a_packed_mixed_batch_equals_that_row_alone(model):
    ids, mask = _ragged(len(NAMES), 11)
    with torch.no_grad():
        out = model(ids, mask, adapter_names=NAMES).logits
        assert out.shape == (len(NAMES), 11, 97)
        for r in range(len(NAMES)):
            keep = mask[r].bool()
            alone = _alone(model, ids, mask, NAMES, r).logits[0]
            torch.testing.assert_close(out[r, keep], alone, atol=1e-5, rtol=1e-5, msg=f"row {r} ({NAMES[r]})")
            assert not out[r, ~keep].any()  # padding holds zeros


def test_packed_equals_padded_on_left_padded_rows(model):
    ids, mask = _ragged(len(NAMES), 9)
    mask = torch.ones_like(mask)
    mask[0, :4] = 0
    mask[3, :2] = 0
    with torch.no_grad():
        a = model(ids, mask, adapter_names=NAMES, packed=True).logits
        b = model(ids, mask, adapter_names=NAMES, packed=False).logits
    keep = mask.bool()
    torch.testing.assert_close(a[keep], b[keep], atol=1e-5, rtol=1e-5)


def test_equal_length_batches_pack_as_uniform_views_without_prompts(model):
    ids = torch.randint(3, 97, (4, 6))
    names = ["lora4", "prefix5", None, "bottleneck"]
    with torch.no_grad():
        a = model(ids, adapter_names=names, packed=True).logits
        b = model(ids, adapter_names=names, packed=False).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert make_packing(torch.tensor([6, 6, 6])).uniform and not make_packing(torch.tensor([6, 5])).uniform


def test_packed_loss_and_gradients_equal_the_rows_run_alone():
    model = _model().train()
    ids, mask = _ragged(len(NAMES), 8, seed=5)
    labels = ids.masked_fill(mask == 0, -100)
    out = model(ids, mask, labels=labels, adapter_names=NAMES)
    assert out.logits.shape == (len(NAMES), 8, 97)
    n_targets = int((mask.sum(1) - 1).clamp(min=0).sum()) + sum(
        1 for r, n in enumerate(NAMES) if n in ("prompt3", "ptuning4"))  # a prompt predicts the first token
    (out.loss * n_targets).backward()
    packed = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    total = 0.0
    for r in range(len(NAMES)):
        keep = mask[r].bool()
        alone = model(ids[r:r + 1, keep], labels=labels[r:r + 1, keep], adapter_names=[NAMES[r]], packed=False)
        n = int(keep.sum()) - 1 + (NAMES[r] in ("prompt3", "ptuning4"))
        if n:
            if alone.loss.requires_grad:  # the base row has nothing trainable
                (alone.loss * n).backward()
            total += float(alone.loss.detach()) * n
    assert abs(float(out.loss.detach()) * n_targets - total) < 1e-4
    alone_grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert set(packed) == set(alone_grads) and len(packed) > 10
    for k in packed:
        torch.testing.assert_close(packed[k], alone_grads[k], atol=1e-5, rtol=1e-4, msg=k)


def test_packed_generate_equals_each_row_generated_alone(model):
    ids, mask = _ragged(len(NAMES), 7, seed=9)
    with torch.no_grad():
        out = model.generate(ids, mask, adapter_names=NAMES, max_new_tokens=6)
        assert out.shape == (len(NAMES), 13)
        for r in range(len(NAMES)):
            keep = mask[r].bool()
            alone = model.generate(ids[r:r + 1, keep], adapter_names=[NAMES[r]], max_new_tokens=6, packed=False)
            assert out[r, 7:].tolist() == alone[0, -6:].tolist(), f"row {r} ({NAMES[r]})"


def test_packed_generation_cache_holds_exactly_the_real_tokens(model, monkeypatch):
    caches = []
    real = multi_adapter_module.packed_cache

    def capture():
        caches.append(real())
        return caches[-1]

    monkeypatch.setattr(multi_adapter_module, "packed_cache", capture)
    ids, mask = _ragged(len(NAMES), 10, seed=2)
    new = 4
    with torch.no_grad():
        model.generate(ids, mask, adapter_names=NAMES, max_new_tokens=new)
    prompts = {"prompt3": 3, "ptuning4": 4}
    slots = int(mask.sum()) + sum(prompts.get(n, 0) for n in NAMES) + len(NAMES) * (new - 1)
    config = model.model.config
    kv_width = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    layers = cache_layers(caches[0])
    assert len(layers) == config.num_hidden_layers
    for k, v in layers:
        assert k.shape[-2] == v.shape[-2] == slots
    nbytes = sum(t.numel() * t.element_size() for kv in layers for t in kv)
    assert nbytes == slots * kv_width * 2 * config.num_hidden_layers * 4


def test_sampled_packed_generation_runs_and_stops_at_eos(model):
    ids, mask = _ragged(4, 6, seed=4)
    names = NAMES[:4]
    with torch.no_grad():
        torch.manual_seed(0)
        a = model.generate(ids, mask, adapter_names=names, max_new_tokens=5, do_sample=True, top_k=5, temperature=0.7)
        torch.manual_seed(0)
        b = model.generate(ids, mask, adapter_names=names, max_new_tokens=5, do_sample=True, top_k=5, temperature=0.7)
        assert torch.equal(a, b)
        greedy = model.generate(ids, mask, adapter_names=names, max_new_tokens=5)
        eos = int(greedy[0, 6])  # row 0 stops at its first new token, the others pad after their own eos
        stopped = model.generate(ids, mask, adapter_names=names, max_new_tokens=5, eos_token_id=eos, pad_token_id=0)
    assert stopped[0, 6] == eos and (stopped[0, 7:] == 0).all()
    for r in range(1, 4):
        row = greedy[r, 6:].tolist()
        cut = row.index(eos) + 1 if eos in row else len(row)
        assert stopped[r, 6:6 + cut].tolist() == row[:cut]


def test_packed_true_refuses_what_cannot_pack(model):
    ids = torch.randint(3, 97, (2, 5))
    with pytest.raises(ValueError, match="output_hidden_states"):
        model(ids, adapter_names=["lora4", None], packed=True, output_hidden_states=True)
    with pytest.raises(ValueError, match="packed"):
        model.generate(ids, adapter_names=["lora4", None], packed=True, max_new_tokens=2, repetition_penalty=1.3)
    out = model(ids, adapter_names=["lora4", None], output_hidden_states=True)  # auto: the padded path
    assert out.hidden_states is not None
    with pytest.raises(ValueError, match="at least one real token"):
        model.generate(ids, torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]), adapter_names=["lora4", None],
                       max_new_tokens=2)


def test_models_that_cannot_pack_say_why():
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64)).eval()
    model = pk.MultiAdapterModel(bert)
    assert "bidirectional" in model.pack_refusal()
    with pytest.raises(ValueError, match="bidirectional"):
        model(torch.randint(0, 50, (2, 4)), packed=True)
