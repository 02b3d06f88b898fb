"""Compile every Triton kernel ahead of time, without a GPU, and report registers, spills and shared memory.

    python tools/compile_triton.py [--out bench/results/compile] [--archs 80,90] [--jobs 2]

Each launcher runs on small CPU tensors with the kernel launches intercepted (nothing executes),
so the tool sees exactly the arguments, constexprs and config lists a GPU launch would; each
recorded launch is then compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda",
arch, 32))`` for every arch at the config the launcher would use first and at every config the
arch-aware pruner keeps. ptxas (``TRITON_PTXAS_PATH``, default: the CUDA toolkit's) reports
registers, spills and stack; Triton's metadata the shared memory.

It fails (exit 1) on any compile error, on a kept config over the arch's shared memory, and on a
pruner estimate below what the compiler allocated. Writes ``triton-<version>.json`` and re-renders
``README.md`` (every JSON in the folder, the CUDA report of tools/compile_cuda.py included).
Run it with another Triton first on ``PYTHONPATH`` (e.g. ``.ci-deps/triton-3.6``) to check that one.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import io
import json
import multiprocessing
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
os.environ.pop("TRITON_INTERPRET", None)  # config lists are the GPU ones only without the interpreter


def _default_ptxas() -> None:
    if os.environ.get("TRITON_PTXAS_PATH"):
        return
    from cuda_env import find_cuda_home

    home, _ = find_cuda_home()
    if home and os.access(os.path.join(home, "bin", "ptxas"), os.X_OK):
        os.environ["TRITON_PTXAS_PATH"] = os.path.join(home, "bin", "ptxas")


_default_ptxas()

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from compile_report import render  # noqa: E402
from peft_kernels.triton import _tuning  # noqa: E402
from peft_kernels.triton import multi_lora as tm  # noqa: E402
from peft_kernels.triton import prefix_attention as tp  # noqa: E402
from peft_kernels.triton import prefix_attention_varlen as tv  # noqa: E402
from peft_kernels.triton import soft_prompt as ts  # noqa: E402
from peft_kernels.triton import soft_prompt_varlen as tsv  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
HEAD_DIMS = (64, 128)
_KERNEL_MODULES = (tp, tv, tm, ts, tsv)


# --------------------------------------------------------------------------- recording launches


@dataclass
class Launch:
    """One kernel launch a launcher made: the jit function, its arguments and how its config is chosen."""

    case: str
    fn: JITFunction
    args: tuple
    kwargs: dict
    dtype: str
    head_dim: object
    tuner: object = None  # the autotuner when the config is chosen per launch
    kernel: str = ""  # the decode-table name of an autotuned kernel
    bucket: object = None
    fixed: dict = field(default_factory=dict)  # num_warps / num_stages of a plain launch


@contextlib.contextmanager
def recording(sink: list, case: str, dtype: str, head_dim):
    """Intercept every Triton launch the kernel modules make; record it instead of running it."""
    saved_launch = {m: m.launch for m in _KERNEL_MODULES if hasattr(m, "launch")}
    saved_jit, saved_tuner = JITFunction.run, Autotuner.run

    def fake_launch(tuner, grid, args, kwargs, *, kernel, dtype, bucket=None):
        sink.append(Launch(case, tuner.fn, tuple(args), dict(kwargs), str(dtype).removeprefix("torch."),
                           head_dim, tuner=tuner, kernel=kernel, bucket=bucket))

    def fake_jit(self, *args, grid, warmup, **kwargs):
        opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        sink.append(Launch(case, self, args, kwargs, dtype, head_dim, fixed=opts))

    def fake_tuner(self, *args, **kwargs):
        kwargs.pop("grid", None), kwargs.pop("warmup", None)
        sink.append(Launch(case, self.fn, args, kwargs, dtype, head_dim, tuner=self, kernel=self.fn.__name__))

    for m in saved_launch:
        m.launch = fake_launch
    JITFunction.run, Autotuner.run = fake_jit, fake_tuner
    try:
        yield
    finally:
        for m, f in saved_launch.items():
            m.launch = f
        JITFunction.run, Autotuner.run = saved_jit, saved_tuner


def _attention_case(dtype, D, *, B, Hq, Hkv, Lq, Lk, T=3, P=8):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, Lq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    pk = torch.randn(T, Hkv, P, D, generator=g).to(dtype)
    pv = torch.randn(T, Hkv, P, D, generator=g).to(dtype)
    index = torch.arange(B, dtype=torch.int64) % T
    lens = torch.full((T,), P, dtype=torch.int64)
    kpm = torch.ones(B, Lk, dtype=torch.bool)
    return q, k, v, pk, pv, index, lens, kpm


def _varlen_case(dtype, D, lq, lk, *, Hq=8, Hkv=2, T=3, P=8):
    """The packed launcher's forward arguments for sequences of lq[s] queries and lk[s] keys."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(sum(lq), Hq, D, generator=g).to(dtype)
    k = torch.randn(sum(lk), Hkv, D, generator=g).to(dtype)
    v = torch.randn(sum(lk), Hkv, D, generator=g).to(dtype)
    pk = torch.randn(T, Hkv, P, D, generator=g).to(dtype)
    pv = torch.randn(T, Hkv, P, D, generator=g).to(dtype)
    cu = [torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32) for n in (lq, lk)]
    index = torch.arange(len(lq), dtype=torch.int64) % T
    lens = torch.full((T,), P, dtype=torch.int64)
    return q, k, v, pk, pv, cu[0], cu[1], max(lq), max(lk), index, lens


