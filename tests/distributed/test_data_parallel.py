"""DDP and FSDP2 of a MultiAdapterModel on 2 gloo ranks: one step equals the union-batch step in one
process, each adapter's gradient comes from its own rows only, only adapter bytes travel, and
rank 0 writes PEFT directories."""
import pytest

from torchrun import tiny_base, torchrun  # noqa: F401  (tiny_base: a fixture)

TOL = 1e-5


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def step(request, tiny_base, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    return request.param, torchrun("dp_worker.py", request.param, tiny_base, out)


def test_one_step_on_two_ranks_equals_the_union_batch_step(step):
    _, ranks = step
    for r in ranks:
        assert r["grad_keys_match"]
        assert r["grad_norm"] > 0.1
        assert r["grad_diff"] < TOL, r["grad_diff"]
        assert r["param_diff"] < TOL, r["param_diff"]


def test_each_adapter_gets_only_its_own_rows_gradient(step):
    _, ranks = step
    for r in ranks:
        for name, diff in r["isolation_diff"].items():
            assert diff < TOL, (name, diff)
        # rank 0 has no lora_b / ptune row and rank 1 no prompt row: their gradients still arrive
        for name in ("lora_a", "lora_b", "prefix", "prompt", "ptune"):
            assert r["isolation_norm"][name] > 1e-4, (name, r["isolation_norm"])
        assert r["isolation_norm"]["idle"] == 0.0


def test_only_adapter_gradients_are_communicated(step):
    mode, ranks = step
    for r in ranks:
        adapters, count = r["trainable_bytes"], 8  # 8: the union batch's token count (one int64)
        if mode == "ddp":
            assert r["hook_bytes"] == adapters, (r["hook_bytes"], adapters)
            # besides the buckets: the token count and DDP's used-parameter map (one int32 per parameter)
            assert count <= r["total_bytes"] - adapters <= count + 4 * 64, r["bytes"]
        else:
            assert r["bytes"]["_allgather_base_"] == adapters, r["bytes"]
            assert r["bytes"]["_reduce_scatter_base_"] == adapters, r["bytes"]
            assert r["total_bytes"] == 2 * adapters + count, r["bytes"]
        assert r["total_bytes"] < r["frozen_bytes"]


def test_rank_zero_saves_peft_directories(step):
    _, ranks = step
    for r in ranks:
        assert r["written"] == sorted(r["saved"]) and len(r["saved"]) == 6
        assert r["load_diff"] < TOL
        assert r["peft_logit_diff"] < TOL
