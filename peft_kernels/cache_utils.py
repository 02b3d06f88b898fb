"""KV-cache helpers across transformers versions: find a cache, measure it, crop it."""
from __future__ import annotations

import functools
import inspect

from torch import Tensor


@functools.lru_cache(maxsize=None)
def cache_kw() -> str:
    """The forward keyword for a KV cache: ``cache`` in newer transformers, ``past_key_values`` before."""
    from transformers import LlamaForCausalLM

    params = inspect.signature(LlamaForCausalLM.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_of(out):
    """The KV cache of a model output (or of ``generate(..., return_dict_in_generate=True)``)."""
    for attr in ("cache", "past_key_values"):
        c = getattr(out, attr, None) if not isinstance(out, dict) else out.get(attr)
        if c is not None:
            return c
    raise ValueError(f"no KV cache in {type(out).__name__} (keys: {list(out.keys()) if hasattr(out, 'keys') else '?'})")


def cache_layers(cache) -> list[tuple[Tensor, Tensor]]:
    """Every layer's (key, value) tensors [B, H, positions, D]."""
    if hasattr(cache, "layers"):  # transformers >= 4.56: Cache.layers[i].keys / .values
        return [(layer.keys, layer.values) for layer in cache.layers if getattr(layer, "keys", None) is not None]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [(k, v) for k, v in cache]  # legacy tuple of (key, value) per layer


def cache_stats(cache) -> dict:
    """Bytes of every key and value tensor the cache holds, and its slots per layer (B x positions)."""
    layers = cache_layers(cache)
    nbytes = sum(t.numel() * t.element_size() for kv in layers for t in kv)
    k = layers[0][0]
    return {"bytes": int(nbytes), "layers": len(layers), "slots_per_layer": int(k.shape[0] * k.shape[-2]),
            "positions": int(k.shape[-2])}


def crop(cache, length: int) -> None:
    """Drop the cache's positions past ``length`` (``crop(-n)`` removes n in every transformers 5 version;
    a positive argument means an absolute length in some versions and is refused in others)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)