# Packed decode launches: a split-K step over ragged keys, a wide unsplit step, a 16-token step.
VARLEN_DECODE = (([1, 1], [512, 16]), ([1] * 64, [64] * 64), ([16], [512]))

OPS = ("attention", "attention_varlen", "lora", "soft_prompt")


def record_launches(dtypes, head_dims, ops=OPS) -> list[Launch]:
    """Every launch the Triton launchers of ``ops`` make for the prefill, decode and backward shapes."""
    out: list[Launch] = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        for D in head_dims if "attention" in ops else ():
            prefill = _attention_case(dtype, D, B=2, Hq=8, Hkv=2, Lq=64, Lk=64)
            with recording(out, "attention prefill", dname, D):
                tp.prefix_attention_fwd(*prefill, True, None)
            if D in tp.DECODE_HEAD_DIMS:
                for shape in tp.DECODE_SHAPES:
                    dims = {k: v for k, v in shape.items() if k != "split"}
                    with recording(out, f"attention decode Lq={dims['Lq']} B={dims['B']}", dname, D):
                        tp.prefix_attention_fwd(*_attention_case(dtype, D, **dims), True, None)
            o, lse = torch.zeros_like(prefill[0]), torch.zeros(prefill[0].shape[:3])
            with recording(out, "attention backward", dname, D):
                tp.prefix_attention_bwd(torch.zeros_like(o), *prefill, True, None, o, lse)
        for D in head_dims if "attention_varlen" in ops else ():
            prefill = _varlen_case(dtype, D, [64, 40, 24], [64, 56, 24])
            with recording(out, "attention varlen prefill", dname, D):
                tv.prefix_attention_varlen_fwd(*prefill, True, None)
            if D in tp.DECODE_HEAD_DIMS:
                for lq, lk in VARLEN_DECODE:
                    with recording(out, f"attention varlen decode Lq={lq[0]} S={len(lq)}", dname, D):
                        tv.prefix_attention_varlen_fwd(*_varlen_case(dtype, D, lq, lk), True, None)
            o, lse = torch.zeros_like(prefill[0]), torch.zeros(prefill[0].shape[1], prefill[0].shape[0])
            with recording(out, "attention varlen backward", dname, D):
                tv.prefix_attention_varlen_bwd(torch.zeros_like(o), *prefill, True, None, o, lse)
        g = torch.Generator().manual_seed(0)
        shapes = [("lora decode N={N} T={T} R={R}", s) for s in tm.DECODE_SHAPES] if "lora" in ops else []
        if "lora" in ops:
            shapes.append(("lora prefill", dict(N=256, T=4, R=16, H=256)))
        for label, sh in shapes:
            N, T, R, H = sh["N"], sh["T"], sh["R"], sh["H"]
            a = torch.randn(T, R, H, generator=g).to(dtype)
            b = torch.randn(T, H, R, generator=g).to(dtype)
            scaling = torch.ones(T)
            x = torch.randn(N, H, generator=g).to(dtype)
            index = torch.arange(N) % T
            with recording(out, label.format(**sh), dname, "-"):
                tm.multi_lora(x, a, b, index, scaling, None, x)
            if label == "lora prefill":
                with recording(out, "lora backward", dname, "-"):
                    tm.multi_lora_backward(x, x, a, b, index, scaling, None)
        if "soft_prompt" not in ops:
            continue
        Bs, L, Hs, V, Tp, Ps = 2, 8, 1024, 64, 2, 4
        ids = torch.randint(0, V, (Bs, L))
        weight = torch.randn(V, Hs).to(dtype)
        prompts = torch.randn(Tp, Ps, Hs).to(dtype)
        pidx = torch.tensor([1, -1])
        embeds = torch.randn(Bs, L, Hs).to(dtype)
        grad = torch.randn(Bs, L + Ps, Hs).to(dtype)
        with recording(out, "soft prompt", dname, "-"):
            ts.soft_prompt_embed(ids, weight, prompts, pidx, None, 0)
            ts.soft_prompt_concat(embeds, prompts, pidx, None, 1, False)
            ts.soft_prompt_embed_backward(grad, ids, V, Tp, pidx, None, 0, True)
            ts.soft_prompt_concat_backward(grad, Tp, Ps, pidx, None, 1, False)
        cu = torch.tensor([0, 9, 9, 40, 57], dtype=torch.int32)  # ragged packed sequences, one empty
        cu_out = torch.zeros(5, dtype=torch.int32)  # not read: launches are recorded, not run
        N, total = int(cu[-1]), int(cu[-1]) + 8
        ids_p, embeds_p = torch.randint(0, V, (N,)), torch.randn(N, Hs).to(dtype)
        grad_p, vidx = torch.randn(total, Hs).to(dtype), torch.tensor([0, 1, -1, 1], dtype=torch.int32)
        with recording(out, "soft prompt varlen", dname, "-"):
            tsv.soft_prompt_embed_varlen(ids_p, weight, prompts, cu, cu_out, total, vidx, None)
            tsv.soft_prompt_concat_varlen(embeds_p, prompts, cu, cu_out, total, vidx, None)
            tsv.soft_prompt_embed_varlen_backward(grad_p, ids_p.int(), cu, cu_out, V, Tp, Ps, vidx, None, True)
            tsv.soft_prompt_concat_varlen_backward(grad_p, cu, cu_out, N, Tp, Ps, vidx, None)
    return out


