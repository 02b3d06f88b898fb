"""PEFT adapter directories (adapter_config.json + adapter_model.safetensors): read and write.

Reading validates everything before returning, so a caller that loads into live modules only
after this succeeds never ends half-loaded. Writing is atomic: temp files, then renames.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PROMPT_TYPES = ("PROMPT_TUNING", "P_TUNING")


class AdapterFormatError(ValueError):
    """An adapter directory is missing a file, or holds a corrupt or unexpected one."""


def read_adapter_dir(path: Union[str, os.PathLike]) -> tuple[dict, dict[str, torch.Tensor]]:
    """Return (config dict, state dict) of a PEFT adapter directory.

    Semantics: raises :class:`AdapterFormatError` naming the file for a missing directory or
    file, invalid JSON, a config without ``peft_type``, or an unreadable safetensors file.
    """
    root = Path(path)
    if not root.is_dir():
        raise AdapterFormatError(f"adapter directory {str(root)!r} does not exist")
    config_path, weights_path = root / CONFIG_NAME, root / WEIGHTS_NAME
    for needed in (config_path, weights_path):
        if not needed.is_file():
            raise AdapterFormatError(f"{str(root)!r} has no {needed.name} (a PEFT adapter directory holds "
                                     f"{CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFormatError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or "peft_type" not in config:
        raise AdapterFormatError(f"{config_path} has no peft_type")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFormatError(f"{weights_path} is not a readable safetensors file: {exc}") from exc
    return config, state


def write_adapter_dir(path: Union[str, os.PathLike], config: dict, state: dict[str, torch.Tensor]) -> None:
    """Write a PEFT adapter directory atomically (each file to a temp name, then renamed).

    Semantics: a reader never sees a half-written file; an existing directory's two files are
    replaced, anything else in it is left alone.
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    for name, write in (
        (WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"})),
        (CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, sort_keys=True))),
    ):
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=root)
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, root / name)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def read_prompt_adapter(path: Union[str, os.PathLike]) -> tuple[dict, torch.Tensor]:
    """Read a PEFT prompt-tuning or P-tuning directory: (config, prompt embeddings [P, H]).

    Semantics: PEFT saves both as ``prompt_embeddings`` (for P-tuning, the encoder's output,
    i.e. already folded), so either loads as a fixed prompt; checks its shape against the config.
    """
    config, state = read_adapter_dir(path)
    kind = config["peft_type"]
    if kind not in PROMPT_TYPES:
        raise AdapterFormatError(f"{path}: peft_type {kind} is not a soft prompt ({', '.join(PROMPT_TYPES)})")
    if "prompt_embeddings" not in state:
        raise AdapterFormatError(f"{path}/{WEIGHTS_NAME} has no 'prompt_embeddings' tensor (keys: {sorted(state)})")
    prompts = state["prompt_embeddings"]
    want = (config.get("num_virtual_tokens", prompts.shape[0]) * config.get("num_transformer_submodules", 1),
            config.get("token_dim", prompts.shape[-1]))
    if prompts.dim() != 2 or tuple(prompts.shape) != want:
        raise AdapterFormatError(f"{path}: prompt_embeddings is {list(prompts.shape)} but the config says {list(want)}")
    return config, prompts
