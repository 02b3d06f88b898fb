"""Gradient checkpointing with every adapter kind: the same gradients as without, less memory."""
import pytest
import torch

peft = pytest.importorskip("peft")

import peft_kernels as pk  # noqa: E402
from models import batch, tiny_llama  # noqa: E402
from peft_kernels.bench.harness import cpu_peak_bytes  # noqa: E402

ADAPTERS = {
    "lora": {"peft_type": "LORA", "r": 4, "target_modules": "all-linear", "init_lora_weights": False},
    "prefix": {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3, "prefix_projection": True},
    "v2": {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 2},
    "prompt": {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2},
    "ptuning": {"peft_type": "P_TUNING", "num_virtual_tokens": 2, "encoder_hidden_size": 16},
}


def _model(checkpointing: bool, layers=2, hidden=32):
    torch.manual_seed(0)
    model = pk.MultiAdapterModel(tiny_llama(layers=layers, hidden=hidden))
    for name, config in ADAPTERS.items():
        model.add_adapter(name, config)
    if checkpointing:
        model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def _grads(model, ids, mask, names):
    model.zero_grad()
    model(ids, mask, labels=ids, adapter_names=names).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_checkpointed_mixed_batch_gives_the_same_gradients():
    names = ["lora", "prefix", "v2", "prompt", "ptuning", None]
    ids, mask = batch(B=len(names), L=6, left_pad=2)
    plain, ckpt = _model(False), _model(True)
    assert ckpt.model.is_activation_checkpointing if hasattr(ckpt.model, "is_activation_checkpointing") else True
    want, got = _grads(plain, ids, mask, names), _grads(ckpt, ids, mask, names)
    assert want.keys() == got.keys() and any("prefix" in n for n in want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=1e-5, msg=n)


def test_patched_peft_prefix_model_trains_with_checkpointing():
    def make():
        torch.manual_seed(0)
        return pk.patch(peft.get_peft_model(tiny_llama(), peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                                    num_virtual_tokens=3)).train())

    ids, _ = batch(B=2, L=5)
    plain, ckpt = make(), make()
    ckpt.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    grads = []
    for model in (plain, ckpt):
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-5, rtol=1e-5, msg=n)


def test_checkpointing_lowers_peak_memory():
    names = ["lora", "prefix", "prompt", None]
    ids, mask = batch(B=4, L=192)
    peaks = []
    for checkpointing in (False, True):
        model = _model(checkpointing, layers=4, hidden=64)
        peaks.append(cpu_peak_bytes(lambda: model(ids, mask, labels=ids, adapter_names=names).loss.backward()))
    assert peaks[1] < 0.8 * peaks[0], peaks
