"""Bottleneck adapters (Houlsby / Pfeiffer) on multi_lora vs a plain-torch implementation of the equations."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("transformers")

import peft_kernels as pk  # noqa: E402
from peft_kernels.methods.bottleneck import ACTIVATIONS, BottleneckAdapterModel, find_sites  # noqa: E402
from conftest import kernel_backends  # noqa: E402
from models import batch, tiny_llama  # noqa: E402

V = 97


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                      bos_token_id=1, eos_token_id=2)).eval()


def tiny_bert(seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64, num_labels=3)).eval()


def tiny_vit(seed=0):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    return ViTModel(ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=3,
                              num_attention_heads=4, intermediate_size=64)).eval()


class PlainAdapter(nn.Module):
    """The adapter equation in plain torch around an unhooked module: y + s (W_up act(W_down y + b_d) + b_u)."""

    def __init__(self, inner, down, down_bias, up, up_bias, act, scaling):
        super().__init__()
        self.inner, self.w = inner, (down, down_bias, up, up_bias)
        self.act, self.scaling = ACTIVATIONS[act], scaling

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        y = out[0] if isinstance(out, tuple) else out
        down, down_bias, up, up_bias = self.w
        y = y + self.scaling * (self.act(y @ down.T + down_bias) @ up.T + up_bias)
        return (y, *out[1:]) if isinstance(out, tuple) else y


def plain_model(base, wrapped, name):
    """A copy of the unhooked ``base`` with adapter ``name``'s weights installed as PlainAdapter modules."""
    plain = copy.deepcopy(base)
    config, state = wrapped.configs[name], wrapped.adapter_state_dict(name)
    for module_name in config["modules"]:
        parent, _, child = module_name.rpartition(".")
        owner = plain.get_submodule(parent)
        weights = [state[f"{module_name}.{part}"].requires_grad_() for part in ("down", "down_bias", "up", "up_bias")]
        setattr(owner, child, PlainAdapter(getattr(owner, child), *weights, config["non_linearity"], config["scaling"]))
    return plain