# --------------------------------------------------------------------------- compile jobs


@dataclass
class Job:
    launch: Launch
    arch: int
    config: dict  # {"kwargs": {...}, "num_warps": w, "num_stages": s}
    role: str  # "first" (what the launcher runs without autotuning), "kept" (autotune candidate), "fixed"


def _cfg_dict(c: triton.Config) -> dict:
    return {"kwargs": dict(c.kwargs), "num_warps": c.num_warps, "num_stages": c.num_stages}


def _named(launch: Launch) -> dict:
    named = dict(zip(launch.fn.arg_names, launch.args))
    named.update(launch.kwargs)
    return named


def plan(launches: list[Launch], archs, full=None) -> list[Job]:
    """Compile jobs: per arch, each plain launch once, each autotuned one at its first config and at
    every config the shared-memory screen keeps (spilling ones included, so that the spill list can
    be rebuilt); ``full``, a set of (dtype, head dim), limits the latter to those (others: first only)."""
    jobs, seen = [], {}
    _DECODE_FIRSTS.clear()
    for la in launches:
        for arch in archs:
            if la.tuner is None:
                cfgs = [({"kwargs": {}, "num_warps": la.fixed.get("num_warps", 4),
                          "num_stages": la.fixed.get("num_stages", 3)}, "fixed")]
            else:
                named = _named(la)
                prune = getattr(la.tuner, "arch_prune", None)
                if prune is None:  # a launch that bypasses _tuning.launch: every config is a candidate
                    kept = screened = list(la.tuner.configs)
                else:
                    kept = prune(la.tuner.configs, named, arch, screen_spills=False)
                    screened = prune(la.tuner.configs, named, arch)
                first = _tuning.pick_config(la.kernel, la.tuner.configs, prune, named, arch, getattr(torch, la.dtype),
                                            la.bucket)[0] if prune is not None else kept[0]
                if full is not None and (la.dtype, la.head_dim) not in full:
                    kept = [first]
                screened_text = {_tuning.config_text(c) for c in screened}

                def role(c):
                    if _cfg_dict(c) == _cfg_dict(first):
                        return "first"
                    return "kept" if _tuning.config_text(c) in screened_text else "dropped: spills"

                cfgs = [(_cfg_dict(c), role(c)) for c in kept]
            for cfg, role in cfgs:
                key = (la.fn.__name__, repr(sorted(la.kwargs.items())), la.dtype, la.head_dim, arch,
                       json.dumps(cfg, sort_keys=True), _spec_key(la))
                if key not in seen:
                    seen[key] = len(jobs)
                    jobs.append(Job(la, arch, cfg, role))
                elif role == "first":  # the same compile is another launch's first config
                    jobs[seen[key]].role = "first"
                if role == "first" and la.bucket is not None:
                    _DECODE_FIRSTS.append((la.kernel, arch, la.dtype, la.bucket, cfg, seen[key]))
    return jobs


