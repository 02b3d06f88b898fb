"""Past one device, over torch.distributed (gloo on CPU, NCCL on GPUs).

:mod:`.data_parallel`: DDP / FSDP2 training of a :class:`~peft_kernels.MultiAdapterModel`'s
adapters with a frozen, replicated base (only adapter gradients travel), a loss whose averaged
gradient equals the union batch's, and rank-0 PEFT checkpoints. :mod:`.comm_bytes`: the bytes
collectives move. :mod:`.tp`: adapters on a tensor-parallel (transformers ``tp_plan``) base.
"""
from .comm_bytes import CollectiveBytes, counting_ddp_hook
from .data_parallel import (TokenLoss, broadcast_trainable, ddp, frozen, fsdp, full_adapters, label_tokens,
                            save_adapters, token_loss, trainable, unwrap, world)
from .tp import LoraSharding, kv_head_slice, lora_sharding  # registers the tensor-parallel rules

__all__ = [
    "CollectiveBytes", "LoraSharding", "TokenLoss", "broadcast_trainable", "counting_ddp_hook", "ddp", "frozen", "fsdp",
    "full_adapters", "kv_head_slice", "label_tokens", "lora_sharding", "save_adapters", "token_loss", "trainable", "unwrap", "world",
]
