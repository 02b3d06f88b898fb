"""Prefix tuning of encoder-decoder models (BART, T5): patch() against PEFT, MultiAdapterModel against
PEFT (PEFT's directories) and against a plain reference of the paper's three prefixes."""
import copy
import re
import warnings

import pytest
import torch
from models import assert_same_grads  # noqa: E402

peft = pytest.importorskip("peft")

import peft_kernels as pk  # noqa: E402
from peft_kernels import attention as attn  # noqa: E402
from peft_kernels.cache_utils import cache_kw  # noqa: E402

V = 64
REF = "h6_plain_prefix_reference"
ARCHS = ["bart", "t5"]


def tiny(arch: str, seed: int = 0, layers: int = 2):
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    if arch == "bart":
        config = BartConfig(vocab_size=V, d_model=32, encoder_layers=layers, decoder_layers=layers,
                            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                            decoder_ffn_dim=64,
                            max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                            pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                            forced_eos_token_id=None)
        model = BartForConditionalGeneration(config)
    else:
        config = T5Config(vocab_size=V, d_model=32, d_kv=8, num_heads=4, num_layers=layers, d_ff=64, dropout_rate=0.0,
                          pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        model = T5ForConditionalGeneration(config)
    model.generation_config.eos_token_id = None
    model.generation_config.forced_eos_token_id = None
    return model.eval()


def enc_batch(B: int = 3, L: int = 6, right_pad: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    if right_pad:
        mask[0, -right_pad:] = 0
    dec = torch.randint(3, V, (B, 4), generator=g)
    return ids, mask, dec


def peft_prefix_model(arch: str, P: int = 3, seed: int = 0, layers: int = 2, projection: bool = False):
    ref = peft.get_peft_model(tiny(arch, seed, layers), peft.PrefixTuningConfig(
        task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P, prefix_projection=projection, encoder_hidden_size=16))
    with torch.no_grad():  # PEFT initialises the table near zero; make the prefix matter
        for p in ref.prompt_encoder.parameters():
            p.normal_(0, 0.5)
    return ref


def greedy(forward, ids, mask, start: int, steps: int):
    """Greedy decoding by repeated full forwards (no cache): the ground truth for generate()."""
    dec = torch.full((ids.shape[0], 1), start, dtype=torch.long)
    for _ in range(steps):
        logits = forward(ids, mask, dec)
        dec = torch.cat([dec, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return dec


# ------------------------------------------------------------------ patch(): PEFT's forward

@pytest.mark.parametrize("layers", [2, 3], ids=["2-layers", "3-layers"])
@pytest.mark.parametrize("arch", ARCHS)
def test_patched_seq2seq_prefix_logits_loss_and_grads_match_peft(arch, layers):
    ref = peft_prefix_model(arch, layers=layers, projection=True)
    ours = pk.patch(copy.deepcopy(ref))
    ids, mask, dec = enc_batch()
    labels = dec.clone()
    ref.train(), ours.train()
    out_ref = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, labels=labels)
    out = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, labels=labels)
    torch.testing.assert_close(out.logits, out_ref.logits, atol=1e-5, rtol=1e-5)
    assert pk.last_backend("prefix_attention") is not None or arch == "t5"  # T5 runs cat + SDPA with its bias
    out_ref.loss.backward()
    out.loss.backward()
    assert_same_grads(ours, ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_patched_seq2seq_generate_equals_greedy_decoding_by_peft_forward(arch):
    ref = peft_prefix_model(arch, seed=1)
    ours = pk.patch(copy.deepcopy(ref))
    ids, mask, _ = enc_batch(B=2)
    start = ref.base_model.config.decoder_start_token_id
    with torch.no_grad():
        want = greedy(lambda i, m, d: ref(input_ids=i, attention_mask=m, decoder_input_ids=d).logits, ids, mask,
                      start, 5)
        got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_seq2seq_prefix_never_reaches_the_encoder_and_patch_keeps_that(arch):
    """PEFT's encoder output is the base model's (the prefix sits in the decoder's cache); patch() agrees."""
    ref = peft_prefix_model(arch)
    base = copy.deepcopy(ref.base_model)
    ours = pk.patch(copy.deepcopy(ref))
    ids, mask, dec = enc_batch()
    with torch.no_grad():
        plain = base(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
        with_prefix = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
        patched = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
    torch.testing.assert_close(with_prefix.encoder_last_hidden_state, plain.encoder_last_hidden_state)
    torch.testing.assert_close(patched.encoder_last_hidden_state, plain.encoder_last_hidden_state)
    assert not torch.allclose(with_prefix.logits, plain.logits, atol=1e-3)  # the decoder prefix matters


def test_patch_refuses_seq2seq_prompt_tuning_and_unpatch_restores():
    ref = peft.get_peft_model(tiny("bart"), peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=2))
    with pytest.raises(ValueError, match="PROMPT_TUNING.*encoder-decoder"):
        pk.patch(ref)
    ref = peft_prefix_model("bart")
    ours = pk.patch(copy.deepcopy(ref))
    pk.unpatch(ours)
    ids, mask, dec = enc_batch()
    assert ours.base_model.config._attn_implementation == ref.base_model.config._attn_implementation
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits,
                                   ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits)


def test_patched_seq2seq_lora_matches_peft():
    ref = peft.get_peft_model(tiny("bart"), peft.LoraConfig(task_type="SEQ_2_SEQ_LM", r=4, target_modules="all-linear",
                                                            init_lora_weights=False))
    ours = pk.patch(copy.deepcopy(ref))
    ids, mask, dec = enc_batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits,
                                   ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits,
                                   atol=1e-5, rtol=1e-5)
    assert pk.last_backend("multi_lora") is not None


# ------------------------------------------------------------------ the paper's semantics: a plain reference

def _stack_of(name: str):
    """(stack, layer) of an attention module from its name alone (independent of the library)."""
    layer = int(re.findall(r"\.(\d+)\.", name)[0])
    if "encoder_attn" in name or "EncDecAttention" in name:
        return attn.CROSS, layer
    return (attn.ENCODER if name.startswith(("model.encoder.", "encoder.")) else attn.DECODER), layer


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, position_bias=None,
                         **kwargs):
    """Eager attention over [module's extra prefix ; keys]; the extra slots get no position bias."""
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = (query @ key.transpose(-1, -2)) * scale
    if position_bias is not None:
        scores = scores + position_bias
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask.bool(), float("-inf"))
    elif getattr(module, "is_causal", False) and query.shape[2] > 1:  # transformers skips the causal mask
        Lq, Lk = query.shape[2], key.shape[2]
        future = torch.ones(Lq, Lk, dtype=torch.bool).triu(Lk - Lq + 1)
        scores = scores.masked_fill(future, float("-inf"))
    extra = module.__dict__.get("_h6_extra")
    if extra is not None:
        pk_, pv = extra
        scores = torch.cat([(query @ pk_.transpose(-1, -2)) * scale, scores], dim=-1)
        value = torch.cat([pv, value], dim=2)
    out = scores.softmax(-1) @ value
    return out.transpose(1, 2).contiguous(), None


