"""patch(peft_model) for PEFT LoRA: same logits and grads, PEFT's mixed batches in one op call."""
import copy

import pytest
import torch

peft = pytest.importorskip("peft")

import peft_kernels as pk  # noqa: E402
from models import batch, tiny_llama  # noqa: E402

ADAPTERS = {  # name: (rank, alpha, targets, rslora) - different ranks and targets
    "a": (2, 4, ["q_proj", "v_proj"], False),
    "b": (8, 8, "all-linear", False),
    "c": (4, 16, ["k_proj", "o_proj", "down_proj"], True),
    "d": (3, 3, ["q_proj", "gate_proj"], False),
}


def _lora_model():
    torch.manual_seed(0)
    model = None
    for name, (r, alpha, targets, rslora) in ADAPTERS.items():
        config = peft.LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=alpha, target_modules=targets,
                                 use_rslora=rslora, init_lora_weights=False, lora_dropout=0.0)
        if model is None:
            model = peft.get_peft_model(tiny_llama(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    return model


def test_single_adapter_logits_and_grads_match_peft():
    ref = _lora_model()
    ref.set_adapter("c")
    ours = pk.patch(copy.deepcopy(ref))
    ids, mask = batch(left_pad=1)
    for model in (ref, ours):
        model.train()
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    torch.testing.assert_close(ours(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    assert pk.last_backend("multi_lora") in ("cpp", "reference")
    grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys() and any(".c." in n for n in grads)
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-5, rtol=1e-4)


def test_mixed_adapter_batch_matches_peft_adapter_names():
    ref = _lora_model().eval()
    ours = pk.patch(copy.deepcopy(ref))
    ids, mask = batch(B=6)
    names = ["a", "b", "__base__", "c", "d", "b"]
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        got = ours(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        gen_ref = ref.generate(input_ids=ids, attention_mask=mask, adapter_names=names, max_new_tokens=4, do_sample=False)
        gen = ours.generate(input_ids=ids, attention_mask=mask, adapter_names=names, max_new_tokens=4, do_sample=False)
    assert torch.equal(gen, gen_ref)


def test_merged_adapters_fall_back_to_peft():
    ref = _lora_model().eval()
    ref.set_adapter("a")
    ours = pk.patch(copy.deepcopy(ref))
    ids, _ = batch()
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        ours.merge_adapter()
        torch.testing.assert_close(ours(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
