"""MultiAdapterModel: one batch, adapters of every kind, each row equal to its own PEFT model."""

import pytest
import torch

peft = pytest.importorskip("peft")

import peft_kernels as pk  # noqa: E402
from models import batch, greedy_by_forward, tiny_llama  # noqa: E402
from peft_kernels.integrations.peft_io import AdapterFormatError  # noqa: E402

PEFT_CONFIGS = {
    "lora_qv": lambda: peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                       init_lora_weights=False),
    "lora_all": lambda: peft.LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=4, target_modules="all-linear",
                                        use_rslora=True, init_lora_weights=False),
    "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
    "prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "ptuning": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=16),
}


@pytest.fixture(scope="module")
def peft_dirs(tmp_path_factory):
    """Each adapter trained-by-nobody but randomised, saved by PEFT, plus the PEFT model itself."""
    out = {}
    for i, (name, make) in enumerate(PEFT_CONFIGS.items()):
        torch.manual_seed(10 + i)
        model = peft.get_peft_model(tiny_llama(), make())
        if name == "prefix":
            with torch.no_grad():
                for p in model.prompt_encoder.parameters():
                    p.normal_(0, 0.5)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = (path, peft.PeftModel.from_pretrained(tiny_llama(), path).eval())
    return out


def _multi(peft_dirs):
    model = pk.MultiAdapterModel(tiny_llama())
    for name, (path, _) in peft_dirs.items():
        model.load_adapter(path, name)
    return model


def test_each_row_of_a_mixed_batch_equals_its_own_peft_model(peft_dirs):
    model = _multi(peft_dirs).eval()
    names = ["prompt", "lora_qv", None, "prefix", "lora_all", "ptuning", "prefix"]
    ids, mask = batch(B=len(names), L=6, left_pad=2)
    with torch.no_grad():
        logits = model(ids, mask, adapter_names=names).logits
        assert logits.shape == (len(names), 6, 97)
        for b, name in enumerate(names):
            real = mask[b].bool()
            row = ids[b : b + 1, real]
            if name is None:
                want = tiny_llama()(input_ids=row).logits[0]
            else:
                want = peft_dirs[name][1](input_ids=row).logits[0, -int(real.sum()):]
            torch.testing.assert_close(logits[b][real], want, atol=1e-5, rtol=1e-5, msg=f"row {b} ({name})")


def test_mixed_generate_equals_greedy_decoding_by_each_row_peft_forward(peft_dirs):
    model = _multi(peft_dirs).eval()
    names = ["prefix", "prompt", "lora_all", None]
    ids, _ = batch(B=4, L=4)
    with torch.no_grad():
        got = model.generate(ids, adapter_names=names, max_new_tokens=4, do_sample=False)
        for b, name in enumerate(names):
            fwd = (lambda x: tiny_llama()(input_ids=x).logits) if name is None else (
                lambda x, m=peft_dirs[name][1]: m(input_ids=x).logits)
            assert torch.equal(got[b : b + 1], greedy_by_forward(fwd, ids[b : b + 1], 4)), f"row {b} ({name})"


def test_training_a_mixed_batch_gives_each_adapter_its_own_rows_gradient(peft_dirs):
    model = _multi(peft_dirs).train()
    for p in model.model.parameters():
        p.requires_grad_(False)
    for layer in pk.methods.lora.lora_layers(model.model).values():
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    names = ["lora_qv", "prefix", "prompt", "lora_all", "ptuning", "lora_qv"]
    ids, mask = batch(B=len(names), L=5)

    def grads(rows):
        model.zero_grad()
        out = model(ids[rows], mask[rows], labels=ids[rows], adapter_names=[names[r] for r in rows],
                    num_items_in_batch=torch.tensor(1))  # the loss is then a sum over tokens
        out.loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    mixed = grads(list(range(len(names))))
    assert any("kinds.prefix.tables.prefix." in n for n in mixed) and any("kinds.prompt.tables.prompt." in n for n in mixed)
    for name in dict.fromkeys(names):
        alone = grads([r for r, n in enumerate(names) if n == name])
        for pname, g in alone.items():
            if "lora_" in pname:
                slot = model.kind("LORA").routing.names.index(name)
                torch.testing.assert_close(mixed[pname][slot], g[slot], atol=1e-5, rtol=1e-4)
            else:
                torch.testing.assert_close(mixed[pname], g, atol=1e-5, rtol=1e-4)


