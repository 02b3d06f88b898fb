"""The adapter-kind registry and the model layer's guarantees: per-call routing (threads), atomic
saves, failed adds and loads that leave no trace, checked configs, a bottleneck kind next to the rest."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import peft_kernels as pk
from models import batch, tiny_llama
from peft_kernels.adapters import AdapterKind, KINDS, register_kind
from peft_kernels.integrations.peft_io import AdapterFormatError, read_adapter_dir, write_adapter_dir

LORA = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}


def _model(**adapters):
    model = pk.MultiAdapterModel(tiny_llama()).eval()
    for name, config in adapters.items():
        model.add_adapter(name, config)
    return model


def test_bottleneck_rows_mix_with_lora_rows_and_round_trip_through_a_directory(tmp_path):
    torch.manual_seed(0)
    model = _model(l=LORA, b={"peft_type": "BOTTLENECK", "r": 3})
    slot = model.kind("BOTTLENECK").sites
    with torch.no_grad():  # a new bottleneck adapter is the identity: give it weights
        for bank in slot.banks.values():
            bank.up.normal_()
    ids, _ = batch(B=3)
    names = ["b", "l", None]
    with torch.no_grad():
        mixed = model(ids, adapter_names=names).logits
        for r, name in enumerate(names):
            torch.testing.assert_close(mixed[r], model(ids[r : r + 1], adapter_names=[name]).logits[0],
                                       atol=1e-5, rtol=1e-5)
        assert not torch.allclose(mixed[0], model(ids[:1], adapter_names=[None]).logits[0])
    model.save_adapter("b", tmp_path / "b")
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["peft_type"] == "BOTTLENECK"
    fresh = _model()
    fresh.load_adapter(tmp_path / "b", "b")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids, adapter_names="b").logits, model(ids, adapter_names="b").logits)


def test_a_new_kind_is_one_class_and_one_registration():
    seen = []

    class Recorder(AdapterKind):
        peft_type, key, config_class = "RECORDER_TEST", "recorder", dict

        def create(self, name, config):
            self.names.append(name)
            return dict(config)

        def remove(self, name):
            self.names.remove(name)

        def route(self, batch):
            seen.append(batch.rows_of(self))

    register_kind(Recorder)
    try:
        model = _model(l=LORA)
        model.add_adapter("r", {"peft_type": "RECORDER_TEST"})
        ids, _ = batch(B=3)
        with torch.no_grad():
            model(ids, adapter_names=["r", "l", None])
        assert seen == [["r", None, None]]
        model.unload_adapter("r")
        assert model.adapters == {"l": "LORA"}
    finally:
        del KINDS["RECORDER_TEST"]


def test_concurrent_calls_with_different_adapters_each_get_their_own():
    model = _model(a=LORA, b={**LORA, "r": 2}, p={"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3},
                   t={"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2})
    ids, _ = batch(B=2)
    choices = [["a", "b"], ["p", None], ["t", "a"], [None, None], ["b", "p"]]
    with torch.no_grad():
        want = {tuple(c): model(ids, adapter_names=c).logits for c in choices}
    wrong, errors = [], []

    def worker(k):
        try:
            for i in range(12):
                c = choices[(k + i) % len(choices)]
                with torch.no_grad():
                    got = model(ids, adapter_names=c).logits
                if not torch.allclose(got, want[tuple(c)], atol=1e-5, rtol=1e-5):
                    wrong.append(c)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not wrong, (errors, wrong)
    with torch.no_grad():  # nothing lingers after a call: the wrapped model alone is the base model
        torch.testing.assert_close(model.model(input_ids=ids).logits, want[(None, None)])


def test_use_backend_is_per_thread():
    seen = {}
    started = threading.Event()

    def other():
        started.wait()
        from peft_kernels.ops._dispatch import forced_backend
        seen["other"] = forced_backend()

    t = threading.Thread(target=other)
    t.start()
    with pk.use_backend("reference"):
        started.set()
        t.join()
    assert seen["other"] is None


@pytest.mark.parametrize("bad, field", [
    ({"lora_alpha": "eight"}, "lora_alpha"),
    ({"alpha_pattern": {"q_proj(": 4}}, "alpha_pattern"),
    ({"lora_dropout": 1.0}, "lora_dropout"),
    ({"r": 0}, "r=0"),
    ({"target_modules": ["no_such_module"]}, "matched no nn.Linear"),
])
def test_a_bad_lora_config_names_the_field_and_changes_nothing(bad, field):
    model = _model(a=LORA)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=field):
        model.add_adapter("bad", {**LORA, **bad})
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.adapters == {"a": "LORA"}
    model.add_adapter("c", {**LORA, "r": 2})  # the next adapter gets the next slot, in every layer
    layers = pk.methods.lora.lora_layers(model.model).values()
    assert [layer.lora_A.shape[0] for layer in layers] == [2] * len(layers)
    assert [int(layer.ranks[1]) for layer in layers] == [2] * len(layers)


@pytest.mark.parametrize("config, field", [
    ({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 0}, "num_virtual_tokens"),
    ({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": -1}, "num_virtual_tokens"),
    ({"peft_type": "NOT_A_TYPE"}, "not supported"),
])
def test_bad_prompt_learning_configs_are_refused(config, field):
    model = _model()
    with pytest.raises(ValueError, match=field):
        model.add_adapter("x", config)
    assert model.adapters == {}


@pytest.mark.parametrize("name", ["", "../up", "a/b", "..", 3])
def test_adapter_names_are_checked(name):
    with pytest.raises(ValueError, match="adapter name"):
        _model().add_adapter(name, LORA)


def test_unknown_names_list_the_loaded_ones(tmp_path):
    model = _model(a=LORA)
    for call in (lambda: model.unload_adapter("z"), lambda: model.save_adapter("z", tmp_path / "z"),
                 lambda: model.adapter_state_dict("z")):
        with pytest.raises(ValueError, match=r"unknown adapter 'z'; loaded: \['a'\]"):
            call()


def test_prefix_geometry_is_checked_by_heads_not_only_width(tmp_path):
    src = pk.MultiAdapterModel(tiny_llama(heads=4, kv_heads=4, hidden=32))  # 4 KV heads x 8
    src.add_adapter("p", {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 2})
    src.save_adapter("p", tmp_path / "p")
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    config["num_attention_heads"] = 2  # same total width, another head layout
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFormatError, match="KV heads"):
        pk.MultiAdapterModel(tiny_llama(heads=4, kv_heads=4, hidden=32)).load_adapter(tmp_path / "p", "p")


def test_adapters_follow_the_models_train_or_eval_mode_and_the_base_is_frozen():
    model = pk.MultiAdapterModel(tiny_llama()).eval()
    model.add_adapter("a", {**LORA, "lora_dropout": 0.5})
    model.add_adapter("p", {"peft_type": "P_TUNING", "num_virtual_tokens": 2, "encoder_dropout": 0.5})
    assert not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.model.parameters() if p.dim() == 2 and p.shape[0] == 97)
    ids, _ = batch(B=2)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, adapter_names="a").logits, model(ids, adapter_names="a").logits)


def test_a_second_apply_keeps_the_active_adapter():
    runner = pk.apply(tiny_llama(), pk.api.LoraConfig(r=2, target_modules=["q_proj"]), name="first")
    pk.apply(runner, pk.api.PromptTuningConfig(num_virtual_tokens=2), name="second")
    assert runner.active_adapter == "first"


def test_saved_files_have_the_usual_permissions(tmp_path):
    model = _model(a=LORA)
    model.save_adapter("a", tmp_path / "a")
    umask = os.umask(0)
    os.umask(umask)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "a" / f).stat().st_mode & 0o777 == 0o666 & ~umask


_SAVER = """
import sys, torch
from peft_kernels.integrations.peft_io import write_adapter_dir
path = sys.argv[1]
i = 0
while True:
    i += 1
    write_adapter_dir(path, {"peft_type": "LORA", "version": i}, {"w": torch.full((256, 256), float(i))})
