"""Adapters on a tensor-parallel base (``from_pretrained(tp_plan="auto")``, 2 gloo ranks) against the
unsharded model in this process: mixed-batch logits, LoRA gradients, the rank-space all-reduce
bytes, and ``patch()`` of PEFT models.

    torchrun --nproc_per_node 2 tp_worker.py BASE_DIR OUT_DIR
"""
from __future__ import annotations

import os

import common as C
import torch
import torch.distributed as dist

import peft_kernels
from peft_kernels import MultiAdapterModel
from peft_kernels.distributed import CollectiveBytes, lora_sharding
from peft_kernels.methods.lora import lora_layers
from peft_kernels.methods.prefix_tuning import PrefixEncoder, PrefixTunedModel

SERVED = ["lora_a", "lora_b", "prefix", "prompt", "ptune"]
ROWS = ["lora_a", "prefix", "prompt", "ptune", None, "lora_b", "lora_a", "prefix"]


def save_dirs(base: str, out_dir: str) -> str:
    """Rank 0 creates the adapters (unsharded) and writes PEFT directories; every rank waits."""
    root = os.path.join(out_dir, "adapters")
    if dist.get_rank() == 0:
        model = C.multi_adapter_model(base, SERVED)
        for name in SERVED:
            model.save_adapter(name, os.path.join(root, name))
    dist.barrier()
    return root


def loaded(base: str, root: str, tp: bool) -> MultiAdapterModel:
    model = MultiAdapterModel(C.load_base(base, tp)).eval()
    for name in SERVED:
        model.load_adapter(os.path.join(root, name), name)
    return model


def logit_diffs(ref, tp, rows) -> dict:
    """Max |TP - unsharded| logits over real tokens: of the whole batch and of each adapter's rows."""
    ids, mask, _, _ = C.union_batch()
    keep = mask.bool()
    with torch.no_grad():
        want = ref(ids, attention_mask=mask, adapter_names=rows).logits
        got = tp(ids, attention_mask=mask, adapter_names=rows).logits
    out = {"all": C.max_diff(got[keep], want[keep])}
    for name in sorted(set(rows) - {None}):
        r = [i for i, n in enumerate(rows) if n == name]
        out[name] = C.max_diff(got[r][keep[r]], want[r][keep[r]])
    return out


def serving(base: str, root: str, result: dict) -> None:
    ids, mask, _, _ = C.union_batch()
    ref, tp = loaded(base, root, False), loaded(base, root, True)
    for key, rows in (("mixed", ROWS), ("mixed_without_prefix", [n if n != "prefix" else None for n in ROWS])):
        try:
            result[key] = logit_diffs(ref, tp, rows)
        except Exception as exc:  # reported to the test, which fails with it
            result[key] = {"error": f"{type(exc).__name__}: {exc}"}
    # The bytes LoRA adds: one [N, R] fp32 all-reduce per row-parallel layer (o_proj, down_proj);
    # no padding, so N = B * L tokens whichever path the model takes.
    with torch.no_grad():
        with CollectiveBytes() as plain:
            tp(ids, adapter_names=[None] * len(ROWS))
        with CollectiveBytes() as lora:
            tp(ids, adapter_names=["lora_a"] * len(ROWS))
    rowwise = {m: int(layer.lora_A.shape[1]) for m, layer in lora_layers(tp.model).items()
               if layer.sharding is not None and layer.sharding.style == "rowwise"}
    result["lora_extra_bytes"] = lora.total - plain.total
    result["expected_lora_bytes"] = sum(ids.numel() * R * 4 for R in rowwise.values())
    result["hidden_allreduce_bytes_per_layer"] = ids.numel() * tp.model.config.hidden_size * 4
    layers = lora_layers(tp.model)
    result["bank_shapes"] = {m: [list(layers[m].lora_A.shape), list(layers[m].lora_B.shape)]
                             for m in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj")}
    # save_adapter gathers the shards: the directory equals the one it was loaded from
    saved = tp.adapter_state_dict("lora_a")
    result["gathered_state_diff"] = max(C.max_diff(saved[k], v) for k, v in ref.adapter_state_dict("lora_a").items())


def lora_training(base: str, result: dict) -> None:
    """One backward through the TP model: every LoRA shard's gradient is its slice of the unsharded one."""
    ids, mask, labels, _ = C.union_batch()
    rows = ["lora_a", "lora_b", None, "lora_a", "lora_b", "lora_a", None, "lora_b"]
    grads = {}
    for tp in (False, True):
        model = C.multi_adapter_model(base, ["lora_a", "lora_b"], tp=tp).train()
        logits = model(ids, attention_mask=mask, adapter_names=rows).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()).backward()
        grads[tp] = {m: (layer.lora_A.grad, layer.lora_B.grad, layer.sharding) for m, layer in lora_layers(model.model).items()}
    diff = 0.0
    for module, (ga, gb, sharding) in grads[True].items():
        ref_a, ref_b, _ = grads[False][module]
        want_a, want_b = (ref_a, ref_b) if sharding is None else sharding.shard(ref_a, ref_b)
        diff = max(diff, C.max_diff(ga, want_a), C.max_diff(gb, want_b))
    result["lora_grad_diff"] = diff
    result["lora_grad_norm"] = float(sum(g.norm() ** 2 for ga, gb, _ in grads[False].values() for g in (ga, gb)) ** 0.5)


