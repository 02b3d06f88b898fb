"""Count the bytes torch.distributed collectives move, per rank: the bench's communication column.

Two independent counters: :class:`CollectiveBytes` sees every c10d collective issued while it is
active (DDP's reducer, FSDP2's all-gathers and reduce-scatters, tensor-parallel all-reduces);
:func:`counting_ddp_hook` is a DDP communication hook that counts each gradient bucket it
all-reduces. Tests check that the two agree.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# c10d ops that move data between ranks (barrier, monitored waits and the like move none).
COLLECTIVES = {
    "allreduce_", "allreduce_coalesced_", "reduce_", "broadcast_", "allgather_", "_allgather_base_",
    "allgather_coalesced_", "allgather_into_tensor_coalesced_", "reduce_scatter_", "_reduce_scatter_base_",
    "reduce_scatter_tensor_coalesced_", "alltoall_", "alltoall_base_", "gather_", "scatter_", "send", "recv_",
}


class CollectiveBytes(TorchDispatchMode):
    """A dispatch mode counting, per collective, the bytes of the buffer it reduces, gathers or sends.

    Semantics: for each c10d collective issued inside ``with CollectiveBytes() as c:`` on this
    rank, the size of its largest tensor argument is added to ``c.bytes[op]`` (the reduced
    buffer of an all-reduce, the full buffer of a reduce-scatter or all-gather, the payload of a
    broadcast) and ``c.calls[op]`` counts the calls; ``c.total`` sums the bytes. Collectives run
    from C++ threads that never enter Python dispatch are not seen (DDP's reducer is: its
    all-reduce dispatches on the backward's thread, which inherits the mode on CPU).
    """

    def __init__(self):
        super().__init__()
        self.bytes: Counter = Counter()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "c10d" and func._opname in COLLECTIVES:
            sizes = [t.numel() * t.element_size() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            self.bytes[func._opname] += max(sizes, default=0)
            self.calls[func._opname] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.bytes.values())

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()


def counting_ddp_hook(counter: Counter) -> Callable:
    """A DDP comm hook (``ddp.register_comm_hook(group, hook)``) that all-reduces and averages each
    gradient bucket as DDP's default does, adding its bytes to ``counter["allreduce"]``.

    Semantics: ``counter["buckets"]`` counts the buckets; the gradients are exactly those without a hook.
    """
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(group, bucket):  # unannotated: DDP rejects a string annotation
        buffer = bucket.buffer()
        counter["allreduce"] += buffer.numel() * buffer.element_size()
        counter["buckets"] += 1
        return allreduce_hook(group, bucket)

    return hook
