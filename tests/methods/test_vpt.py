"""Visual prompt tuning (shallow / deep, per-task banks) on a tiny random ViT vs plain torch."""
import copy

import pytest
import torch

pytest.importorskip("transformers")

from peft_kernels.methods.vpt import VisualPromptTuning  # noqa: E402

P, LAYERS, LABELS, HIDDEN, PATCH = 3, 3, 5, 32, 8


def tiny_vit(seed=0, head=True, layers=LAYERS):
    from transformers import ViTConfig, ViTForImageClassification, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(image_size=32, patch_size=PATCH, num_channels=3, hidden_size=HIDDEN, num_hidden_layers=layers,
                       num_attention_heads=4, intermediate_size=2 * HIDDEN, num_labels=LABELS,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = ViTForImageClassification(config) if head else ViTModel(config)
    return model.eval()


def images(B=4, seed=1):
    return torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _layers(vit):
    encoder = getattr(vit, "encoder", None)
    return encoder.layer if encoder is not None and hasattr(encoder, "layer") else vit.layers


def naive_vpt_logits(model, pixel_values, prompts, task_index, deep):
    """The VPT equations in plain torch on an unhooked copy: cat after CLS, replace per layer, CLS head."""
    vit = model.vit
    h = vit.embeddings(pixel_values)
    for i, layer in enumerate(_layers(vit)):
        if i == 0:
            h = torch.cat([h[:, :1], prompts[0][task_index], h[:, 1:]], dim=1)
        elif deep:
            h = torch.cat([h[:, :1], prompts[i][task_index], h[:, 1 + P:]], dim=1)
        out = layer(h)
        h = out[0] if isinstance(out, tuple) else out
    return model.classifier(vit.layernorm(h)[:, 0])


def _wrap(model, deep, num_tasks=1, seed=0, **kw):
    return VisualPromptTuning(model, P, deep, num_tasks=num_tasks, generator=torch.Generator().manual_seed(seed),
                              verbose=False, **kw)


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_logits_equal_plain_torch_vpt(deep):
    model = tiny_vit()
    plain = copy.deepcopy(model)
    vpt = _wrap(model, deep, num_tasks=3)
    assert len(vpt.prompts) == (LAYERS if deep else 1)
    assert all(p.shape == (3, P, HIDDEN) for p in vpt.prompts)
    x, task = images(), torch.tensor([0, 2, 1, 0])
    with torch.no_grad():
        got = vpt(x, task_index=task).logits
        want = naive_vpt_logits(plain, x, list(vpt.prompts), task, deep)
        base = plain(x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, base, atol=1e-3)  # the prompts do change the output
    # int32 indices and hidden states passed by keyword reach the same answer
    with torch.no_grad():
        torch.testing.assert_close(vpt(x, task_index=task.int()).logits, got, atol=0, rtol=0)


def test_deep_hook_takes_hidden_states_by_keyword():
    model = tiny_vit(layers=2)
    plain = copy.deepcopy(model)
    vpt = _wrap(model, deep=True)
    h = torch.randn(2, 1 + P + 16, HIDDEN)
    with torch.no_grad():
        layer = _layers(model.vit)[1]
        by_kw, by_pos = layer(hidden_states=h), layer(h)
        want = _layers(plain.vit)[1](torch.cat([h[:, :1], vpt.prompts[1][[0, 0]], h[:, 1 + P:]], 1))
    torch.testing.assert_close(by_kw, by_pos, atol=0, rtol=0)
    torch.testing.assert_close(by_pos, want, atol=0, rtol=0)


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_mixed_task_batch_equals_each_row_alone(deep):
    vpt = _wrap(tiny_vit(), deep, num_tasks=3)
    x, task = images(), torch.tensor([0, 2, 1, 0])
    with torch.no_grad():
        mixed = vpt(x, task_index=task).logits
        for b in range(4):
            alone = vpt(x[b:b + 1], task_index=task[b:b + 1]).logits
            torch.testing.assert_close(mixed[b:b + 1], alone, atol=1e-5, rtol=1e-5)
        # rows with different tasks really see different prompts
        other = vpt(x, task_index=torch.tensor([1, 0, 2, 1])).logits
    assert not torch.allclose(mixed, other, atol=1e-4)


def test_vit_model_without_head_and_init():
    model = tiny_vit(head=False)
    vpt = _wrap(model, deep=False, num_tasks=2)
    x = images(B=2)
    out = vpt(x, task_index=torch.tensor([1, 0]))
    assert out.last_hidden_state.shape == (2, 1 + P + 16, HIDDEN)
    # the pooler reads CLS, which is what the sequence output holds at position 0
    torch.testing.assert_close(out.pooler_output, model.pooler(out.last_hidden_state), atol=0, rtol=0)
    trainable, total = vpt.trainable_parameters()
    assert trainable == 2 * P * HIDDEN and total == trainable + sum(p.numel() for p in model.parameters())
    bound = (6 / (3 * PATCH ** 2 + HIDDEN)) ** 0.5
    assert vpt.init_bound == pytest.approx(bound)
    w = vpt.prompts[0].detach()
    assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound and abs(float(w.mean())) < 0.1 * bound


def test_training_moves_only_prompts_and_head(capsys):
    torch.manual_seed(0)
    model = tiny_vit()
    frozen = {n: p.detach().clone() for n, p in model.vit.named_parameters()}
    vpt = VisualPromptTuning(model, P, deep=True, num_tasks=3, dropout=0.1)
    printed = capsys.readouterr().out
    trainable, total = vpt.trainable_parameters()
    head = sum(p.numel() for p in model.classifier.parameters())
    assert trainable == LAYERS * 3 * P * HIDDEN + head
    assert f"trainable params: {trainable:,d}" in printed and f"all params: {total:,d}" in printed
    assert "trainable%" in printed
    assert sorted(n for n, p in vpt.named_parameters() if p.requires_grad) == sorted(
        [f"prompts.{i}" for i in range(LAYERS)] + ["model.classifier.weight", "model.classifier.bias"])

    x = images(B=16, seed=3)
    y = torch.randint(0, LABELS, (16,), generator=torch.Generator().manual_seed(4))
    task = torch.tensor([0, 2] * 8)  # task 1 is never used
    opt = torch.optim.Adam([p for p in vpt.parameters() if p.requires_grad], lr=3e-2)
    vpt.train()
    losses = []
    for step in range(20):
        opt.zero_grad()
        loss = vpt(x, task_index=task, labels=y).loss
        loss.backward()
        if step == 0:
            for i, p in enumerate(vpt.prompts):
                assert p.grad is not None and p.grad[[0, 2]].abs().sum() > 0, i
                assert p.grad[1].abs().sum() == 0, i  # only the tasks in the batch get gradients
            assert model.classifier.weight.grad is not None
            assert all(p.grad is None for p in model.vit.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses  # 1.60 -> 1.05 here
    for n, p in model.vit.named_parameters():
        assert torch.equal(p, frozen[n]), n
    # dropout acts in training only
    with torch.no_grad():
        assert not torch.equal(vpt(x[:2], task_index=task[:2]).logits, vpt(x[:2], task_index=task[:2]).logits)
        vpt.eval()
        assert torch.equal(vpt(x[:2], task_index=task[:2]).logits, vpt(x[:2], task_index=task[:2]).logits)


def test_attention_mask_kwarg_is_widened_over_the_prompts():
    vpt = _wrap(tiny_vit(), deep=True, num_tasks=2)
    x, task = images(B=2), torch.tensor([1, 0])
    try:
        with torch.no_grad():
            masked = vpt(x, task_index=task, attention_mask=torch.ones(2, 17, dtype=torch.long)).logits
    except TypeError as e:  # a transformers whose ViT takes no attention_mask
        pytest.skip(f"this ViT takes no attention_mask: {e}")
    with torch.no_grad():
        torch.testing.assert_close(masked, vpt(x, task_index=task).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_remove_restores_the_plain_model_bitwise(deep):
    model = tiny_vit()
    x = images()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    with torch.no_grad():
        before = model(x).logits
        vpt = _wrap(model, deep)
        hooked = model(x).logits  # num_tasks == 1: a direct call uses task 0
        torch.testing.assert_close(hooked, vpt(x).logits, atol=0, rtol=0)
        assert not torch.allclose(hooked, before, atol=1e-4)
        plain = vpt.unwrap()
        after = plain(x).logits
    assert plain is model
    assert torch.equal(after, before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks
    vpt.remove()  # idempotent
    with pytest.raises(RuntimeError, match="remove"):
        vpt(x)


def test_bad_task_index_raises():
    vpt = _wrap(tiny_vit(layers=1), deep=False, num_tasks=3)
    x = images(B=4)
    cases = [
        (torch.tensor([0, -1, 1, 2]), ValueError, r"task_index holds -1.*attention"),
        (torch.tensor([0, 3, 1, 2]), ValueError, r"task_index holds values in \[0, 3\].*3 tasks"),
        (torch.tensor([0, -2, 1, 2]), ValueError, r"task_index holds values in \[-2, 2\]"),
        (torch.tensor([[0, 1], [1, 2]]), ValueError, r"task_index must have shape \[B=4\]"),
        (torch.tensor([0, 1, 2]), ValueError, r"task_index must have shape \[B=4\].*\[3\]"),
        (None, ValueError, r"task_index is required"),
        (torch.tensor([0.0, 1.0, 2.0, 0.0]), TypeError, r"task_index must be int32 or int64"),
    ]
    for index, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            vpt(x, task_index=index)
    with pytest.raises(RuntimeError, match="task_index"):  # direct call with several tasks
        vpt.model(x)
    vpt(x, task_index=[0, 1, 2, 0])  # a plain list of ints is fine
    with pytest.raises(ValueError, match="num_prompts"):
        VisualPromptTuning(tiny_vit(layers=1), 0, verbose=False)
