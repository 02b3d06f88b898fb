"""The serving row: ``python -m peft_kernels serve`` under a mixed-adapter workload, against PEFT one
request at a time and against static batches through ``MultiAdapterModel.generate``.

    python -m peft_kernels.bench.serve [--requests 64] [--samples 3] [--out DIR]

The workload: a small random Llama (``--model``) saved with ``save_pretrained``, 6 PEFT adapters of 4 kinds (two
LoRA, two prefix tuning, prompt tuning, P-tuning) saved with ``peft``, and ``--requests`` greedy
completions cycling over the adapters and the base model, prompts of 4..32 token ids and 4..48 new
tokens each (``ignore_eos``: exactly that many). Three ways to serve it, timed on the same machine
in one run, interleaved, ``--samples`` times each:

- ``serve``: a real server process on 127.0.0.1 (the CLI), every request sent at once over HTTP
  (one client connection each, plain JSON responses); wall time from the first send to the last
  response. ``serve_stream`` sends the same requests streamed (server-sent events, one per token:
  the client's parsing shares this machine's cores) and gives time to first token per request;
- ``peft``: one ``PeftModel`` per adapter (LoRA ones share one), ``generate`` one request at a time;
- ``static``: ``MultiAdapterModel.generate`` on batches of ``--static-batch`` requests in arrival
  order (each batch runs until its longest request is done).

Before timing, every served request's tokens are checked against the same request run alone
through ``MultiAdapterModel.generate`` (a mismatch fails the row). Reported: requests/s and
tokens/s (generated tokens) of each, the speed-ups, and p50 / p90 time to first token under load.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

MODEL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=2048)
# The bench's model: the e2e suite's CPU Llama with GQA (MODEL is the tests' smaller one); compute per
# step is then more than the HTTP round trips of this machine.
SIZES = {"tiny": {}, "small": dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=2)}


def adapter_configs(hidden: int) -> dict:
    """The 6 PEFT adapter configs (4 kinds) of the workload."""
    import peft

    lora = dict(task_type="CAUSAL_LM", lora_dropout=0.0, init_lora_weights=False)
    return {
        "lora_a": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **lora),
        "lora_b": peft.LoraConfig(r=8, lora_alpha=8, use_rslora=True,
                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"], **lora),
        "prefix_a": peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        "prefix_b": peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8),
        "prompt": peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6),
        "ptuning": peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=hidden),
    }


def tiny_llama(seed: int = 0, **overrides):
    """The random Llama of the workload (``overrides`` change ``MODEL``); no end-of-sequence token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**MODEL, **overrides}, pad_token_id=0, bos_token_id=1, eos_token_id=None)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def word_tokenizer(vocab_size: int):
    """A WordLevel tokenizer over words ``w3`` .. (ids 0-2: ``<pad> <s> </s>``), as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<pad>")


def write_workload(root: Path, seed: int = 0, tokenizer: bool = True, **overrides) -> tuple[Path, dict, dict]:
    """(model dir, {adapter: dir}, {adapter: PeftModel}) written under ``root``: the tiny Llama
    (with a word tokenizer), and the 6 adapters with random weights, saved with ``save_pretrained``."""
    import peft

    root = Path(root)
    base = tiny_llama(seed, **overrides)
    model_dir = root / "model"
    base.save_pretrained(model_dir)
    if tokenizer:
        word_tokenizer(base.config.vocab_size).save_pretrained(model_dir)
    dirs, models = {}, {}
    for i, (name, config) in enumerate(adapter_configs(base.config.hidden_size).items()):
        torch.manual_seed(seed + 10 + i)
        m = peft.get_peft_model(copy.deepcopy(base), config)
        if isinstance(config, peft.PrefixTuningConfig):
            with torch.no_grad():  # PEFT's prefix starts small: make it matter
                for p in m.prompt_encoder.parameters():
                    p.normal_(0, 0.5)
        m.save_pretrained(root / name)
        dirs[name], models[name] = root / name, m.eval()
    return model_dir, dirs, models


def workload(n: int, names: list, vocab: int, seed: int = 0, lengths=(4, 32), new=(4, 48)) -> list[dict]:
    """``n`` requests cycling over ``names`` (None: the base model), random prompts and lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        L = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=g))
        out.append(dict(adapter=names[i % len(names)], prompt=torch.randint(3, vocab, (L,), generator=g).tolist(),
                        max_tokens=int(torch.randint(new[0], new[1] + 1, (1,), generator=g))))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m peft_kernels serve`` as a child process on 127.0.0.1 (a context manager)."""

    def __init__(self, model_dir: Path, adapters: dict, *extra: str, name: str = "base", log: Optional[Path] = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = name
        cmd = [sys.executable, "-m", "peft_kernels", "serve", "--model", str(model_dir), "--port", str(self.port),
               "--served-model-name", name, *[f"--adapter={a}={d}" for a, d in adapters.items()], *extra]
        self.log = open(log, "wb") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 180) -> "Server":
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the server on {self.url} did not answer /health within {timeout} s")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log is not subprocess.DEVNULL:
            self.log.close()

    def __enter__(self) -> "Server":
        return self.wait()

    def __exit__(self, *exc) -> None:
        self.close()


async def send_all(url: str, model_of, requests: list[dict], stream: bool = True) -> tuple[float, list[dict]]:
    """Send every request at once; (wall seconds, per request {tokens, ttft, status}).

    The client is aiohttp (as vLLM's serving benchmark): on a 2-core machine the load generator
    shares the cores with the server, and httpx spends ~5x aiohttp's CPU per request.
    """
    import aiohttp

    async def one(session, r):
        body = dict(model=model_of(r["adapter"]), prompt=r["prompt"], max_tokens=r["max_tokens"], temperature=0,
                    ignore_eos=True, stream=stream)
        t0 = time.perf_counter()
        async with session.post(url + "/v1/completions", json=body) as resp:
            if resp.status != 200:
                return dict(status=resp.status, tokens=await resp.json(), ttft=None)
            if not stream:
                return dict(status=200, tokens=(await resp.json())["choices"][0]["token_ids"], ttft=None)
            tokens, ttft = [], None
            async for line in resp.content:
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                tokens += json.loads(line[6:])["choices"][0]["token_ids"]
            return dict(status=200, tokens=tokens, ttft=ttft)

    connector = aiohttp.TCPConnector(limit=len(requests) + 4)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        t0 = time.perf_counter()
        out = await asyncio.gather(*(one(session, r) for r in requests))
        return time.perf_counter() - t0, list(out)


def reference_tokens(model, requests: list[dict]) -> list[list[int]]:
    """Each request run alone through ``MultiAdapterModel.generate`` (greedy)."""
    return [model.generate(torch.tensor([r["prompt"]]), adapter_names=[r["adapter"]],
                           max_new_tokens=r["max_tokens"])[0, len(r["prompt"]):].tolist() for r in requests]


def _peft_one_at_a_time(peft_models: dict, base, requests: list[dict]) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        for r in requests:
            m = base if r["adapter"] is None else peft_models[r["adapter"]]
            ids = torch.tensor([r["prompt"]])
            m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=r["max_tokens"],
                       min_new_tokens=r["max_tokens"], do_sample=False, pad_token_id=0)
    return time.perf_counter() - t0


def _static_batches(model, requests: list[dict], batch: int) -> float:
    t0 = time.perf_counter()
    for start in range(0, len(requests), batch):
        chunk = requests[start:start + batch]
        L = max(len(r["prompt"]) for r in chunk)
        ids = torch.zeros(len(chunk), L, dtype=torch.long)
        mask = torch.zeros(len(chunk), L, dtype=torch.long)
        for i, r in enumerate(chunk):  # left padding, as generate expects
            ids[i, L - len(r["prompt"]):] = torch.tensor(r["prompt"])
            mask[i, L - len(r["prompt"]):] = 1
        model.generate(ids, mask, adapter_names=[r["adapter"] for r in chunk],
                       max_new_tokens=max(r["max_tokens"] for r in chunk))
    return time.perf_counter() - t0


def run(args: argparse.Namespace, model: str) -> dict:
    """Build the workload on model size ``model`` (a key of SIZES), check the server's tokens, time
    the three ways; the row as a dict."""
    from ..multi_adapter import MultiAdapterModel

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory() as tmp:
        size = SIZES[model]
        model_dir, dirs, peft_models = write_workload(Path(tmp), seed=args.seed, **size)
        names = [None, *dirs]
        requests = workload(args.requests, names, size.get("vocab_size", MODEL["vocab_size"]), seed=args.seed)
        generated = sum(r["max_tokens"] for r in requests)
        ours = MultiAdapterModel(tiny_llama(args.seed, **size)).eval()
        for name, d in dirs.items():
            ours.load_adapter(d, name)
        base = tiny_llama(args.seed, **size)
        want = reference_tokens(ours, requests)
        with Server(model_dir, dirs, *args.server_args) as server:
            model_of = lambda a: server.name if a is None else a  # noqa: E731
            _, first = asyncio.run(send_all(server.url, model_of, requests))  # warm-up and correctness gate
            bad = [i for i, (r, w) in enumerate(zip(first, want)) if r["status"] != 200 or r["tokens"] != w]
            if bad:
                raise AssertionError(f"served tokens differ from generate alone for requests {bad[:8]}")
            times = {"serve": [], "serve_stream": [], "peft": [], "static": []}
            ttfts = []
            for _ in range(args.samples):  # interleaved
                wall, res = asyncio.run(send_all(server.url, model_of, requests, stream=False))
                times["serve"].append(wall)
                wall, res = asyncio.run(send_all(server.url, model_of, requests, stream=True))
                times["serve_stream"].append(wall)
                ttfts += [r["ttft"] for r in res]
                times["peft"].append(_peft_one_at_a_time(peft_models, base, requests))
                times["static"].append(_static_batches(ours, requests, args.static_batch))
    med = {k: statistics.median(v) for k, v in times.items()}
    ttfts.sort()
    row = {
        "row": "serve", "device": "cpu", "dtype": "fp32", "threads": torch.get_num_threads(),
        "model": {k: {**MODEL, **size}[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                                    "num_key_value_heads", "vocab_size")},
        "adapters": {n: type(c).__name__ for n, c in adapter_configs({**MODEL, **size}["hidden_size"]).items()},
        "requests": len(requests), "generated_tokens": generated, "static_batch": args.static_batch,
        "samples": args.samples, "seconds": times,
        "requests_per_s": {k: len(requests) / v for k, v in med.items()},
        "tokens_per_s": {k: generated / v for k, v in med.items()},
        "speedup_vs_peft": med["peft"] / med["serve"], "speedup_vs_static": med["static"] / med["serve"],
        "ttft_p50_s": ttfts[len(ttfts) // 2], "ttft_p90_s": ttfts[int(len(ttfts) * 0.9)],
    }
    return row


def markdown(row: dict) -> str:
    lines = [f"Serving {row['requests']} requests ({row['generated_tokens']} generated tokens) over "
             f"{len(row['adapters'])} adapters + base, llama {row['model']['num_hidden_layers']}x"
             f"{row['model']['hidden_size']} {row['dtype']} on {row['device']} ({row['threads']} threads), "
             f"median of {row['samples']}:", "",
             "| way | requests/s | tokens/s | serve speed-up |", "|---|---|---|---|"]
    for k, label in (("serve", "serve (continuous batching, HTTP)"), ("serve_stream", "serve, streamed (SSE)"),
                     ("peft", "PEFT one at a time"),
                     ("static", f"static batches of {row['static_batch']} (MultiAdapterModel.generate)")):
        speed = "" if k.startswith("serve") else f"{row['tokens_per_s']['serve'] / row['tokens_per_s'][k]:.2f}x"
        lines.append(f"| {label} | {row['requests_per_s'][k]:.2f} | {row['tokens_per_s'][k]:.1f} | {speed} |")
    lines += ["", f"Time to first token under load (streamed pass): p50 {row['ttft_p50_s'] * 1e3:.0f} ms, "
                  f"p90 {row['ttft_p90_s'] * 1e3:.0f} ms."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m peft_kernels.bench.serve", description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--static-batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="small,tiny",
                   help="model sizes to run, comma-separated (default: both): small: 4 layers x hidden 256, 8 heads / "
                        "2 KV heads, vocab 1024; tiny: the tests' 2 layers x hidden 64")
    p.add_argument("--out", default=None, help="write results.json and results.md here")
    p.add_argument("--server-arg", dest="server_args", action="append", default=[],
                   help="an extra argument for the server (repeatable), e.g. --server-arg=--max-batch-tokens=512")
    args = p.parse_args(argv)
    models = [m.strip() for m in args.model.split(",") if m.strip()]
    unknown = [m for m in models if m not in SIZES]
    if unknown or not models:
        p.error(f"--model takes sizes from {', '.join(sorted(SIZES))}, got {args.model!r}")
    rows = [run(args, m) for m in models]
    text = "\n".join(markdown(row) for row in rows)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(rows, indent=2))
        (out / "results.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
