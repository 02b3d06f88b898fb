"""``python -m peft_kernels bench``: run the suites, write JSON + markdown + PNG, print the tables."""
from __future__ import annotations

import argparse
import gc
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from . import device as devinfo
from . import harness, report, suites
from .timing import Timer

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--op", choices=("prefix", "lora", "prompt", "e2e", "distributed", "serve", "all"), default="all",
                   help="which suite to run (default: all; 'distributed' launches 2 gloo ranks with torchrun and "
                        "counts the bytes each moves per training step; 'serve' runs 64 mixed-kind requests through "
                        "a real server process vs PEFT one at a time and static MultiAdapterModel batches)")
    p.add_argument("--quick", action="store_true",
                   help="a handful of rows per op (~2 min on an H100; tiny shapes, seconds, without CUDA)")
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                   help="element type (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="default: cuda when available; CPU runs pick CPU-sized shapes")
    p.add_argument("--out", default=None,
                   help="output directory (default: a new bench/results/<device-slug>/<date>-<time>/); an existing "
                        "results.json there is never overwritten unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="allow replacing the results.json in --out")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for ops and timer (default: torch's current setting); 1 is steadier "
                        "on a machine shared with other jobs")
    p.add_argument("--cpu-samples", type=int, default=None,
                   help="CPU only: interleaved samples per implementation (default 7 quick, 15 full; at least 7)")
    p.add_argument("--match", default=None, metavar="REGEX",
                   help="only the rows whose '<mode> <label>' (e.g. 'fwd+bwd prefill N1024 H512 T64 r16') matches")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--render", metavar="RESULTS_JSON", default=None,
                   help="run nothing: rewrite results.md and the plots from a results.json (e.g. a partial one "
                        "left by a run that timed out) into --out (default: its directory)")


def default_out_dir(slug: str, stamp: Optional[str] = None) -> Path:
    """A new folder per run: bench/results/<slug>/<YYYYmmdd-HHMMSS>/ (in the checkout, else the cwd)."""
    root = Path(__file__).resolve().parents[2]
    base = root if (root / "bench").is_dir() and (root / "peft_kernels").is_dir() else Path.cwd()
    return base / "bench" / "results" / slug / (stamp or time.strftime("%Y%m%d-%H%M%S"))


def _progress(total: int, disable: bool):
    try:
        from tqdm.auto import tqdm
    except Exception:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, desc="bench", unit="row", file=sys.stderr, disable=disable, dynamic_ncols=True)


def run(args: argparse.Namespace, argv: Optional[list[str]] = None) -> int:
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, argv)
    finally:
        torch.set_num_threads(threads)


def render(path: str, out: Optional[str] = None) -> int:
    """Markdown and plots from an existing results.json; exit code 1 if it records failures or is partial."""
    import json

    with open(path) as f:
        data = json.load(f)
    meta, rows = data["meta"], data["rows"]
    meta.setdefault("failures", [f for r in rows for f in harness.row_failures(r)])
    out_dir = Path(out) if out else Path(path).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    md = report.markdown(meta, rows)
    if meta.get("partial"):
        md = md.replace("\n", f"\n\n**PARTIAL: {len(rows)} rows (the run was cut short)**\n", 1)
    (out_dir / "results.md").write_text(md)
    pngs = report.plots(str(out_dir), meta, rows)
    print(md)
    print(f"rendered {out_dir / 'results.md'} and {len(pngs)} plots from {path}", file=sys.stderr)
    return 1 if meta["failures"] or meta.get("partial") else 0