def prefix_model(base: str, result: dict) -> None:
    """PrefixTunedModel (the method layer) on the TP base: each rank attends its own KV heads' prefix."""
    ids, mask, _, _ = C.union_batch()
    torch.manual_seed(5)
    encoders = {n: PrefixEncoder.for_model(C.load_base(base).config, p) for n, p in (("p1", 3), ("p2", 2))}
    rows = ["p1", "p2", None, "p1", "p2", "p1", None, "p2"]
    out = []
    for tp in (False, True):
        with torch.no_grad():
            out.append(PrefixTunedModel(C.load_base(base, tp), encoders)(ids, attention_mask=mask, prefix=rows).logits)
    keep = mask.bool()
    result["prefix_model_logit_diff"] = C.max_diff(out[1][keep], out[0][keep])


def patched_peft(base: str, root: str, result: dict) -> None:
    """patch() of PEFT models whose base was loaded with tp_plan="auto" vs the unsharded PEFT model."""
    from peft import PeftModel

    ids, mask, _, _ = C.union_batch()
    keep = mask.bool()
    result["patch_logit_diff"] = {}
    for name in ("lora_a", "prefix", "prompt"):
        want = PeftModel.from_pretrained(C.load_base(base), os.path.join(root, name)).eval()
        got = peft_kernels.patch(PeftModel.from_pretrained(C.load_base(base, True), os.path.join(root, name)).eval())
        with torch.no_grad():
            a = want(input_ids=ids, attention_mask=mask).logits
            b = got(input_ids=ids, attention_mask=mask).logits
        a, b = a[:, -ids.shape[1]:], b[:, -ids.shape[1]:]
        result["patch_logit_diff"][name] = C.max_diff(b[keep], a[keep])
        if name == "lora_a":
            result["patch_sharded_layers"] = sum(
                getattr(m, "_peft_kernels_sharding", None) is not None for m in got.modules())


def run(base: str, out_dir: str) -> None:
    rank, _ = C.init()
    result = {}
    root = save_dirs(base, out_dir)
    serving(base, root, result)
    lora_training(base, result)
    prefix_model(base, result)
    patched_peft(base, root, result)
    probe = C.load_base(base, True).model.layers[0].self_attn
    result["styles"] = [lora_sharding(probe.q_proj).style, lora_sharding(probe.o_proj).style]
    C.write_result(out_dir, rank, result)


if __name__ == "__main__":
    C.main_guard(run)
