"""Compile each csrc/cuda/*.cu for sm_80 and sm_90a with ``nvcc -Xptxas -v`` and report every kernel's
registers, spills, stack and static shared memory (no GPU needed).

    python tools/compile_cuda.py [--out bench/results/compile] [--archs 80,90a]

Include dirs and the toolkit come from tools/cuda_env.py (what setup.py and CMake use); the flags
are torch.utils.cpp_extension's CUDA flags. Fails (exit 1) when a file does not compile. Writes
``cuda.json`` and re-renders ``README.md`` next to the Triton reports.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import cuda_env  # noqa: E402
from compile_report import render  # noqa: E402

COLUMNS = ["kernel", "file", "arch", "registers", "spill_stores", "spill_loads", "stack", "shared", "seconds", "error"]

# torch.utils.cpp_extension's flags for .cu sources
NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
              "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr", "-O3", "-DTORCH_API_INCLUDE_EXTENSION_H",
              "-DTORCH_EXTENSION_NAME=_C_cuda", "-std=c++20", "-Xcompiler", "-fPIC"]


def parse_ptxas(text: str, file: str, arch: str) -> list[dict]:
    """One row per (kernel, arch) entry of an ``nvcc -Xptxas -v`` log (``arch`` unused: the log names it)."""
    rows, cur = [], None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            cur = {"kernel": _short(m.group(1)), "file": file, "arch": m.group(2), "registers": None,
                   "spill_stores": None, "spill_loads": None, "stack": None, "shared": 0, "seconds": None,
                   "error": ""}
            rows.append(cur)
            continue
        if cur is None:
            continue
        for key, pat in (("stack", r"(\d+) bytes stack frame"), ("spill_stores", r"(\d+) bytes spill stores"),
                         ("spill_loads", r"(\d+) bytes spill loads"), ("registers", r"Used (\d+) registers"),
                         ("shared", r"(\d+) bytes smem")):
            m = re.search(pat, line)
            if m:
                cur[key] = int(m.group(1))
    return rows


def _short(mangled: str) -> str:
    """The demangled kernel name without its argument list (cu++filt when available)."""
    try:
        out = subprocess.run(["c++filt", mangled], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = mangled
    out = out.replace("(anonymous namespace)::", "").removeprefix("void ")
    return out.split("(", 1)[0][:160] or mangled


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "compile")
    ap.add_argument("--archs", default="80,90a")
    args = ap.parse_args(argv)
    env = cuda_env.discover()
    if not env["BUILD_CUDA"]:
        print(f"compile_cuda: FAIL no CUDA build possible: {env['WHY_NO_CUDA']}")
        return 1
    includes = [*env["CUDA_INCLUDE_DIRS"].split(";"), *env["TORCH_INCLUDE_DIRS"].split(";"),
                sysconfig.get_paths()["include"]]
    rows, failed, t_all = [], [], time.perf_counter()
    archs = args.archs.split(",")
    for cu in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        # one nvcc call for every arch: the host side compiles once, ptxas reports each arch
        cmd = [env["NVCC"], "-c", str(cu), "-o", os.path.join(tempfile.gettempdir(), f"pk_{cu.stem}.o"),
               *(f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs), "-Xptxas", "-v", *NVCC_FLAGS,
               *(f"-I{d}" for d in includes), f"-D_GLIBCXX_USE_CXX11_ABI={env['TORCH_CXX11_ABI']}"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = round(time.perf_counter() - t0, 1)
        found = parse_ptxas(proc.stdout + proc.stderr, cu.name, "")
        for r in found:
            r["seconds"] = seconds
        if proc.returncode != 0:
            err = (proc.stderr.strip().splitlines() or ["nvcc failed"])[-1][:300]
            failed.append(f"{cu.name}: {err}")
            found = [{"kernel": "-", "file": cu.name, "arch": ",".join(archs), "seconds": seconds, "error": err}]
        rows += found
        print(f"compile_cuda: {cu.name} ({', '.join('sm_' + a for a in archs)}): rc={proc.returncode}, "
              f"{len(found)} kernel builds, {seconds} s", flush=True)
    spilling = [r for r in rows if (r.get("spill_stores") or 0) > 0]
    summary = (f"nvcc {env['CUDA_VERSION']}, {len(rows)} kernel builds in {time.perf_counter() - t_all:.0f} s; "
               f"{len(spilling)} spill, {len(failed)} files failed.")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cuda.json").write_text(json.dumps(
        {"nvcc": env["CUDA_VERSION"], "summary": summary, "columns": COLUMNS, "problems": failed, "rows": rows},
        indent=1) + "\n")
    render(args.out)
    print(f"compile_cuda: {summary}")
    for line in failed:
        print(f"compile_cuda: FAIL {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