def test_sites_per_family_and_unknown_architecture():
    llama = find_sites(tiny_llama())
    assert llama["attn"] == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    assert llama["ffn"] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    gpt2 = find_sites(tiny_gpt2(), "pfeiffer")
    assert gpt2 == {"attn": [], "ffn": ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]}
    bert = find_sites(tiny_bert())
    assert bert["attn"] == [f"bert.encoder.layer.{i}.attention.output.dense" for i in range(2)]
    assert bert["ffn"] == [f"bert.encoder.layer.{i}.output.dense" for i in range(2)]
    vit = find_sites(tiny_vit())  # BERT-style names, or Llama-style ones in newer transformers
    assert len(vit["attn"]) == len(vit["ffn"]) == 3
    assert all(n.endswith(("attention.o_proj", "attention.output.dense")) for n in vit["attn"])

    odd = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    with pytest.raises(ValueError, match="attn_modules=.*ffn_modules="):
        find_sites(odd)
    with pytest.raises(ValueError, match="matched no module"):
        find_sites(odd, ffn_modules=["nope"])
    wrapped = BottleneckAdapterModel(odd)
    wrapped.add_adapter("a", 3, ffn_modules=["2"], init_weights=False)
    x = torch.randn(4, 8)
    plain = plain_model(copy.deepcopy(odd), wrapped, "a")
    wrapped.remove()
    with torch.no_grad():
        want = plain(x)
    wrapped2 = BottleneckAdapterModel(odd)
    wrapped2.add_adapter("a", 3, ffn_modules=r"2")
    wrapped2.load_adapter_state_dict("a", wrapped.adapter_state_dict("a"))
    with torch.no_grad():
        torch.testing.assert_close(wrapped2(x), want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("make,placement,act", [
    (tiny_llama, "houlsby", "silu"), (tiny_gpt2, "houlsby", "gelu"), (tiny_bert, "houlsby", "relu"),
    (tiny_bert, "pfeiffer", "tanh"),
], ids=["llama", "gpt2", "bert", "bert-pfeiffer"])
def test_matches_plain_torch_adapters(make, placement, act):
    base = make()
    plain_base = copy.deepcopy(base)
    wrapped = BottleneckAdapterModel(base)
    wrapped.add_adapter("a", 5, placement=placement, non_linearity=act, scaling=0.7, init_weights=False,
                        generator=torch.Generator().manual_seed(3))
    assert len(wrapped.configs["a"]["modules"]) == (4 if placement == "houlsby" else 2)
    ids, mask = batch(V, B=3, L=6)
    plain = plain_model(plain_base, wrapped, "a")
    got = wrapped(ids, attention_mask=mask, adapter_names="a").logits
    want = plain(ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    probe = torch.randn(got.shape, generator=torch.Generator().manual_seed(4))
    (got * probe).sum().backward()
    (want * probe).sum().backward()
    for module_name in wrapped.configs["a"]["modules"]:  # the gradients through multi_lora equal autograd's
        bank = wrapped.banks[module_name.replace(".", "__")]
        plain_adapter = plain.get_submodule(module_name)
        for w_bank, w_plain in zip((bank.down.grad[0], bank.down_bias.grad[0], bank.up.grad[0], bank.up_bias.grad[0]),
                                   plain_adapter.w):
            torch.testing.assert_close(w_bank, w_plain.grad, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        off = wrapped(ids, attention_mask=mask, adapter_names=[None] * 3).logits
        assert torch.equal(off, plain_base(ids, attention_mask=mask).logits)  # no adapter: the base model exactly
        assert (got - off).abs().max() > 1e-4  # the adapters do change the output


def test_new_adapter_is_identity_and_only_adapters_train():
    base = tiny_llama()
    want = copy.deepcopy(base)
    wrapped = BottleneckAdapterModel(base)
    wrapped.add_adapter("a")  # r = 32 // 16 = 2
    assert wrapped.configs["a"]["r"] == 2
    ids, _ = batch(V)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(ids).logits, want(ids).logits, atol=0, rtol=0)
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("sites.banks.") for n in trainable)
    wrapped.remove()
    assert all(p.requires_grad for p in base.parameters())
    with torch.no_grad():
        torch.testing.assert_close(base(ids).logits, want(ids).logits, atol=0, rtol=0)


def _mixed(seed=0):
    base = tiny_llama(seed)
    wrapped = BottleneckAdapterModel(base)
    g = torch.Generator().manual_seed(5)
    wrapped.add_adapter("h4", 4, non_linearity="relu", init_weights=False, generator=g)
    wrapped.add_adapter("p6", 6, placement="pfeiffer", non_linearity="gelu", scaling=2.0, init_weights=False, generator=g)
    wrapped.add_adapter("h2", 2, non_linearity="silu", init_weights=False, generator=g)
    return base, wrapped


def test_mixed_batch_rows_equal_rows_alone_forward_and_gradients():
    _, wrapped = _mixed()
    names = ["h4", None, "p6", "h2", "p6", "h4"]
    ids, mask = batch(V, B=len(names), L=5, left_pad=2)
    weight = torch.randn(len(names), 5, V, generator=torch.Generator().manual_seed(9))

    def run(rows):
        wrapped.zero_grad()
        logits = wrapped(ids[rows], attention_mask=mask[rows], adapter_names=[names[r] for r in rows]).logits
        if logits.requires_grad:  # a row without an adapter touches no trainable parameter
            (logits * weight[rows]).sum().backward()
        grads = {n: p.grad.clone() for n, p in wrapped.named_parameters() if p.grad is not None}
        return logits.detach(), grads

    mixed, mixed_grads = run(list(range(len(names))))
    for r in range(len(names)):
        alone, _ = run([r])
        real = mask[r].bool()
        torch.testing.assert_close(mixed[r][real], alone[0][real], atol=1e-5, rtol=1e-5, msg=f"row {r}")
    for name in ("h4", "p6", "h2"):
        slot = wrapped.routing.names.index(name)
        _, grads = run([r for r, n in enumerate(names) if n == name])
        assert grads
        for pname, g in grads.items():
            torch.testing.assert_close(mixed_grads[pname][slot], g[slot], atol=1e-5, rtol=1e-4, msg=f"{name} {pname}")
    # the Pfeiffer adapter has no slot at the attention sites: no gradient there
    attn_bank = wrapped.banks["model__layers__0__self_attn__o_proj"]
    assert attn_bank._ranks == [4, 0, 2]
    slot = wrapped.routing.names.index("p6")
    for part in ("down", "down_bias", "up", "up_bias"):
        assert not mixed_grads[f"sites.banks.model__layers__0__self_attn__o_proj.{part}"][slot].any()


@pytest.mark.parametrize("backend", kernel_backends("lora_shrink"))
def test_every_shrink_expand_backend_gives_the_reference_answer(backend):
    _, wrapped = _mixed()
    ids, mask = batch(V, B=4, L=5)
    names = ["h4", None, "p6", "h2"]
    results = []
    for name in ("reference", backend):
        with pk.use_backend(name):
            wrapped.zero_grad()
            out = wrapped(ids, attention_mask=mask, adapter_names=names).logits
            out.square().sum().backward()
            assert pk.last_backend("lora_shrink") == pk.last_backend("lora_expand") == name
        results.append((out.detach(), {n: p.grad.clone() for n, p in wrapped.named_parameters() if p.grad is not None}))
    (want, want_grads), (got, grads) = results
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert set(grads) == set(want_grads)
    for n, g in want_grads.items():
        torch.testing.assert_close(grads[n], g, atol=1e-5, rtol=1e-4, msg=n)


def test_two_adapters_learn_two_tasks_in_mixed_batches():
    base = tiny_llama()
    base.lm_head.weight.data *= 20  # random init's logits are too flat to learn a sequence quickly
    wrapped = BottleneckAdapterModel(base).train()
    wrapped.add_adapter("a", 8, non_linearity="gelu")
    wrapped.add_adapter("b", 4, placement="pfeiffer")
    g = torch.Generator().manual_seed(0)
    targets = {n: torch.randint(3, V, (1, 8), generator=g) for n in ("a", "b")}
    ids = torch.cat([targets["a"], targets["b"], targets["a"], targets["b"]])
    names = ["a", "b", "a", "b"]
    opt = torch.optim.Adam([p for p in wrapped.parameters() if p.requires_grad], lr=5e-2)
    history = {"a": [], "b": []}
    for _ in range(30):
        logits = wrapped(ids, adapter_names=names).logits[:, :-1]
        losses = F.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1), reduction="none").view(4, -1).mean(1)
        for n in history:
            history[n].append(float(losses.detach()[[i for i, m in enumerate(names) if m == n]].mean()))
        opt.zero_grad()
        losses.sum().backward()
        opt.step()
    for n, losses in history.items():
        assert losses[-1] < losses[0] - 2.0, (n, losses)


