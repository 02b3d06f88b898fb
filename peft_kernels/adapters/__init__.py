"""Adapter kinds of :class:`~peft_kernels.MultiAdapterModel`, one file each, registered here.

Each kind is an :class:`~peft_kernels.adapters.base.AdapterKind` with its config dataclass
(the defaults). A new kind: one new file, one :func:`register_kind` line below.
"""
from .base import KINDS, AdapterKind, Batch, PeftConfig, as_config_dict, kind_class, register_kind
from .bottleneck import BottleneckConfig, BottleneckKind
from .lora import LoraConfig, LoraKind
from .prefix import PrefixKind, PrefixTuningConfig, PTuningV2Config
from .prompt import PromptTuningConfig, PromptTuningKind, PTuningConfig, PTuningKind

register_kind(LoraKind)
register_kind(PrefixKind)
register_kind(PromptTuningKind)
register_kind(PTuningKind)
register_kind(BottleneckKind)

__all__ = [
    "AdapterKind", "Batch", "BottleneckConfig", "KINDS", "LoraConfig", "PTuningConfig", "PTuningV2Config", "PeftConfig",
    "PrefixTuningConfig", "PromptTuningConfig", "as_config_dict", "kind_class", "register_kind",
]
