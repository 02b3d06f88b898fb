"""One DDP or FSDP2 training step of a MultiAdapterModel on the rows of this rank, checked against
the same step on the union batch in this one process.

    torchrun --nproc_per_node 2 dp_worker.py {ddp,fsdp} BASE_DIR OUT_DIR
"""
from __future__ import annotations

import os
from collections import Counter

import common as C
import torch
from torch.distributed.tensor import DTensor

from peft_kernels.distributed import (CollectiveBytes, counting_ddp_hook, ddp, fsdp, label_tokens, save_adapters,
                                      token_loss, trainable, unwrap)
from peft_kernels.methods.lora import lora_layers


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def grad_of(p):
    return torch.zeros(p.shape) if p.grad is None else full(p.grad)


def adapter_grads(model, name: str) -> dict:
    """The gradient of adapter ``name``'s own tensors: its LoRA slots, or its table module's parameters."""
    if model.adapters[name] == "LORA":
        slot = model.kind("LORA").routing.names.index(name)
        out = {}
        for module, layer in lora_layers(model.model).items():
            r = int(layer.ranks[slot])
            if r:
                out[module + ".A"] = grad_of(layer.lora_A)[slot, :r]
                out[module + ".B"] = grad_of(layer.lora_B)[slot, :, :r]
        return out
    kind = model.kind(model.adapters[name])
    return {k: grad_of(p) for k, p in kind.tables[name].named_parameters()}


def run(mode: str, base: str, out_dir: str) -> None:
    rank, world = C.init()
    ids, mask, labels, names = C.union_batch()
    rows = C.rank_rows(rank, world)
    total = int((labels[:, 1:] != -100).sum())

    # The reference: the union batch in this one process.
    ref = C.multi_adapter_model(base).train()
    token_loss(ref(ids, attention_mask=mask, adapter_names=names).logits, labels, total, 1).backward()
    ref_grads = {k: grad_of(p) for k, p in ref.named_parameters() if p.requires_grad}

    # Each adapter's gradient from its own rows only (the rest of the union batch removed).
    iso, own = C.multi_adapter_model(base).train(), {}
    for name in C.ADAPTERS:
        keep = [i for i, n in enumerate(names) if n == name]
        iso.zero_grad(set_to_none=True)
        if keep:
            out = iso(ids[keep], attention_mask=mask[keep], adapter_names=[names[i] for i in keep])
            token_loss(out.logits, labels[keep], total, 1).backward()
        own[name] = adapter_grads(iso, name)

    model = C.multi_adapter_model(base).train()
    wrapped = ddp(model) if mode == "ddp" else fsdp(model)
    hook_bytes = Counter()
    if mode == "ddp":
        wrapped.register_comm_hook(None, counting_ddp_hook(hook_bytes))
    assert int(label_tokens(labels[rows])) == total
    with CollectiveBytes() as counted:
        loss = wrapped(ids[rows], mask[rows], labels[rows], names[rows])
        loss.backward()

    inner = unwrap(wrapped)
    grads = {k: grad_of(p) for k, p in inner.named_parameters() if p.requires_grad}
    result = {
        "grad_keys_match": sorted(grads) == sorted(ref_grads),
        "grad_diff": max(C.max_diff(grads[k], ref_grads[k]) for k in ref_grads),
        "grad_norm": float(sum(g.double().norm() ** 2 for g in ref_grads.values()) ** 0.5),
        "isolation_diff": {}, "isolation_norm": {},
    }
    for name in C.ADAPTERS:
        mine = adapter_grads(inner, name)
        result["isolation_diff"][name] = max((C.max_diff(mine[k], own[name][k]) for k in own[name]), default=0.0)
        result["isolation_norm"][name] = float(sum(g.double().norm() ** 2 for g in mine.values()) ** 0.5)

    opt = torch.optim.SGD(trainable(wrapped), lr=0.5, momentum=0.9)
    ref_opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    opt.step()
    ref_opt.step()
    ref_params = dict(ref.named_parameters())
    result["param_diff"] = max(C.max_diff(full(p), ref_params[k]) for k, p in inner.named_parameters()
                               if p.requires_grad)

    frozen_bytes = sum(p.numel() * p.element_size() for p in inner.parameters() if not p.requires_grad)
    trainable_bytes = sum(full(p).numel() * p.element_size() for p in inner.parameters() if p.requires_grad)
    result.update(bytes=dict(counted.bytes), calls=dict(counted.calls), total_bytes=counted.total,
                  hook_bytes=hook_bytes["allreduce"], trainable_bytes=trainable_bytes, frozen_bytes=frozen_bytes)

    ckpt = os.path.join(out_dir, "ckpt")
    saved = save_adapters(wrapped, ckpt)
    result["saved"] = saved
    result["written"] = sorted(os.listdir(ckpt)) if os.path.isdir(ckpt) else []
    from peft_kernels import MultiAdapterModel

    fresh = MultiAdapterModel(C.load_base(base))
    load_diff = 0.0
    for name in saved:
        fresh.load_adapter(os.path.join(ckpt, name), name)
        mine, theirs = fresh.adapter_state_dict(name), ref.adapter_state_dict(name)
        assert sorted(mine) == sorted(theirs), (name, sorted(mine), sorted(theirs))
        load_diff = max(load_diff, max(C.max_diff(mine[k], theirs[k]) for k in theirs))
    result["load_diff"] = load_diff

    from peft import PeftModel  # the LoRA directory loads in PEFT itself and gives the trained logits

    peft_model = PeftModel.from_pretrained(C.load_base(base), os.path.join(ckpt, "lora_a")).eval()
    ref.eval()
    with torch.no_grad():
        ours = ref(ids[:1], adapter_names=["lora_a"]).logits
        theirs = peft_model(input_ids=ids[:1]).logits
    result["peft_logit_diff"] = C.max_diff(ours, theirs)
    C.write_result(out_dir, rank, result)


if __name__ == "__main__":
    C.main_guard(run)
