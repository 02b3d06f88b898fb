"""patch() keeps no per-call state on the model: disable_adapter() gives the base model, and
in-place edits of adapter weights are always seen."""
import pytest
import torch

peft = pytest.importorskip("peft")

import peft_kernels as pk  # noqa: E402
from models import batch, tiny_llama  # noqa: E402


@pytest.mark.parametrize("config", [
    lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
])
def test_disable_adapter_on_a_patched_prompt_learning_model_runs_the_base_model(config):
    torch.manual_seed(0)
    model = pk.patch(peft.get_peft_model(tiny_llama(), config()).eval())
    ids, _ = batch(B=2)
    with torch.no_grad():
        enabled = model(input_ids=ids).logits[:, -ids.shape[1]:]
        with model.disable_adapter():
            disabled = model(input_ids=ids).logits
            gen = model.generate(input_ids=ids, max_new_tokens=2, do_sample=False)
        base = tiny_llama()(input_ids=ids).logits
        torch.testing.assert_close(disabled, base, atol=1e-6, rtol=1e-6)
        assert not torch.allclose(enabled, base, atol=1e-3)
        want = tiny_llama().generate(input_ids=ids, max_new_tokens=2, do_sample=False)
        assert torch.equal(gen[:, -2:], want[:, -2:])
        torch.testing.assert_close(model(input_ids=ids).logits[:, -ids.shape[1]:], enabled)  # enabled again


def test_in_place_edits_of_lora_weights_are_seen_by_the_patched_model():
    torch.manual_seed(0)
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ref = peft.get_peft_model(tiny_llama(), config).eval()
    ours = pk.patch(peft.get_peft_model(tiny_llama(), config).eval())
    ours.load_state_dict(ref.state_dict())
    ids, _ = batch(B=2)
    with torch.no_grad():
        ours(input_ids=ids)  # a first call, which could have cached a bank
        for model in (ref, ours):
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.data[...] = torch.arange(p.numel()).view(p.shape).float().sin() * 0.5  # as PEFT's tests do
        torch.testing.assert_close(ours(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
