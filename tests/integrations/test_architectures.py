"""Every adapter kind on the architectures PEFT runs: each row of a mixed MultiAdapterModel batch
equals that row alone under its own PEFT model, and patch() equals PEFT's forward, or a clear refusal."""
import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import peft_kernels as pk  # noqa: E402

V = 97


def _configs():
    t = transformers
    small = dict(vocab_size=V, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return {
        "llama": lambda: t.LlamaForCausalLM(t.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                          num_attention_heads=4, num_key_value_heads=2, **small)),
        "gpt2": lambda: t.GPT2LMHeadModel(t.GPT2Config(n_embd=32, n_layer=2, n_head=4, **small)),
        "opt": lambda: t.OPTForCausalLM(t.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                                    num_attention_heads=4, word_embed_proj_dim=32, **small)),
        "mistral": lambda: t.MistralForCausalLM(t.MistralConfig(hidden_size=32, intermediate_size=64,
                                                                num_hidden_layers=2, num_attention_heads=4,
                                                                num_key_value_heads=2, sliding_window=None, **small)),
        "qwen2": lambda: t.Qwen2ForCausalLM(t.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                          num_attention_heads=4, num_key_value_heads=2, **small)),
        "gpt_neox": lambda: t.GPTNeoXForCausalLM(t.GPTNeoXConfig(hidden_size=32, intermediate_size=64,
                                                                 num_hidden_layers=2, num_attention_heads=4, **small)),
    }


ARCHS = list(_configs())
KINDS = {
    "lora": lambda: peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear",
                                    init_lora_weights=False),
    "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    "prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
}


def _base(arch):
    torch.manual_seed(0)
    return _configs()[arch]().eval()


def _peft(arch, kind, tmp_path):
    torch.manual_seed(1)
    model = peft.get_peft_model(_base(arch), KINDS[kind]())
    if kind == "prefix":
        with torch.no_grad():
            for p in model.prompt_encoder.parameters():
                p.normal_(0, 0.5)
    model.save_pretrained(tmp_path / kind)
    return peft.PeftModel.from_pretrained(_base(arch), tmp_path / kind).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_rows_equal_their_own_peft_model(arch, tmp_path):
    refs = {kind: _peft(arch, kind, tmp_path) for kind in KINDS}
    model = pk.MultiAdapterModel(_base(arch)).eval()
    for kind in KINDS:
        model.load_adapter(tmp_path / kind, kind)
    names = ["lora", "prefix", None, "prompt", "lora"]
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, V, (len(names), 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding on a prefix row
    with torch.no_grad():
        logits = model(ids, mask, adapter_names=names).logits
        for b, name in enumerate(names):
            real = mask[b].bool()
            row = ids[b : b + 1, real]
            ref = _base(arch) if name is None else refs[name]
            want = ref(input_ids=row).logits[0, -int(real.sum()):]
            torch.testing.assert_close(logits[b][real], want, atol=1e-4, rtol=1e-4, msg=f"{arch} row {b} ({name})")


@pytest.mark.parametrize("arch", ARCHS)
def test_patched_prefix_model_equals_peft_forward(arch, tmp_path):
    ref = _peft(arch, "prefix", tmp_path)
    ours = pk.patch(peft.PeftModel.from_pretrained(_base(arch), tmp_path / "prefix").eval())
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, V, (2, 5), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :1] = 0
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        got = ours(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=1e-4)


def _sliding(tmp_path, window):
    t = transformers

    def base():
        torch.manual_seed(0)
        cfg = t.MistralConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, sliding_window=window, pad_token_id=0)
        return t.MistralForCausalLM(cfg).eval()

    torch.manual_seed(1)
    model = peft.get_peft_model(base(), KINDS["prefix"]())
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "sw")
    return base, peft.PeftModel.from_pretrained(base(), tmp_path / "sw").eval()


def test_sliding_window_prefix_slides_out_of_the_window_as_in_peft(tmp_path):
    base, ref = _sliding(tmp_path, window=4)  # 3 prefix slots + 6 tokens > the window
    ours = pk.patch(peft.PeftModel.from_pretrained(base(), tmp_path / "sw").eval())
    ids = torch.randint(3, V, (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        torch.testing.assert_close(ours(input_ids=ids).logits, want, atol=1e-4, rtol=1e-4)
        model = pk.MultiAdapterModel(base()).eval()
        model.load_adapter(tmp_path / "sw", "p")
        torch.testing.assert_close(model(ids, adapter_names=["p", None]).logits[0], want[0], atol=1e-4, rtol=1e-4)
