"""Every kind of bad input raises ValueError/TypeError naming the argument and the shapes."""
import pytest
import torch

import peft_kernels as pk

f32, f16 = torch.float32, torch.float16


def attn(**over):
    a = dict(q=torch.randn(2, 4, 3, 8), k=torch.randn(2, 2, 5, 8), v=torch.randn(2, 2, 5, 8),
             prefix_k=torch.randn(3, 2, 4, 8), prefix_v=torch.randn(3, 2, 4, 8),
             prefix_index=torch.tensor([0, 2]))
    a.update(over)
    return lambda: pk.prefix_attention(a.pop("q"), a.pop("k"), a.pop("v"), a.pop("prefix_k"), a.pop("prefix_v"), **a)


def lora(**over):
    a = dict(x=torch.randn(5, 6), lora_a=torch.randn(3, 4, 6), lora_b=torch.randn(3, 7, 4),
             adapter_index=torch.tensor([0, 1, 2, -1, 0]), scaling=torch.ones(3))
    a.update(over)
    return lambda: pk.multi_lora(a.pop("x"), a.pop("lora_a"), a.pop("lora_b"), a.pop("adapter_index"),
                                 a.pop("scaling"), **a)


def embed(**over):
    a = dict(input_ids=torch.tensor([[1, 2, 3], [4, 5, 6]]), weight=torch.randn(10, 5),
             prompts=torch.randn(2, 3, 5))
    a.update(over)
    return lambda: pk.soft_prompt_embed(a.pop("input_ids"), a.pop("weight"), a.pop("prompts"), **a)


def concat(**over):
    a = dict(embeds=torch.randn(2, 4, 5), prompts=torch.randn(1, 3, 5))
    a.update(over)
    return lambda: pk.soft_prompt_concat(a.pop("embeds"), a.pop("prompts"), **a)