def test_save_reload_and_unload():
    _, wrapped = _mixed()
    ids, mask = batch(V, B=3)
    names = ["h4", "p6", "h2"]
    with torch.no_grad():
        want = wrapped(ids, attention_mask=mask, adapter_names=names).logits
    states = {n: wrapped.adapter_state_dict(n) for n in names}
    assert set(states["p6"]) == {f"model.layers.{i}.mlp.{p}" for i in range(2)
                                 for p in ("down", "down_bias", "up", "up_bias")}

    fresh = BottleneckAdapterModel(tiny_llama())
    fresh.add_adapter("h4", 4)
    fresh.add_adapter("p6", 6, placement="pfeiffer", non_linearity="gelu", scaling=2.0)
    fresh.add_adapter("h2", 2, non_linearity="silu")
    for n in names:
        fresh.load_adapter_state_dict(n, states[n])
    with pytest.raises(ValueError, match="missing"):
        fresh.load_adapter_state_dict("h4", states["p6"])
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids, attention_mask=mask, adapter_names=names).logits, want, atol=0, rtol=0)
        fresh.unload_adapter("p6")
        got = fresh(ids[[0, 2]], attention_mask=mask[[0, 2]], adapter_names=["h4", "h2"]).logits
    torch.testing.assert_close(got, want[[0, 2]], atol=1e-6, rtol=1e-6)
    assert fresh.adapters == ["h4", "h2"]
    with pytest.raises(ValueError, match="unknown adapter"):
        fresh(ids, adapter_names="p6")


def test_bf16_model_keeps_dtype_and_passes_unadapted_rows_through_exactly():
    base = tiny_llama().to(torch.bfloat16)
    plain = copy.deepcopy(base)
    wrapped = BottleneckAdapterModel(base)
    wrapped.add_adapter("a", 4, init_weights=False)
    ids, _ = batch(V, B=2)
    with torch.no_grad():
        out = wrapped(ids, adapter_names=["a", None]).logits
        assert out.dtype == torch.bfloat16
        assert torch.equal(out[1], plain(ids[1:]).logits[0])
        assert not torch.allclose(out[0].float(), plain(ids[:1]).logits[0].float(), atol=1e-2)


def test_generate_routes_rows():
    _, wrapped = _mixed()
    ids, _ = batch(V, B=2, L=4)
    with torch.no_grad():
        got = wrapped.generate(ids, adapter_names=["h4", None], max_new_tokens=3, do_sample=False)
        for r, name in enumerate(["h4", None]):
            x = ids[r:r + 1]
            for _ in range(3):
                nxt = wrapped(x, adapter_names=[name]).logits[:, -1].argmax(-1, keepdim=True)
                x = torch.cat([x, nxt], 1)
            assert torch.equal(got[r:r + 1], x)