# (kernel, arch, dtype, bucket, config, job index) of every decode launch's first config, set by plan()
_DECODE_FIRSTS: list = []


def _spec_key(la: Launch) -> str:
    """What, besides constexprs, changes the compiled code: argument dtypes and 1 / 16-divisible ints."""
    parts = []
    for a in la.args:
        if isinstance(a, torch.Tensor):
            parts.append(str(a.dtype))
        elif isinstance(a, bool) or not isinstance(a, int):
            parts.append(type(a).__name__)
        else:
            parts.append("1" if a == 1 else "16" if a % 16 == 0 else "i")
    return ",".join(parts)


_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


_JOBS: list[Job] = []  # set before the worker processes fork: they compile by index


def _compile_index(i: int) -> dict:
    return compile_job(_JOBS[i])


def compile_job(job: Job) -> dict:
    """Compile one job; a row of the report (``error`` set when it did not compile)."""
    from triton import knobs

    la = job.launch
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True  # ptxas must run: its log is the register report
    target = GPUTarget("cuda", job.arch, 32)
    backend = make_backend(target)
    kwargs = {**la.kwargs, **job.config["kwargs"], "num_warps": job.config["num_warps"],
              "num_stages": job.config["num_stages"]}
    row = {
        "kernel": la.kernel if "." in la.kernel else f"{la.fn.__module__.rsplit('.', 1)[-1]}.{la.fn.__name__}",
        "case": la.case, "config": _cfg_text(job.config), "role": job.role, "dtype": la.dtype,
        "D": la.head_dim, "arch": f"sm_{job.arch}", "triton": triton.__version__, "bucket": la.bucket,
        "registers": None, "spill_stores": None, "spill_loads": None, "stack": None, "shared": None,
        "smem_limit": _tuning.smem_limit(job.arch), "smem_estimate": _estimate(la, job), "seconds": None,
        "error": "",
    }
    t0 = time.perf_counter()
    log = io.StringIO()
    try:
        binder = create_function_from_signature(la.fn.signature, la.fn.params, backend)
        bound, specialization, options = binder(*la.args, **kwargs)
        options, signature, constexprs, attrs = la.fn._pack_args(backend, kwargs, bound, specialization, options)
        src = triton.compiler.ASTSource(la.fn, signature, constexprs, attrs)
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=target, options=options.__dict__)
        row["shared"] = int(compiled.metadata.shared)
    except Exception as exc:  # reported per row; main() fails the run
        row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    row["seconds"] = round(time.perf_counter() - t0, 2)
    text = log.getvalue()
    for name, pattern in _PTXAS.items():
        m = pattern.search(text)
        if m:
            row[name] = int(m.group(1))
    return row