def _register_reference():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(REF, _reference_attention)
    AttentionMaskInterface.register(REF, sdpa_mask)


def _paper_banks(flat, enc_layers, dec_layers, heads, head_dim):
    """{(stack, layer): (k, v) [1, H, P, D]}: table virtual layers = encoder, decoder self, cross (in that order)."""
    P = flat.shape[0]
    kv = flat.view(P, enc_layers + 2 * dec_layers, 2, heads, head_dim).permute(1, 2, 3, 0, 4)
    stacks = [(attn.ENCODER, i) for i in range(enc_layers)] + [(attn.DECODER, i) for i in range(dec_layers)] + \
        [(attn.CROSS, i) for i in range(dec_layers)]
    return {key: (kv[j, 0][None], kv[j, 1][None]) for j, key in enumerate(stacks)}


def reference_logits(model, banks, ids, dec):
    """One row's logits with the paper's prefixes: the decoder's self-attention prefix prefilled in its
    cache (PEFT's way: decoder positions start at P, T5's bias counts the slots), the encoder's and the
    cross-attention's concatenated in front of their keys (no position bias)."""
    from transformers import DynamicCache, EncoderDecoderCache, PreTrainedModel

    _register_reference()
    models = [m for m in model.modules() if isinstance(m, PreTrainedModel)]  # T5's stacks have their own configs
    previous = [m.config._attn_implementation for m in models]
    for m in models:
        m.set_attn_implementation(REF)
    named = {n: m for n, m in model.named_modules() if isinstance(getattr(m, "layer_idx", None), int)}
    try:
        self_cache = DynamicCache()
        for name, module in named.items():
            key = _stack_of(name)
            if key[0] == attn.DECODER and banks is not None:
                k, v = banks[key]
                self_cache.update(k.clone(), v.clone(), key[1])
            elif banks is not None:
                module.__dict__["_h6_extra"] = banks[key]
        cache = EncoderDecoderCache(self_cache, DynamicCache()) if banks is not None else None
        return model(input_ids=ids, decoder_input_ids=dec, use_cache=True, **{cache_kw(): cache}).logits
    finally:
        for module in named.values():
            module.__dict__.pop("_h6_extra", None)
        for m, implementation in zip(models, previous):
            m.set_attn_implementation(implementation)


