"""Prefix tuning / P-tuning v2 modules, per-task prefix banks, encoders and the attention hook."""
import copy

import pytest
import torch

from models import batch, greedy_by_forward, tiny_llama
from peft_kernels import attention as hf
from peft_kernels.methods.prefix_tuning import PrefixEncoder, PrefixTunedModel

peft = pytest.importorskip("peft")


def _encoder(model, P, projection, seed):
    torch.manual_seed(seed)
    enc = PrefixEncoder.for_model(model.config, P, projection=projection, encoder_hidden_size=24)
    with torch.no_grad():
        for p in enc.parameters():
            p.normal_(0, 0.5)
    return enc


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_encoder_loads_peft_weights_and_matches_peft_forward(projection):
    torch.manual_seed(0)
    ref = peft.get_peft_model(tiny_llama(), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=projection, encoder_hidden_size=24)).eval()
    with torch.no_grad():
        for p in ref.prompt_encoder.parameters():
            p.normal_(0, 0.5)
    ours_enc = PrefixEncoder.for_model(ref.base_model.config, 4, projection=projection, encoder_hidden_size=24)
    ours_enc.load_state_dict(ref.prompt_encoder["default"].state_dict(), strict=True)
    model = PrefixTunedModel(tiny_llama(), ours_enc).eval()
    ids, mask = batch()  # no padding: PEFT counts pads in positions, PrefixTunedModel does not
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(model(ids, mask).logits, want, atol=1e-5, rtol=1e-5)
        model.prefixes["default"] = ours_enc.fold()
        torch.testing.assert_close(model(ids, mask).logits, want, atol=1e-5, rtol=1e-5)


def _multi():
    base = tiny_llama()
    return PrefixTunedModel(base, {"p3": _encoder(base, 3, False, 1), "p6": _encoder(base, 6, True, 2),
                                   "p1": _encoder(base, 1, False, 3)})


def test_mixed_prefix_batch_rows_equal_rows_alone_and_none_rows_equal_base():
    model = _multi().eval()
    ids, mask = batch(B=4, left_pad=2)
    names = ["p6", None, "p3", "p1"]
    with torch.no_grad():
        mixed = model(ids, mask, prefix=names).logits
        base = copy.deepcopy(model.model)
        base.set_attn_implementation("sdpa")
        for b, name in enumerate(names):
            real = mask[b].bool()
            if name is None:
                alone = base(input_ids=ids[b : b + 1, real]).logits[0]
            else:
                alone = model(ids[b : b + 1, real], prefix=name).logits[0]
            torch.testing.assert_close(mixed[b][real], alone, atol=1e-5, rtol=1e-5)


def test_mixed_prefix_batch_trains_each_prefix_on_its_own_rows():
    model = _multi().train()
    for p in model.model.parameters():
        p.requires_grad_(False)
    ids, mask = batch(B=4)
    names = ["p6", "p3", "p6", "p1"]

    def loss(rows):
        out = model(ids[rows], mask[rows], labels=ids[rows], prefix=[names[r] for r in rows])
        return out.loss * (len(rows) * (ids.shape[1] - 1))

    model.zero_grad()
    loss([0, 1, 2, 3]).backward()
    mixed = {n: p.grad.clone() for n, p in model.prefixes.named_parameters()}
    for name in ("p6", "p3", "p1"):
        model.zero_grad()
        loss([r for r, n in enumerate(names) if n == name]).backward()
        for pname, p in model.prefixes.named_parameters():
            if pname.startswith(name + "."):
                torch.testing.assert_close(mixed[pname], p.grad, atol=1e-5, rtol=1e-4)


def test_prefix_generate_matches_greedy_forward_with_real_tokens_only_in_cache():
    model = _multi().eval()
    ids, _ = batch(B=3, L=4)
    names = ["p3", "p6", None]
    with torch.no_grad():
        want = greedy_by_forward(lambda x: model(x, prefix=names).logits, ids, steps=5)
        out = model.generate(ids, prefix=names, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, want)
    cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
    assert cache.get_seq_length() == ids.shape[1] + 4


def test_prefix_training_reduces_loss():
    model = _multi().train()
    for p in model.model.parameters():
        p.requires_grad_(False)
    ids, mask = batch(B=4, L=6)
    target = torch.full_like(ids, 7)
    opt = torch.optim.Adam(model.prefixes.parameters(), lr=0.05)
    losses = []
    for _ in range(20):
        loss = model(ids, mask, labels=target, prefix=["p6", "p3", "p1", "p6"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_bert_encoder_prefix_bidirectional_with_right_padding():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=64, num_labels=3)).eval()
    plain = copy.deepcopy(bert)
    model = PrefixTunedModel(bert, {"task": _encoder(bert, 4, True, 5)}).eval()
    ids = torch.randint(1, 60, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        none = model(ids, mask, prefix=[None, None, None]).logits
        torch.testing.assert_close(none, plain(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=1e-5)
        with_prefix = model(ids, mask, prefix="task").logits
        alone = model(ids[1:2, :5], prefix="task").logits
    torch.testing.assert_close(with_prefix[1:2], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(with_prefix, none)
    model.remove()
    assert bert.config._attn_implementation == "sdpa"


def test_attention_function_matches_concatenated_sdpa_bidirectional_and_causal():
    """The "peft_prefix" function vs the explicit concat path it replaces, on its own."""
    torch.manual_seed(0)
    module = torch.nn.Module()
    module.layer_idx, module.is_causal = 0, False
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    bank = hf.LayerPrefix(torch.randn(3, 2, 4, 8), torch.randn(3, 2, 4, 8), torch.tensor([4, 2, 0]))
    state = hf.PrefixState()
    setattr(module, hf.STATE_ATTR, state)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    for causal in (False, True):
        module.is_causal = causal
        with state.use(hf.PrefixSelection({0: bank}, index=torch.tensor([1, -1]))):
            out, _ = hf.prefix_attention_forward(module, q, k, v, mask, scaling=0.3)
        mask4 = hf.sequence_mask(mask, 2, 5, 5, causal, q.device)
        want = hf.cat_sdpa(q, k, v, bank.key, bank.value, torch.tensor([1, -1]), bank.lens, mask4, 0.0, 0.3)
        torch.testing.assert_close(out, want.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_vit_encoder_prefix_per_task_rows_equal_rows_alone():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    vit = ViTForImageClassification(ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=4, intermediate_size=64, num_labels=3)).eval()
    plain = copy.deepcopy(vit)
    model = PrefixTunedModel(vit, {"a": _encoder(vit, 3, False, 1), "b": _encoder(vit, 5, True, 2)}).eval()
    pixels = torch.randn(3, 3, 16, 16)
    names = ["b", None, "a"]
    with torch.no_grad():
        mixed = model(pixel_values=pixels, prefix=names).logits
        torch.testing.assert_close(mixed[1], plain(pixel_values=pixels[1:2]).logits[0], atol=1e-5, rtol=1e-5)
        for b in (0, 2):
            alone = model(pixel_values=pixels[b : b + 1], prefix=names[b]).logits[0]
            torch.testing.assert_close(mixed[b], alone, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(mixed[0], plain(pixel_values=pixels[:1]).logits[0])