def _cfg_text(cfg: dict) -> str:
    return _tuning.config_text(triton.Config(cfg["kwargs"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))


def _estimate(la: Launch, job: Job):
    """The pruner's shared-memory estimate of this config, when its kernel has one."""
    cfg = triton.Config(job.config["kwargs"], num_warps=job.config["num_warps"], num_stages=job.config["num_stages"])
    named = _named(la)
    name = la.kernel.rsplit(".", 1)[-1] if la.kernel else ""
    if la.fn.__module__.endswith(("prefix_attention", "prefix_attention_varlen")) and name in tp._SMEM_ROWS:
        return tp.smem_estimate(name, cfg, named["Q"].element_size(), named["D_PAD"])
    if la.fn.__module__.endswith("multi_lora") and name in tm._SMEM_TILES:
        a, b = (named[n].element_size() for n in tm._OPERANDS[name])
        return tm.smem_estimate(name, cfg, named, a, b)
    return None


# --------------------------------------------------------------------------- report


def problems(rows: list[dict]) -> list[str]:
    """What fails the check: compile errors, kept configs over the arch's shared memory, estimates
    below what the compiler allocated."""
    bad = []
    for r in rows:
        where = f"{r['kernel']} {r['config']} {r['dtype']} D={r['D']} {r['arch']} (triton {r['triton']})"
        if r["error"]:
            bad.append(f"compile error: {where}: {r['error']}")
        elif r["shared"] is not None and r["shared"] > r["smem_limit"]:
            bad.append(f"shared memory {r['shared']} > {r['smem_limit']}: {where}")
        elif r["smem_estimate"] is not None and r["shared"] is not None and r["smem_estimate"] < r["shared"]:
            bad.append(f"pruner estimate {r['smem_estimate']} < allocated {r['shared']}: {where}")
    return bad


def write_table(rows: list[dict], path: Path = _tuning.TABLE_PATH) -> None:
    """The decode config table from this run: per decode launch, the config it runs first (the first
    the arch-aware, spill-screened pruner keeps), when that compiled within the arch's shared memory."""
    entries = {}
    for kernel, arch, dtype, bucket, cfg, index in _DECODE_FIRSTS:
        r = rows[index]
        if r["error"] or r["shared"] > r["smem_limit"]:
            continue
        key = (kernel, arch, dtype, bucket)
        entries[key] = {"kernel": kernel, "arch": arch, "dtype": dtype, "bucket": bucket, "config": cfg,
                        "registers": r["registers"], "spill_stores": r["spill_stores"], "shared": r["shared"],
                        "source": "compile-screened, not GPU-timed"}
    data = {
        "about": ("Decode-launch configs per (kernel, arch, dtype, shape bucket): launches with a bucket run "
                  "these and never autotune (CUDA-graph capture safe). Entries marked 'compile-screened, not "
                  "GPU-timed' are the first config the arch-aware pruner keeps that compiled without spills "
                  "within the arch's shared memory (tools/compile_triton.py --write-table); "
                  "tools/tune_decode_table.py rewrites them from autotuning on a GPU."),
        "triton": triton.__version__,
        "entries": [entries[k] for k in sorted(entries)],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def write_spills(rows: list[dict], path: Path = _tuning.SPILLS_PATH) -> None:
    """Add this run's spilling configs to this Triton version's entries of the spill list the pruners
    read (entries of earlier runs stay: a config the screen dropped is compiled only in full runs)."""
    data = json.loads(path.read_text()) if path.exists() else {}
    data["about"] = ("Configs ptxas made spill (bytes of spill stores > 0), per Triton version, from "
                     "tools/compile_triton.py --write-spills; the pruners drop them where a non-spilling "
                     "config remains for the same (kernel, dtype, D, arch).")
    worst: dict = {}  # one entry per (kernel, config, dtype, D, arch): the largest spill of its launches
    for e in data.get("spilling", {}).get(triton.__version__, []):  # earlier runs: configs no longer compiled
        worst[(e["kernel"], e["config"], e["dtype"], str(e["D"]), int(e["arch"]))] = e["spill_stores"]
    for r in rows:
        if (r["spill_stores"] or 0) > 0 and r["role"] != "fixed":
            key = (r["kernel"], r["config"], r["dtype"], str(r["D"]), int(r["arch"].removeprefix("sm_")))
            worst[key] = max(worst.get(key, 0), r["spill_stores"])
    data.setdefault("spilling", {})[triton.__version__] = [
        {"kernel": k[0], "config": k[1], "dtype": k[2], "D": k[3], "arch": k[4], "spill_stores": v}
        for k, v in sorted(worst.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][3], kv[0][4], kv[0][1]))]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


