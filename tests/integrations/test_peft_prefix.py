"""patch(peft_model) for PEFT prefix tuning: PEFT's logits and grads, prefix kept out of the cache."""
import copy

import pytest
import torch

peft = pytest.importorskip("peft")

import peft_kernels as pk  # noqa: E402
from models import assert_same_grads, batch, greedy_by_forward, tiny_llama  # noqa: E402


def _pair(projection: bool, seed: int = 0):
    torch.manual_seed(seed)
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, prefix_projection=projection,
                                     encoder_hidden_size=24)
    ref = peft.get_peft_model(tiny_llama(), config)
    with torch.no_grad():  # PEFT initialises the table near zero; make the prefix matter
        for p in ref.prompt_encoder.parameters():
            p.normal_(0, 0.5)
    ours = pk.patch(copy.deepcopy(ref))
    return ref, ours


@pytest.mark.parametrize("projection", [False, True], ids=["no-projection", "mlp-projection"])
def test_patched_prefix_logits_loss_and_grads_match_peft(projection):
    ref, ours = _pair(projection)
    ids, mask = batch(left_pad=2)
    labels = ids.masked_fill(mask == 0, -100)
    ref.train(), ours.train()
    out_ref = ref(input_ids=ids, attention_mask=mask, labels=labels)
    out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.logits, out_ref.logits, atol=1e-5, rtol=1e-5)
    assert pk.last_backend("prefix_attention") is not None
    out_ref.loss.backward()
    out.loss.backward()
    assert_same_grads(ours, ref)


def test_patched_prefix_generate_equals_greedy_decoding_by_peft_forward_and_cache_holds_real_tokens_only():
    ref, ours = _pair(False, seed=1)
    ref.eval(), ours.eval()
    ids, _ = batch(B=2, L=4)
    steps = 6
    with torch.no_grad():
        want = greedy_by_forward(lambda x: ref(input_ids=x).logits, ids, steps)
        out = ours.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                            return_dict_in_generate=True)
    assert torch.equal(out.sequences, want)
    cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
    assert cache.get_seq_length() == ids.shape[1] + steps - 1  # no prefix slots in the cache


def test_unpatch_restores_attention_implementation():
    ref, ours = _pair(False)
    assert ours.base_model.config._attn_implementation == "peft_prefix"
    pk.unpatch(ours)
    assert ours.base_model.config._attn_implementation == ref.base_model.config._attn_implementation
    ids, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_gpt2_prefix_logits_match_peft():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                       bos_token_id=1, eos_token_id=2)).eval()
    ref = peft.get_peft_model(model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with torch.no_grad():
        for p in ref.prompt_encoder.parameters():
            p.normal_(0, 0.5)
    ours = pk.patch(copy.deepcopy(ref))
    ids, mask = batch(left_pad=2, L=6)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits,
                                   ref(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=1e-5)