BAD = [
    # prefix_attention
    ("attn-q-rank", attn(q=torch.randn(2, 4, 8)), ValueError, ["q", "[2, 4, 8]"]),
    ("attn-head-ratio", attn(q=torch.randn(2, 3, 3, 8)), ValueError, ["Hq=3", "Hkv=2"]),
    ("attn-k-v-shape", attn(v=torch.randn(2, 2, 6, 8)), ValueError, ["k and v", "[2, 2, 6, 8]"]),
    ("attn-prefix-heads", attn(prefix_k=torch.randn(3, 1, 4, 8), prefix_v=torch.randn(3, 1, 4, 8)), ValueError, ["prefix_k", "[3, 1, 4, 8]"]),
    ("attn-dtype-mix", attn(k=torch.randn(2, 2, 5, 8, dtype=f16)), TypeError, ["k", "float16", "float32"]),
    ("attn-int-q", attn(q=torch.zeros(2, 4, 3, 8, dtype=torch.long)), TypeError, ["q", "int64"]),
    ("attn-device-mix", attn(prefix_index=torch.tensor([0, 2], device="meta")), ValueError, ["prefix_index", "meta", "cpu"]),
    ("attn-index-range", attn(prefix_index=torch.tensor([0, 3])), ValueError, ["prefix_index", "[0, 3]", "[-1, 3)"]),
    ("attn-index-below", attn(prefix_index=torch.tensor([-2, 0])), ValueError, ["prefix_index", "-2"]),
    ("attn-index-dtype", attn(prefix_index=torch.tensor([0.0, 1.0])), TypeError, ["prefix_index", "float32"]),
    ("attn-index-len", attn(prefix_index=torch.tensor([0, 1, 2])), ValueError, ["prefix_index", "[3]"]),
    ("attn-index-none", attn(prefix_index=None), ValueError, ["prefix_index=None", "3 entries", "2 rows"]),
    ("attn-lens-range", attn(prefix_lens=torch.tensor([1, 5, 2])), ValueError, ["prefix_lens", "P = 4"]),
    ("attn-lens-shape", attn(prefix_lens=torch.tensor([1, 2])), ValueError, ["prefix_lens", "[2]"]),
    ("attn-mask-shape", attn(key_padding_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, ["key_padding_mask", "[2, 4]", "Lk=5"]),
    ("attn-mask-dtype", attn(key_padding_mask=torch.ones(2, 5)), TypeError, ["key_padding_mask", "float32"]),
    # multi_lora
    ("lora-x-rank", lora(x=torch.randn(6)), ValueError, ["x", "[6]"]),
    ("lora-hin", lora(x=torch.randn(5, 7)), ValueError, ["H_in", "[5, 7]", "[3, 4, 6]"]),
    ("lora-b-shape", lora(lora_b=torch.randn(3, 7, 5)), ValueError, ["lora_b", "[3, 7, 5]", "R=4"]),
    ("lora-dtype-mix", lora(lora_a=torch.randn(3, 4, 6, dtype=f16)), TypeError, ["lora_a", "float16"]),
    ("lora-index-range", lora(adapter_index=torch.tensor([0, 1, 3, -1, 0])), ValueError, ["adapter_index", "[-1, 3)"]),
    ("lora-index-rows", lora(adapter_index=torch.tensor([0, 1])), ValueError, ["adapter_index", "5"]),
    ("lora-ranks-range", lora(ranks=torch.tensor([4, 5, 1])), ValueError, ["ranks", "R = 4"]),
    ("lora-scaling-shape", lora(scaling=torch.ones(2)), ValueError, ["scaling", "[3, 4, 6]"]),
    ("lora-base-shape", lora(base=torch.randn(5, 6)), ValueError, ["base", "[5, 6]", "[5, 7]"]),
    ("lora-device-mix", lora(scaling=torch.ones(3, device="meta")), ValueError, ["scaling", "meta"]),
    # soft prompts
    ("embed-ids-rank", embed(input_ids=torch.tensor([1, 2])), ValueError, ["input_ids", "[2]"]),
    ("embed-ids-dtype", embed(input_ids=torch.ones(2, 3)), TypeError, ["input_ids", "float32"]),
    ("embed-vocab", embed(input_ids=torch.tensor([[1, 2, 10], [0, 0, 0]])), ValueError, ["input_ids", "[0, 10]", "10 rows"]),
    ("embed-negative-id", embed(input_ids=torch.tensor([[1, -1, 0], [0, 0, 0]])), ValueError, ["input_ids", "-1"]),
    ("embed-hidden", embed(prompts=torch.randn(2, 3, 4)), ValueError, ["prompts", "[2, 3, 4]", "[10, 5]"]),
    ("embed-dtype-mix", embed(prompts=torch.randn(2, 3, 5, dtype=f16)), TypeError, ["prompts", "float16"]),
    ("embed-insert-at", embed(insert_at=4), ValueError, ["insert_at=4", "L = 3"]),
    ("embed-lens", embed(prompt_lens=torch.tensor([3, 4])), ValueError, ["prompt_lens", "P = 3"]),
    ("embed-index-range", embed(prompt_index=torch.tensor([0, 2])), ValueError, ["prompt_index", "[-1, 2)"]),
    ("concat-replace-room", concat(replace=True, insert_at=2), ValueError, ["insert_at=2", "replace=True", "L = 4"]),
    ("concat-embeds-rank", concat(embeds=torch.randn(4, 5)), ValueError, ["embeds", "[4, 5]"]),
    ("mask-dtype", lambda: pk.soft_prompt_mask(torch.ones(2, 3), 2), TypeError, ["attention_mask", "float32"]),
    ("mask-index", lambda: pk.soft_prompt_mask(torch.ones(2, 3, dtype=torch.long), 2, num_prompts=2,
                                                prompt_index=torch.tensor([0, 5])), ValueError, ["prompt_index", "[0, 5]"]),
]


@pytest.mark.parametrize("call,exc,fragments", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_raises_with_clear_message(call, exc, fragments):
    with pytest.raises(exc) as info:
        call()
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} missing from: {info.value}"


def test_validate_false_trusts_the_caller(monkeypatch):
    from peft_kernels.ops import _checks

    def refuse(*args, **kwargs):
        raise AssertionError("a check ran with validate=False")

    for name in ("tensor", "bank_index", "lengths", "same_device", "same_dtype", "dim_equal"):
        monkeypatch.setattr(_checks, name, refuse)
    assert attn(validate=False)().shape == (2, 4, 3, 8)
    assert lora(validate=False)().shape == (5, 7)
    assert embed(validate=False)().shape == (2, 6, 5)
    assert concat(validate=False)().shape == (2, 7, 5)
    with pytest.raises(AssertionError, match="validate=False"):
        attn()()