COLUMNS = ["kernel", "case", "config", "role", "dtype", "D", "arch", "registers", "spill_stores", "spill_loads",
           "stack", "shared", "smem_estimate", "smem_limit", "seconds", "error"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "compile")
    ap.add_argument("--archs", default="80,90")
    ap.add_argument("--dtypes", default="fp16,bf16,fp32")
    ap.add_argument("--head-dims", default=",".join(map(str, HEAD_DIMS)))
    ap.add_argument("--full", default=None,
                    help="dtype:D pairs (D '-' for the non-attention kernels) compiled at every kept config, e.g. "
                         "'fp16:128,fp16:-'; the others at their first config only (default: all)")
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--write-table", action="store_true",
                    help=f"write {_tuning.TABLE_PATH.relative_to(ROOT)} from the decode launches' first configs")
    ap.add_argument("--write-spills", action="store_true",
                    help=f"record the spilling configs in {_tuning.SPILLS_PATH.relative_to(ROOT)} for this Triton")
    args = ap.parse_args(argv)
    archs = [int(a) for a in args.archs.split(",")]
    full = None
    if args.full is not None:
        pairs = [p.split(":") for p in args.full.split(",") if p]
        full = {(str(DTYPES[d]).removeprefix("torch."), "-" if h == "-" else int(h)) for d, h in pairs}
    t0 = time.perf_counter()
    launches = record_launches(args.dtypes.split(","), [int(d) for d in args.head_dims.split(",")],
                               args.ops.split(","))
    jobs = plan(launches, archs, full)
    print(f"compile_triton: triton {triton.__version__}, ptxas {os.environ.get('TRITON_PTXAS_PATH', '(bundled)')}: "
          f"{len(launches)} launches -> {len(jobs)} compiles on {args.jobs} processes", flush=True)
    _JOBS[:] = jobs
    ctx = multiprocessing.get_context("fork")  # the workers inherit the recorded launches
    with cf.ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
        rows = list(pool.map(_compile_index, range(len(jobs)), chunksize=1))
    seconds = time.perf_counter() - t0
    bad = problems(rows)
    spilling = [r for r in rows if (r["spill_stores"] or 0) > 0]
    summary = (f"triton {triton.__version__}, {len(rows)} compiles in {seconds:.0f} s on {args.jobs} processes; "
               f"{len(spilling)} spill, {len(bad)} problems.")
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"triton": triton.__version__, "torch": torch.__version__, "ptxas": os.environ.get("TRITON_PTXAS_PATH"),
              "archs": archs, "seconds": round(seconds, 1), "summary": summary, "columns": COLUMNS,
              "problems": bad, "rows": rows}
    path = args.out / f"triton-{triton.__version__}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    if args.write_spills:
        write_spills(rows)
    if args.write_table:
        write_table(rows)
    render(args.out)
    print(f"compile_triton: {summary} -> {path}")
    for line in bad:
        print(f"compile_triton: FAIL {line}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
