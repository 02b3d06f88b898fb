"""PEFT adapter directories (adapter_config.json + adapter_model.safetensors): read and write.

Reading validates everything before returning, so a caller that loads into live modules only
after this succeeds never ends half-loaded. Writing is atomic: the whole directory is written to a
temporary sibling and swapped in with one rename. Also PEFT's LoRA key names and config rules.
"""
from __future__ import annotations

import json
import os
import re
import shutil
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
    recover_adapter_dir(root)
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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _siblings(root: Path, kind: str) -> list[Path]:
    """Temporary siblings of ``root`` (``.<name>.<kind>-<writer pid>-<random>``) whose writer is gone."""
    found = []
    for sibling in sorted(root.parent.glob(f".{root.name}.{kind}-*")):
        pid = sibling.name[len(f".{root.name}.{kind}-"):].split("-")[0]
        if not (pid.isdigit() and _alive(int(pid))):
            found.append(sibling)
    return found


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process is not saving to this path while it recovers it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_adapter_dir(path: Union[str, os.PathLike]) -> None:
    """Finish or undo a save that was killed part-way (called before every read and write).

    Semantics: a half-written temporary sibling whose writing process is gone is removed; if the directory itself is missing
    but the previous complete version was moved aside by a save killed between its two renames,
    that version is put back. A complete directory is never touched.
    """
    root = Path(path)
    for partial in _siblings(root, "tmp"):
        shutil.rmtree(partial, ignore_errors=True)
    old = _siblings(root, "old")
    if old and not root.exists():
        os.replace(old[-1], root)
        old = old[:-1]
    for stale in old:
        shutil.rmtree(stale, ignore_errors=True)