def test_save_and_reload_round_trip_through_peft(tmp_path, peft_dirs):
    model = _multi(peft_dirs).eval()
    ids, _ = batch(B=2)
    for name in PEFT_CONFIGS:
        model.save_adapter(name, tmp_path / name)
        reloaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / name).eval()
        with torch.no_grad():
            want = peft_dirs[name][1](input_ids=ids).logits
            torch.testing.assert_close(reloaded(input_ids=ids).logits, want, atol=1e-6, rtol=1e-6)
    assert not list(tmp_path.rglob(".adapter*"))  # no temp files left behind


def test_add_train_save_new_adapters_of_every_kind(tmp_path):
    model = pk.MultiAdapterModel(tiny_llama())
    for p in model.model.parameters():
        p.requires_grad_(False)
    model.add_adapter("l", peft.LoraConfig(r=4, target_modules=["q_proj", "k_proj"], init_lora_weights=False))
    model.add_adapter("x", {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3, "prefix_projection": True,
                            "encoder_hidden_size": 16})
    model.add_adapter("p", {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2})
    model.add_adapter("e", {"peft_type": "P_TUNING", "num_virtual_tokens": 2, "encoder_reparameterization_type": "LSTM"})
    for layer in pk.methods.lora.lora_layers(model.model).values():
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    assert model.adapters == {"l": "LORA", "x": "PREFIX_TUNING", "p": "PROMPT_TUNING", "e": "P_TUNING"}
    ids, mask = batch(B=4, L=5)
    target = torch.full_like(ids, 7)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(10):
        loss = model(ids, mask, labels=target, adapter_names=["l", "x", "p", "e"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    model.save_adapter("l", tmp_path / "l")
    assert peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "l") is not None


def test_bad_adapter_directories_leave_loaded_adapters_untouched(tmp_path, peft_dirs):
    model = _multi(peft_dirs)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    adapters = dict(model.adapters)
    with pytest.raises(AdapterFormatError, match="does not exist"):
        model.load_adapter(tmp_path / "missing", "new")
    wrong = peft.get_peft_model(tiny_llama(hidden=48), PEFT_CONFIGS["lora_qv"]())
    wrong.save_pretrained(tmp_path / "wrong")
    with pytest.raises(AdapterFormatError, match="wrong base model"):
        model.load_adapter(tmp_path / "wrong", "new")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (tmp_path / "corrupt" / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(AdapterFormatError, match="safetensors"):
        model.load_adapter(tmp_path / "corrupt", "new")
    with pytest.raises(ValueError, match="already loaded"):
        model.load_adapter(peft_dirs["prompt"][0], "prompt")
    assert model.adapters == adapters
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_unload_and_unknown_names():
    model = pk.MultiAdapterModel(tiny_llama()).eval()
    model.add_adapter("a", peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.add_adapter("b", peft.LoraConfig(r=4, target_modules=["v_proj"], init_lora_weights=False))
    ids, _ = batch(B=2)
    with torch.no_grad():
        before = model(ids, adapter_names=["b", None]).logits
        model.unload_adapter("a")
        torch.testing.assert_close(model(ids, adapter_names=["b", None]).logits, before)
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['a'\]"):
        model(ids, adapter_names=["a", None])
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(ids, adapter_names=["b", "b"], num_beams=2)


def test_merge_and_unmerge_one_lora_adapter():
    model = pk.MultiAdapterModel(tiny_llama()).eval()
    model.add_adapter("a", peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.add_adapter("b", peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    ids, _ = batch(B=3)
    base_weights = {n: p.clone() for n, p in model.model.named_parameters() if "base.weight" in n}
    with torch.no_grad():
        want = model(ids, adapter_names="a").logits
        model.merge_adapter("a")
        torch.testing.assert_close(model(ids).logits, want, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="merged into the base weights"):
            model(ids, adapter_names=["a", "b", None])
        with pytest.raises(ValueError, match="already merged"):
            model.merge_adapter("b")
        model.unmerge_adapter()
        for n, p in model.model.named_parameters():
            if n in base_weights:
                torch.testing.assert_close(p, base_weights[n], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(model(ids, adapter_names="a").logits, want, atol=1e-5, rtol=1e-5)


def test_inference_chooses_the_lora_kernel_once_per_call_not_once_per_layer(peft_dirs, monkeypatch):
    import sys

    ops = sys.modules["peft_kernels.ops._dispatch"]
    model = _multi(peft_dirs).eval()
    calls = []
    real = ops.select
    monkeypatch.setattr(ops, "select", lambda op, *a: calls.append(op) or real(op, *a))
    ids = torch.randint(3, 97, (3, 5))
    names = ["lora_qv", "lora_all", None]
    with torch.no_grad():
        model(ids, adapter_names=names)
        assert calls == ["multi_lora"]  # every LoRA layer of the call, one choice
        model(ids, adapter_names=names)
        assert calls == ["multi_lora"] * 2  # the next call chooses again (a backend forced in between counts)
        with pk.use_backend("reference"):
            ref = model(ids, adapter_names=names).logits
        assert pk.last_backend("multi_lora") == "reference"
        assert torch.allclose(model(ids, adapter_names=names).logits, ref, atol=1e-5)


def test_inference_runs_the_first_lora_layer_through_the_op_and_the_others_straight_on_its_kernel(peft_dirs,
                                                                                                   monkeypatch):
    import sys

    lora = sys.modules["peft_kernels.methods.lora"]
    model = _multi(peft_dirs).eval()
    calls = []
    real = lora.multi_lora_rows
    monkeypatch.setattr(lora, "multi_lora_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    layers = [m for m in model.modules() if isinstance(m, lora.LoraLinear)]
    ids = torch.randint(3, 97, (3, 5))
    names = ["lora_qv", "lora_all", None]
    with torch.no_grad():
        fast = model(ids, adapter_names=names).logits
    assert len(layers) > 1 and len(calls) == 1
    with torch.enable_grad():  # autograd: every layer through the registered op
        slow = model(ids, adapter_names=names).logits
    assert len(calls) == 1 + len(layers) and slow.requires_grad
    torch.testing.assert_close(fast, slow.detach(), rtol=0, atol=0)


def test_the_direct_lora_path_still_runs_hooks_on_the_base_layers(peft_dirs):
    import sys

    lora = sys.modules["peft_kernels.methods.lora"]
    model = _multi(peft_dirs).eval()
    layers = [m for m in model.modules() if isinstance(m, lora.LoraLinear)]
    ids = torch.randint(3, 97, (3, 5))
    names = ["lora_qv", "lora_all", None]
    with torch.no_grad():
        want = model(ids, adapter_names=names).logits
        seen = []
        handle = layers[-1].base.register_forward_hook(lambda m, args, out: seen.append(1) or out * 2)
        try:
            got = model(ids, adapter_names=names).logits
        finally:
            handle.remove()
    assert seen == [1]  # the last LoRA layer's base ran as a module, with its hook
    assert not torch.allclose(got, want)  # ... and its doubled output reached the logits


def test_multi_lora_add_adds_in_place_what_multi_lora_fwd_returns():
    from peft_kernels import _ext

    g = torch.Generator().manual_seed(1)
    x, base = torch.randn(7, 12, generator=g), torch.randn(7, 12, generator=g)
    a, b = torch.randn(3, 5, 12, generator=g), torch.randn(3, 12, 5, generator=g)
    index, scaling = torch.tensor([0, 2, -1, 1, 2, 0, -1], dtype=torch.int32), torch.rand(3, generator=g)
    ranks = torch.tensor([5, 1, 3], dtype=torch.int32)
    want = _ext.CPU.module.multi_lora_fwd(x, a, b, index, scaling, ranks, base)
    target = base.clone()
    assert _ext.CPU.module.multi_lora_add_(x, a, b, index, scaling, ranks, target) is target
    torch.testing.assert_close(target, want, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="contiguous"):
        _ext.CPU.module.multi_lora_add_(x, a, b, index, scaling, ranks, base.t().contiguous().t())


def test_decode_steps_run_the_base_linear_and_the_lora_term_in_one_kernel(peft_dirs, monkeypatch):
    import sys

    from peft_kernels import _ext

    if _ext.CPU.module is None or not _ext.CPU.build_info.get("multi_lora_linear"):
        pytest.skip("multi_lora_linear needs the C++ extension on an AVX2 or AVX-512 CPU")
    lora = sys.modules["peft_kernels.methods.lora"]
    model = _multi(peft_dirs).eval()
    names = ["lora_qv", "prefix", "lora_all", None, "lora_all"]
    ids, _ = batch(B=len(names), L=5)
    calls = []
    real = _ext.CPU.module.multi_lora_linear
    monkeypatch.setattr(_ext.CPU.module, "multi_lora_linear", lambda *a: calls.append(a[0].shape[0]) or real(*a))

    def run():
        with torch.no_grad():
            out = model.generate(ids, adapter_names=names, max_new_tokens=3, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        return out.sequences, torch.stack(out.logits)

    fused_tokens, fused_logits = run()
    assert calls and set(calls) == {len(names)}  # the decode steps' LoRA layers (rows x 1 token)
    monkeypatch.setattr(lora, "fused_linear_kernel", lambda kernel, x: None)
    n = len(calls)
    tokens, logits = run()
    assert len(calls) == n  # F.linear + multi_lora_add_ this time
    assert torch.equal(fused_tokens, tokens)
    torch.testing.assert_close(fused_logits, logits, atol=1e-5, rtol=1e-5)