"""


def test_a_save_killed_at_any_moment_leaves_one_complete_version(tmp_path):
    target = tmp_path / "adapter"
    write_adapter_dir(target, {"peft_type": "LORA", "version": 0}, {"w": torch.zeros(256, 256)})
    rng = torch.Generator().manual_seed(0)
    for _ in range(12):
        child = subprocess.Popen([sys.executable, "-c", _SAVER, str(target)], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE)
        time.sleep(1.0 + float(torch.rand((), generator=rng)) * 0.5)  # import torch, then some saves
        child.send_signal(signal.SIGKILL)
        child.wait()
        config, state = read_adapter_dir(target)  # recovers a kill between the two renames
        assert float(state["w"][0, 0]) == config["version"] and torch.all(state["w"] == config["version"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"], "temporary siblings left behind"


def test_info_shows_a_forced_backend_and_rejects_a_bogus_one(monkeypatch, capsys):
    from peft_kernels.__main__ import main

    monkeypatch.setenv("PEFT_KERNELS_BACKEND", "reference")
    assert main(["info"]) == 0
    assert "forced backend: reference" in capsys.readouterr().out
    monkeypatch.setenv("PEFT_KERNELS_BACKEND", "bogus")
    assert main(["info"]) == 2
    assert "'bogus' is not a backend" in capsys.readouterr().err
    with pytest.raises(pk.BackendUnavailableError, match="unknown backend 'bogus'"):
        with pk.use_backend("bogus"):
            pass


def test_backward_keeps_the_backend_its_forward_was_forced_to():
    from peft_kernels.ops import _dispatch

    if not _dispatch.status("cpu")["triton"][0]:
        pytest.skip("the Triton interpreter is not usable here")
    x = torch.randn(6, 8, requires_grad=True)
    a, b = torch.randn(2, 4, 8, requires_grad=True), torch.randn(2, 8, 4)
    with pk.use_backend("triton"):  # never the automatic choice for CPU tensors
        y = pk.multi_lora(x, a, b, torch.tensor([0, 1, -1, 0, 1, 1]), torch.ones(2))
    y.sum().backward()  # outside the block
    assert pk.last_backend("multi_lora_backward") == "triton"


def test_architectures_whose_attention_bypasses_the_interface_refuse_prefixes():
    from transformers import BloomConfig, BloomForCausalLM

    bloom = BloomForCausalLM(BloomConfig(vocab_size=97, hidden_size=32, n_layer=2, n_head=4))
    model = pk.MultiAdapterModel(bloom)
    with pytest.raises(ValueError, match="BloomForCausalLM does not run its attention through"):
        model.add_adapter("p", {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 2})
    assert model.adapters == {} and bloom.config._attn_implementation != "peft_prefix"
    model.add_adapter("t", {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2})  # soft prompts still work


def test_soft_prompts_and_packing_on_encoder_decoder_models_are_refused_clearly():
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=97, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16))
    model = pk.MultiAdapterModel(t5)
    with pytest.raises(ValueError, match="encoder-decoder"):
        model.add_adapter("p", {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2})
    assert "encoder-decoder" in model.pack_refusal()


def test_bf16_is_refused_by_the_triton_interpreter_rather_than_computed_wrong():
    from peft_kernels.ops import _dispatch

    if not _dispatch.status("cpu")["triton"][0]:
        pytest.skip("the Triton interpreter is not usable here")
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    a, b = torch.randn(1, 2, 8, dtype=torch.bfloat16), torch.randn(1, 8, 2, dtype=torch.bfloat16)
    with pk.use_backend("triton"):
        with pytest.raises(pk.BackendUnavailableError, match="interpreter computes bf16"):
            pk.multi_lora(x, a, b, None, torch.ones(1))
        pk.multi_lora(x.float(), a.float(), b.float(), None, torch.ones(1))
        assert pk.last_backend("multi_lora") == "triton"


def test_patch_refuses_prefix_tuning_where_attention_bypasses_the_interface():
    peft = pytest.importorskip("peft")
    from transformers import BloomConfig, BloomForCausalLM

    bloom = BloomForCausalLM(BloomConfig(vocab_size=97, hidden_size=32, n_layer=2, n_head=4))
    model = peft.get_peft_model(bloom, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(ValueError, match="Bloom"):
        pk.patch(model)