def _run(args: argparse.Namespace, argv: Optional[list[str]] = None) -> int:
    if args.render:
        return render(args.render, args.out)
    if args.op == "distributed":
        from . import distributed

        out = Path(args.out) if args.out else default_out_dir("distributed")
        row = distributed.run(out=str(out))
        print(distributed.markdown(row))
        return 0
    if args.op == "serve":
        from . import serve

        out = Path(args.out) if args.out else default_out_dir("serve")
        threads = [f"--server-arg=--threads={args.threads}"] if args.threads else []  # the server's, as ours
        return serve.main(["--samples", str(max(7, args.cpu_samples or 7)), "--seed", str(args.seed), "--out", str(out),
                           *threads])
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    env = devinfo.environment(device)
    out_dir = Path(args.out) if args.out else default_out_dir(env["device_slug"])
    if (out_dir / "results.json").exists() and not args.overwrite:
        print(f"bench: {out_dir / 'results.json'} exists; pass another --out (or none: a new folder) or "
              "--overwrite", file=sys.stderr)
        return 2
    out_dir.mkdir(parents=True, exist_ok=True)
    timer = Timer(device, args.quick, args.cpu_samples)
    names = suites.SUITES if args.op == "all" else (args.op,)
    plan = [(name, spec) for name in names for spec in suites.get(name).specs(args.quick, device)]
    if args.match:
        pattern = re.compile(args.match)
        plan = [(name, spec) for name, spec in plan
                if pattern.search(f"{spec.get('mode', '')} {suites.get(name).label(spec)}")]
        if not plan:
            print(f"bench: no row matches --match {args.match!r}", file=sys.stderr)
            return 2
    meta = dict(env, quick=args.quick, timer=timer.description, dtype=str(dtype).replace("torch.", ""),
                suites=list(names),
                command="python -m peft_kernels bench " + " ".join(shlex.quote(a) for a in (argv or [])))
    print(f"peft_kernels bench on {env['device']} ({meta['dtype']}, {'quick' if args.quick else 'full'}): "
          f"{len(plan)} rows -> {out_dir}", file=sys.stderr)

    rows: list[dict] = []
    bar = _progress(len(plan), args.no_progress)
    start = time.perf_counter()
    for name, spec in plan:
        suite = suites.get(name)
        lbl = f"{name} {spec['mode']} {suite.label(spec)}"
        if bar is not None:
            bar.set_postfix_str(lbl, refresh=True)
        try:
            case = suite.build(spec, device, dtype, args.seed)
        except Exception as exc:
            rows.append({"suite": name, "op": name, "mode": spec["mode"], "shape": spec, "shape_label": suite.label(spec),
                         "dtype": meta["dtype"], "device": env["device"], "cost": {"bytes": None, "flops": None, "model": ""},
                         "ours": {"name": "ours", "status": f"error: building the row failed: {type(exc).__name__}: {exc}"},
                         "baselines": {}, "speedup": {}, "notes": []})
        else:
            rows.append(harness.run_case(case, timer, device, env, seed=args.seed))
            del case
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # Rows so far, so that a run cut short (a timeout) still leaves its results.
        report.write_json(str(out_dir / "results.json"), dict(meta, partial=True), rows)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    meta["elapsed_s"] = round(time.perf_counter() - start, 1)
    failures = [f for r in rows for f in harness.row_failures(r)]
    meta["failures"] = failures
    meta["partial"] = False

    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    report.write_json(str(json_path), meta, rows)
    md = report.markdown(meta, rows)
    md_path.write_text(md)
    pngs = report.plots(str(out_dir), meta, rows)
    print(md)
    print(f"wrote {json_path}, {md_path}, {len(pngs)} plots ({', '.join(os.path.basename(p) for p in pngs)}) "
          f"in {meta['elapsed_s']} s", file=sys.stderr)
    errors = [f"{r['op']} {r['mode']} {r['shape_label']}: {n} {e['status']}" for r in rows
              for n, e in r["baselines"].items() if str(e.get("status", "")).startswith("error")]
    for e in errors:
        print(f"bench: baseline error (reported, not a failure): {e}", file=sys.stderr)
    if failures:
        print(f"bench: {len(failures)} FAILURE(S):", file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m peft_kernels bench", description=__doc__)
    add_arguments(p)
    argv = sys.argv[1:] if argv is None else argv
    return run(p.parse_args(argv), argv)