def write_adapter_dir(path: Union[str, os.PathLike], config: dict, state: dict[str, torch.Tensor]) -> None:
    """Write a PEFT adapter directory atomically: whole, into a temporary sibling, then one rename.

    Semantics: the directory is either the previous version or the new one, never a mix (a
    reader or a process killed at any point sees one complete adapter); files are fsynced
    before the swap and written with the usual permissions (0644 under umask 022, as PEFT).
    Files of the previous version other than the two adapter files are carried over.
    """
    root = Path(path)
    root.parent.mkdir(parents=True, exist_ok=True)
    recover_adapter_dir(root)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-{os.getpid()}-", dir=root.parent))
    try:
        umask = _umask()
        os.chmod(tmp, 0o777 & ~umask)
        if root.is_dir():
            for extra in root.iterdir():
                if extra.name not in (CONFIG_NAME, WEIGHTS_NAME) and extra.is_file():
                    shutil.copy2(extra, tmp / extra.name)
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            os.chmod(tmp / name, 0o666 & ~umask)
            _fsync(tmp / name)
        _fsync(tmp)
        if root.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-{os.getpid()}-", dir=root.parent))
            os.replace(root, aside)  # a kill from here to the next line is undone by recover_adapter_dir
            os.replace(tmp, root)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, root)
        _fsync(root.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def prompt_table(config: dict, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The prompt embeddings [P, H] of a PEFT prompt-tuning or P-tuning state dict, checked.

    Semantics: PEFT saves both as ``prompt_embeddings`` (for P-tuning, the encoder's output,
    i.e. already folded), so either loads as a fixed prompt; its shape must match the config's
    ``num_virtual_tokens`` x ``num_transformer_submodules`` and ``token_dim``. Raises
    ValueError naming what is wrong.
    """
    kind = config["peft_type"]
    if kind not in PROMPT_TYPES:
        raise ValueError(f"peft_type {kind} is not a soft prompt ({', '.join(PROMPT_TYPES)})")
    if "prompt_embeddings" not in state:
        raise ValueError(f"{WEIGHTS_NAME} has no 'prompt_embeddings' tensor (keys: {sorted(state)})")
    prompts = state["prompt_embeddings"]
    want = (config.get("num_virtual_tokens", prompts.shape[0]) * config.get("num_transformer_submodules", 1),
            config.get("token_dim", prompts.shape[-1]))
    if prompts.dim() != 2 or tuple(prompts.shape) != want:
        raise ValueError(f"prompt_embeddings is {list(prompts.shape)} but the config says {list(want)}")
    return prompts


def read_prompt_adapter(path: Union[str, os.PathLike]) -> tuple[dict, torch.Tensor]:
    """Read a PEFT prompt-tuning or P-tuning directory: (config, prompt embeddings [P, H]).

    Semantics: :func:`prompt_table` of the directory; errors are :class:`AdapterFormatError`
    naming the directory.
    """
    config, state = read_adapter_dir(path)
    try:
        return config, prompt_table(config, state)
    except ValueError as exc:
        raise AdapterFormatError(f"{path}: {exc}") from exc


# ------------------------------------------------------------------------------- LoRA format

PEFT_PREFIX = "base_model.model."
_A, _B = ".lora_A.weight", ".lora_B.weight"


def peft_lora_modules(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module name: (A [r, in], B [out, r])}`` from a PEFT LoRA state dict.

    Semantics: PEFT saves ``base_model.model.<module>.lora_A.weight`` (adapter name removed);
    any other key (DoRA magnitudes, biases, embedding LoRA) raises ValueError naming it.
    """
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        for suffix, part in ((_A, "A"), (_B, "B")):
            if name.endswith(suffix):
                modules.setdefault(name[: -len(suffix)], {})[part] = tensor
                break
        else:
            raise ValueError(f"unsupported LoRA tensor {key!r} (only lora_A/lora_B weights of Linear layers)")
    missing = sorted(m for m, parts in modules.items() if set(parts) != {"A", "B"})
    if missing:
        raise ValueError(f"LoRA modules without both lora_A and lora_B: {missing}")
    return {m: (parts["A"], parts["B"]) for m, parts in modules.items()}


def peft_lora_state(modules: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`peft_lora_modules`: PEFT's key names for each module's A and B."""
    state = {}
    for name, (a, b) in modules.items():
        state[PEFT_PREFIX + name + _A] = a
        state[PEFT_PREFIX + name + _B] = b
    return state


def _pattern_value(patterns: dict, module: str, default):
    for pattern, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?({pattern})", module):
            return value
    return default


def lora_module_alpha(config: dict, module: str) -> float:
    """A PEFT LoRA config's alpha for one module (``alpha_pattern`` honoured)."""
    return _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))


UNSUPPORTED_LORA = {"use_dora": True, "lora_bias": True}


def check_lora_config(config: dict) -> None:
    """Raise ValueError naming the field for PEFT LoRA settings the LoRA layers cannot reproduce
    or values that are out of range (checked before anything is built)."""
    for key, bad in UNSUPPORTED_LORA.items():
        if config.get(key) == bad:
            raise ValueError(f"LoRA config has {key}={bad}: not supported by peft_kernels' LoRA layers")
    if config.get("bias", "none") != "none":
        raise ValueError(f"LoRA config has bias={config['bias']!r}: only bias='none' is supported")
    if config.get("modules_to_save"):
        raise ValueError(f"LoRA config has modules_to_save={config['modules_to_save']}: not supported")
    r = config.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA config has r={r!r}: the rank must be an int >= 1")
    for key in ("lora_alpha", "lora_dropout"):
        value = config.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"LoRA config has {key}={value!r}: must be a number")
    dropout = float(config.get("lora_dropout", 0.0))
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA config has lora_dropout={dropout}: must be in [0, 1)")
    for key in ("alpha_pattern", "rank_pattern"):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise ValueError(f"LoRA config has {key}={patterns!r}: must be a dict of regex -> number")
        for pattern, value in patterns.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"LoRA config {key} has an invalid regex {pattern!r}: {exc}") from exc
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"LoRA config {key}[{pattern!r}]={value!r}: must be a number")
