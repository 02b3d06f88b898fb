"""Adapters on a tensor-parallel base (transformers tp_plan="auto", 2 gloo ranks) against the
unsharded model: mixed-batch logits, S-LoRA bank shards and their gradients, the rank-space
all-reduce (R numbers per token), prefix KV-head shards, and patch() of PEFT models."""
import pytest

from torchrun import tiny_base, torchrun  # noqa: F401  (tiny_base: a fixture)

TOL = 1e-5


@pytest.fixture(scope="module")
def ranks(tiny_base, tmp_path_factory):
    return torchrun("tp_worker.py", tiny_base, tmp_path_factory.mktemp("tp"))


def test_mixed_lora_prompt_ptuning_batch_matches_the_unsharded_model(ranks):
    for r in ranks:
        diffs = r["mixed_without_prefix"]
        assert "error" not in diffs, diffs
        assert set(diffs) == {"all", "lora_a", "lora_b", "prompt", "ptune"}
        assert max(diffs.values()) < TOL, diffs


def test_mixed_batch_with_prefix_rows_matches_the_unsharded_model(ranks):
    for r in ranks:
        diffs = r["mixed"]
        assert "error" not in diffs, (
            f"{diffs}: MultiAdapterModel's prefix kind must pass kv_heads=local_kv_heads(model) to select_prefixes")
        assert set(diffs) == {"all", "lora_a", "lora_b", "prefix", "prompt", "ptune"}
        assert max(diffs.values()) < TOL, diffs


def test_lora_banks_are_sharded_the_s_lora_way(ranks):
    for r in ranks:
        assert r["styles"] == ["colwise", "rowwise"]
        (qa, qb), (oa, ob) = r["bank_shapes"].values()
        assert qa == [2, 4, 64] and qb == [2, 32, 4]  # q_proj (column-parallel): A replicated, B by output rows
        assert oa == [2, 4, 32] and ob == [2, 64, 4]  # o_proj (row-parallel): A by input columns, B replicated
        assert r["gathered_state_diff"] == 0.0  # saving gathers the shards back to PEFT's full tensors


def test_row_parallel_lora_all_reduces_rank_space_sums_only(ranks):
    for r in ranks:
        assert r["lora_extra_bytes"] == r["expected_lora_bytes"] > 0
        assert r["lora_extra_bytes"] < r["hidden_allreduce_bytes_per_layer"]


def test_tensor_parallel_lora_gradients_are_the_unsharded_ones(ranks):
    for r in ranks:
        assert r["lora_grad_norm"] > 0.1
        assert r["lora_grad_diff"] < TOL, r["lora_grad_diff"]


def test_prefix_banks_keep_this_ranks_kv_heads(ranks):
    for r in ranks:
        assert r["prefix_model_logit_diff"] < TOL


def test_patch_of_peft_models_on_a_tp_plan_base(ranks):
    for r in ranks:
        assert set(r["patch_logit_diff"]) == {"lora_a", "prefix", "prompt"}
        assert max(r["patch_logit_diff"].values()) < TOL, r["patch_logit_diff"]
        assert r["patch_sharded_layers"] == 14  # 7 linear layers x 2 blocks run the sharded LoRA path
