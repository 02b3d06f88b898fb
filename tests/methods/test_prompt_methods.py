"""Prompt tuning and P-tuning v1 modules, per-task prompt banks, PEFT directory loading."""
import pytest
import torch

from models import batch, greedy_by_forward, tiny_llama
from peft_kernels.integrations.peft_io import AdapterFormatError, read_prompt_adapter, write_adapter_dir
from peft_kernels.methods.prompt_model import PromptTunedModel
from peft_kernels.methods.soft_prompt import PromptEncoder, SoftPrompt, stack_prompts

peft = pytest.importorskip("peft")


def test_soft_prompt_inits():
    table = torch.randn(50, 8)
    assert SoftPrompt(4, 8).weight.shape == (4, 8)
    sampled = SoftPrompt(6, 8, "sample_vocab", word_embeddings=table).weight
    assert all((row == table).all(1).any() for row in sampled)
    text = SoftPrompt(5, 8, "text", word_embeddings=table, init_token_ids=[3, 7]).weight
    torch.testing.assert_close(text, table[[3, 7, 3, 7, 3]])
    with pytest.raises(ValueError, match="init='text' needs init_token_ids"):
        SoftPrompt(5, 8, "text", word_embeddings=table)
    with pytest.raises(ValueError, match="word_embeddings"):
        SoftPrompt(5, 8, "sample_vocab")
    with pytest.raises(ValueError, match="choose one of"):
        SoftPrompt(5, 8, "zeros")


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
def test_prompt_encoder_loads_peft_state_dict_and_folds(kind):
    from peft.tuners.p_tuning.model import PromptEncoder as PeftPromptEncoder

    config = peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, token_dim=12, encoder_hidden_size=10,
                                      encoder_reparameterization_type=kind, num_transformer_submodules=1,
                                      num_attention_heads=2, num_layers=1)
    theirs = PeftPromptEncoder(config)
    ours = PromptEncoder(5, 12, 10, kind=kind.lower())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    torch.testing.assert_close(ours(), theirs(torch.arange(5)[None])[0])
    torch.testing.assert_close(ours.fold()(), ours().detach())


def test_stack_prompts_pads_and_reports_lengths():
    bank, lens = stack_prompts([torch.ones(2, 3), torch.ones(4, 3)])
    assert bank.shape == (2, 4, 3) and lens.tolist() == [2, 4]
    assert bank[0, 2:].abs().sum() == 0
    with pytest.raises(ValueError, match="prompt 1 must be"):
        stack_prompts([torch.ones(2, 3), torch.ones(4, 2)])


def _peft_prompt_dir(tmp_path, config, seed=0):
    torch.manual_seed(seed)
    model = peft.get_peft_model(tiny_llama(), config)
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("config", [
    peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=8),
], ids=["prompt-tuning", "p-tuning"])
def test_loaded_peft_directory_gives_peft_logits(tmp_path, config):
    saved = _peft_prompt_dir(tmp_path, config).eval()
    cfg, prompts = read_prompt_adapter(tmp_path)
    assert cfg["peft_type"] in ("PROMPT_TUNING", "P_TUNING")
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    prompt = SoftPrompt(prompts.shape[0], prompts.shape[1])
    prompt.weight.data = prompts.clone()
    ours = PromptTunedModel(tiny_llama(), prompt).eval()
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, mask).logits, loaded(input_ids=ids, attention_mask=mask).logits,
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(saved(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_bad_adapter_directories_raise_clear_errors(tmp_path):
    with pytest.raises(AdapterFormatError, match="does not exist"):
        read_prompt_adapter(tmp_path / "nope")
    _peft_prompt_dir(tmp_path, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterFormatError, match="not a readable safetensors"):
        read_prompt_adapter(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterFormatError, match="has no adapter_model.safetensors"):
        read_prompt_adapter(tmp_path)
    write_adapter_dir(tmp_path, {"peft_type": "LORA"}, {"w": torch.zeros(1)})
    with pytest.raises(AdapterFormatError, match="not a soft prompt"):
        read_prompt_adapter(tmp_path)
    write_adapter_dir(tmp_path, {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3, "token_dim": 32},
                      {"prompt_embeddings": torch.zeros(2, 32)})
    with pytest.raises(AdapterFormatError, match=r"\[2, 32\] but the config says \[3, 32\]"):
        read_prompt_adapter(tmp_path)


def _model_with_prompts():
    torch.manual_seed(3)
    prompts = {"short": SoftPrompt(2, 32), "long": SoftPrompt(5, 32), "mlp": PromptEncoder(3, 32, 16)}
    return PromptTunedModel(tiny_llama(), prompts)


def test_mixed_prompt_batch_rows_equal_each_row_alone():
    model = _model_with_prompts().eval()
    ids, mask = batch(B=4, left_pad=2)
    names = ["long", "short", None, "mlp"]
    with torch.no_grad():
        mixed = model(ids, mask, prompt=names).logits
        P = 5
        for b, name in enumerate(names):
            real = mask[b].bool()
            if name is None:
                alone = model.model(input_ids=ids[b : b + 1, real]).logits[0]
            else:
                n = model.prompts[name]().shape[0]
                alone = model(ids[b : b + 1, real], prompt=name).logits[0, n:]
            torch.testing.assert_close(mixed[b, P:][real], alone, atol=1e-5, rtol=1e-5)


def test_mixed_prompt_batch_trains_each_prompt_on_its_own_rows():
    model = _model_with_prompts().train()
    ids, mask = batch(B=4)
    names = ["long", "short", "long", "mlp"]

    def loss_of(rows):
        out = model(ids[rows], mask[rows], labels=ids[rows], prompt=[names[r] for r in rows])
        return out.loss * (mask[rows].sum() - len(rows))  # undo the mean: sum over predicted tokens

    model.zero_grad()
    loss_of([0, 1, 2, 3]).backward()
    mixed = {n: p.grad.clone() for n, p in model.prompts.named_parameters()}
    for name in ("long", "short", "mlp"):
        model.zero_grad()
        loss_of([r for r, n in enumerate(names) if n == name]).backward()
        for pname, p in model.prompts.named_parameters():
            if pname.startswith(name + "."):
                torch.testing.assert_close(mixed[pname], p.grad, atol=1e-5, rtol=1e-4)


def test_prompt_tuned_generate_matches_greedy_forward_and_caches_prompt_once():
    model = _model_with_prompts().eval()
    ids, _ = batch(B=2, L=4)
    with torch.no_grad():
        want = greedy_by_forward(lambda x: model(x, prompt=["long", "mlp"]).logits, ids, steps=5)
        got = model.generate(ids, prompt=["long", "mlp"], max_new_tokens=5, do_sample=False)
    assert torch.equal(got, want)


def test_prompt_training_reduces_loss():
    model = _model_with_prompts().train()
    for p in model.model.parameters():
        p.requires_grad_(False)
    ids, mask = batch(B=4, L=6)
    opt = torch.optim.Adam(model.prompts.parameters(), lr=0.3)
    losses = []
    target = torch.full_like(ids, 7)  # learnable through the prompt alone: always answer token 7
    for _ in range(25):
        loss = model(ids, mask, labels=target, prompt=["long", "short", "mlp", "long"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_unknown_prompt_names_are_reported():
    model = _model_with_prompts()
    ids, _ = batch(B=2)
    with pytest.raises(ValueError, match=r"unknown prompt\(s\) \['nope'\]"):
        model(ids, prompt=["nope", "long"])
    with pytest.raises(ValueError, match="3 prompts are loaded"):
        model(ids)
