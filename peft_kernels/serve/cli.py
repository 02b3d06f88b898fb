"""``python -m peft_kernels serve``: load a model and its adapters, run the HTTP server."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

DTYPES = ("auto", "float32", "bfloat16", "float16")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="a transformers model directory (save_pretrained)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="a PEFT adapter directory of any supported kind, served as NAME (repeatable)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None,
                   help="the base model's name in requests and /v1/models (default: --model as given)")
    p.add_argument("--max-batch-tokens", type=int, default=2048,
                   help="slots one step feeds at most: one per running request, then prompt chunks (a longer "
                        "prompt is prefilled over several steps; default 2048)")
    p.add_argument("--kv-cache-bytes", type=int, default=1 << 30,
                   help="KV cache budget in bytes; requests reserve their longest length, the rest wait "
                        "(default 1 GiB)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests that may wait for the batch; past it, HTTP 429 (default 256)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))


def _adapter_args(specs: list[str]) -> list[tuple[str, str]]:
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter takes NAME=DIR, got {spec!r}")
        out.append((name, path))
    return out


def _tokenizer(model_dir: Path):
    if not any((model_dir / f).exists() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def build_engine(args: argparse.Namespace):
    """The :class:`~peft_kernels.serve.engine.Engine` the arguments describe (model and adapters loaded)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..multi_adapter import MultiAdapterModel
    from .engine import Engine

    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"--model {args.model}: not a transformers model directory (no config.json)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = (torch.bfloat16 if device.type == "cuda" else torch.float32) if args.dtype == "auto" \
        else getattr(torch, args.dtype)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    model = MultiAdapterModel(base)
    name = args.served_model_name or args.model
    engine = Engine(model, base_name=name, tokenizer=_tokenizer(model_dir), max_batch_tokens=args.max_batch_tokens,
                    kv_cache_bytes=args.kv_cache_bytes, max_queue=args.max_queue)
    for adapter, path in _adapter_args(args.adapter):
        if adapter == name:
            raise ValueError(f"--adapter {adapter}={path}: {adapter!r} is the base model's name")
        model.load_adapter(path, adapter)
        engine.adapter_paths[adapter] = path
    return engine


def configure(args: argparse.Namespace) -> None:
    """Logging, torch's CPU threads and the GIL hand-over of a serve process (server or engine)."""
    import torch

    logging.basicConfig(level=args.log_level.upper())
    if args.threads:
        torch.set_num_threads(args.threads)
    # threads of one process (the engine's worker and its pipe reader, the event loop and its reader)
    # hand the GIL over quickly: neither waits out a whole default 5 ms interval behind the other
    sys.setswitchinterval(0.0005)


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted; 2 on a bad model, adapter or argument.

    The engine runs in a child process (:class:`~peft_kernels.serve.engine_process.EngineProcess`),
    this one runs the HTTP server.
    """
    import uvicorn

    from .app import create_app
    from .engine_process import EngineProcess

    configure(args)
    try:  # a bad model or adapter fails in the engine process, which says why
        engine = EngineProcess(args, tokenizer=_tokenizer(Path(args.model))).wait_ready()
    except (ValueError, OSError) as exc:
        print(f"peft_kernels serve: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(create_app(engine, args.model), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peft_kernels serve", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