def _mixed(arch):
    model = tiny(arch)
    runner = pk.MultiAdapterModel(copy.deepcopy(model))
    runner.add_adapter("a", pk.api.PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True,
                                                      encoder_hidden_size=16))
    runner.add_adapter("b", pk.api.PTuningV2Config(num_virtual_tokens=2))
    with torch.no_grad():
        for p in runner.kinds["prefix"].parameters():
            p.normal_(0, 0.5)
    return model, runner


def _banks_of(runner, name, model):
    c = model.config
    heads = getattr(c, "encoder_attention_heads", None) or c.num_heads
    head_dim = getattr(c, "d_kv", None) or c.d_model // heads
    enc = getattr(c, "encoder_layers", None) or c.num_layers
    dec = getattr(c, "decoder_layers", None) or c.num_decoder_layers
    return _paper_banks(runner.kinds["prefix"].tables[name](), enc, dec, heads, head_dim)


@pytest.mark.parametrize("arch", ARCHS)
def test_multi_adapter_seq2seq_prefix_rows_equal_plain_reference_and_grads_reach_each_adapter(arch):
    model, runner = _mixed(arch)
    runner.train()
    ids, mask, dec = enc_batch()
    names = ["a", None, "b"]
    out = runner(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, adapter_names=names)
    loss = sum(out.logits[b].logsumexp(-1).sum() for b in range(3))
    loss.backward()
    got_grads = {n: p.grad.clone() for n, p in runner.kinds["prefix"].named_parameters()}
    runner.zero_grad()
    want_loss = 0
    for b, name in enumerate(names):
        real = int(mask[b].sum())
        banks = None if name is None else _banks_of(runner, name, model)
        want = reference_logits(model, banks, ids[b:b + 1, :real], dec[b:b + 1])
        torch.testing.assert_close(out.logits[b:b + 1], want, atol=2e-5, rtol=2e-5)
        want_loss = want_loss + want[0].logsumexp(-1).sum()
    assert not torch.allclose(out.logits[0], out.logits[1], atol=1e-3)
    want_loss.backward()
    for n, p in runner.kinds["prefix"].named_parameters():
        assert got_grads[n].abs().sum() > 0, n
        torch.testing.assert_close(got_grads[n], p.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_multi_adapter_seq2seq_prefix_reaches_encoder_and_cross_attention(arch):
    """The paper's semantics, where PEFT has none: the encoder output depends on the row's prefix."""
    model, runner = _mixed(arch)
    ids, mask, dec = enc_batch()
    with torch.no_grad():
        out = runner(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, adapter_names=["a", None, "b"])
        plain = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
    torch.testing.assert_close(out.encoder_last_hidden_state[1], plain.encoder_last_hidden_state[1])
    for b in (0, 2):
        real = int(mask[b].sum())
        assert not torch.allclose(out.encoder_last_hidden_state[b, :real], plain.encoder_last_hidden_state[b, :real],
                                  atol=1e-3)


@pytest.mark.parametrize("arch", ARCHS)
def test_multi_adapter_seq2seq_generate_equals_greedy_decoding_by_forward(arch):
    _, runner = _mixed(arch)
    ids, mask, _ = enc_batch()
    names = ["b", "a", None]
    start = runner.model.config.decoder_start_token_id
    with torch.no_grad():
        want = greedy(lambda i, m, d: runner(input_ids=i, attention_mask=m, decoder_input_ids=d,
                                             adapter_names=names).logits, ids, mask, start, 5)
        got = runner.generate(ids, mask, adapter_names=names, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("arch", ARCHS)
def test_multi_adapter_loads_peft_seq2seq_prefix_dir_as_peft_runs_it_and_saves_it_back(arch, tmp_path):
    ref = peft_prefix_model(arch)
    ref.eval()
    ref.save_pretrained(tmp_path / "peft")
    runner = pk.MultiAdapterModel(tiny(arch))
    runner.load_adapter(tmp_path / "peft", "p")
    runner.add_adapter("ours", pk.api.PTuningV2Config(num_virtual_tokens=2))
    ids, mask, dec = enc_batch()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        got = runner(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, adapter_names=["p", "p", "ours"]).logits
    # the padded row 0 and row 1 under PEFT's prefix; PEFT runs padded rows the same way (right padding)
    torch.testing.assert_close(got[:2], want[:2], atol=1e-5, rtol=1e-5)
    runner.save_adapter("p", tmp_path / "back")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = peft.PeftModel.from_pretrained(tiny(arch), tmp_path / "back").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits, want)
    runner.save_adapter("ours", tmp_path / "ours")
    with pytest.raises(RuntimeError, match="size mismatch"):  # PEFT has no three-prefix layout: it refuses
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft.PeftModel.from_pretrained(tiny(arch), tmp_path / "ours")
    other = pk.MultiAdapterModel(tiny(arch))
    other.load_adapter(tmp_path / "ours", "ours")
    with torch.no_grad():
        torch.testing.assert_close(other(input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
                                         adapter_names="ours").logits[2], got[2])


def test_multi_adapter_seq2seq_lora_matches_peft_and_other_kinds_and_packing_are_refused(tmp_path):
    ref = peft.get_peft_model(tiny("bart"), peft.LoraConfig(task_type="SEQ_2_SEQ_LM", r=4,
                                                            target_modules=["q_proj", "v_proj"],
                                                            init_lora_weights=False)).eval()
    ref.save_pretrained(tmp_path / "lora")
    runner = pk.MultiAdapterModel(tiny("bart"))
    runner.load_adapter(tmp_path / "lora", "lora")
    ids, mask, dec = enc_batch()
    with torch.no_grad():
        torch.testing.assert_close(runner(input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
                                          adapter_names="lora").logits,
                                   ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits,
                                   atol=1e-5, rtol=1e-5)
    assert "encoder-decoder" in runner.pack_refusal()
    with pytest.raises(ValueError, match="packed"):
        runner(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, adapter_names="lora", packed=True)
    with pytest.raises(ValueError, match="PROMPT_TUNING adapters are not supported on encoder-decoder"):
        runner.add_adapter("prompt", pk.api.PromptTuningConfig(num_virtual_tokens=2))
    assert list(runner.adapters) == ["lora"]
