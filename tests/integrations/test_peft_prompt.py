"""patch(peft_model) for PEFT prompt tuning and P-tuning: same logits, grads and greedy output."""
import copy

import pytest
import torch

peft = pytest.importorskip("peft")

import peft_kernels as pk  # noqa: E402
from models import batch, greedy_by_forward, tiny_llama  # noqa: E402

CONFIGS = {
    "prompt-tuning-random": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
    "prompt-tuning-vocab": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                           prompt_tuning_init="SAMPLE_VOCAB"),
    "p-tuning-mlp": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=6, encoder_hidden_size=16),
    "p-tuning-lstm": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=16,
                                                      encoder_reparameterization_type="LSTM"),
}


def _pair(name):
    torch.manual_seed(0)
    ref = peft.get_peft_model(tiny_llama(), CONFIGS[name]())
    ours = pk.patch(copy.deepcopy(ref))
    return ref, ours


@pytest.mark.parametrize("name", list(CONFIGS))
def test_patched_logits_loss_and_grads_match_peft(name):
    ref, ours = _pair(name)
    ids, mask = batch(left_pad=2)
    labels = ids.masked_fill(mask == 0, -100)
    for model in (ref, ours):
        model.train()
    out_ref = ref(input_ids=ids, attention_mask=mask, labels=labels)
    out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.logits, out_ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, out_ref.loss)
    out_ref.loss.backward()
    out.loss.backward()
    grads_ref = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert grads.keys() == grads_ref.keys() and grads
    for n in grads:
        torch.testing.assert_close(grads[n], grads_ref[n], atol=1e-6, rtol=1e-5)
    assert pk.last_backend("soft_prompt_embed") in ("cpp", "reference")


@pytest.mark.parametrize("name", ["prompt-tuning-random", "p-tuning-lstm"])
def test_patched_generate_equals_greedy_decoding_by_peft_forward(name):
    ref, ours = _pair(name)
    ref.eval(), ours.eval()
    ids, _ = batch(B=2, L=5)
    with torch.no_grad():
        want = greedy_by_forward(lambda x: ref(input_ids=x).logits, ids, steps=6)
        got = ours.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)


def test_unpatch_restores_peft_routes_and_patch_rejects_other_types():
    ref, ours = _pair("prompt-tuning-random")
    assert "forward" in ours.__dict__
    pk.unpatch(ours)
    assert "forward" not in ours.__dict__
    ia3 = peft.get_peft_model(tiny_llama(), peft.IA3Config(task_type="CAUSAL_LM", target_modules=["q_proj"],
                                                           feedforward_modules=[]))
    with pytest.raises(ValueError, match="IA3 models are not supported yet"):
        pk.patch(ia3)
    with pytest.raises(TypeError, match="PeftModelForCausalLM"):
        pk.patch(tiny_llama())
