#!/usr/bin/env python
"""Check that the native extensions load, register their kernels and match the op semantics.

    python .ci/check_extensions.py [--require-cuda] [--from-dir DIR]

Default: the installed peft_kernels._C / _C_cuda (loaded by path if importing the package fails).
--from-dir DIR: the _C / _C_cuda modules in DIR (e.g. build/cmake), without the installed package.
The CPU kernel always runs; the CUDA kernel runs when a GPU is present. Exits 1 on any failure.
"""
import argparse
import importlib
import importlib.util
import itertools
import os
import sys
import sysconfig

import torch

OP = "peft_kernels::soft_prompt_embed_fwd"
SCHEMA = (OP + "(Tensor input_ids, Tensor weight, Tensor prompts, Tensor? prompt_index, "
          "Tensor? prompt_lens, int insert_at) -> Tensor")
LORA_OP = "peft_kernels::multi_lora_fwd"
LORA_SCHEMA = (LORA_OP + "(Tensor x, Tensor lora_a, Tensor lora_b, Tensor? adapter_index, Tensor scaling, "
               "Tensor? ranks, Tensor? base) -> Tensor")
SUFFIX = sysconfig.get_config_var("EXT_SUFFIX")
failures = []


def check(ok, what):
    print(("ok    " if ok else "FAIL  ") + what)
    if not ok:
        failures.append(what)
    return ok


def load_file(name, path):
    spec = importlib.util.spec_from_file_location(f"peft_kernels.{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(name, from_dir):
    """Return (module or None, where it came from or why it did not load)."""
    if from_dir:
        path = os.path.join(from_dir, name + SUFFIX)
        return (load_file(name, path), path) if os.path.exists(path) else (None, f"{path} does not exist")
    try:
        module = importlib.import_module(f"peft_kernels.{name}")
        return module, module.__file__
    except ModuleNotFoundError as err:
        if err.name != "peft_kernels":
            return None, f"not built ({err})"
        return None, "peft_kernels is not installed"
    except Exception as err:  # the package's __init__ is broken: load the module by path instead
        spec = importlib.util.find_spec("peft_kernels")
        for folder in spec.submodule_search_locations or []:
            path = os.path.join(folder, name + SUFFIX)
            if os.path.exists(path):
                print(f"note  importing peft_kernels failed ({type(err).__name__}: {err}); loading {path}")
                return load_file(name, path), path
        return None, f"{type(err).__name__}: {err}"


def reference(ids, weight, prompts, index, lens, insert_at):
    B, P = ids.shape[0], prompts.shape[1]
    t = index.long() if index is not None else torch.arange(B) * (prompts.shape[0] != 1)
    n = lens.long()[t.clamp(min=0)] if lens is not None else torch.full((B,), P)
    keep = (t >= 0)[:, None, None] & (torch.arange(P)[None, :, None] < n[:, None, None])
    prompt = torch.where(keep, prompts[t.clamp(min=0)], torch.zeros((), dtype=prompts.dtype))
    emb = weight[ids.long()]
    return torch.cat([emb[:, :insert_at], prompt, emb[:, insert_at:]], dim=1)


def cases():
    g = torch.Generator().manual_seed(0)
    B, L, V, P = 3, 4, 11, 3
    for dtype, H, id_dtype, mode, lens_dtype, insert_at in itertools.product(
            (torch.float32, torch.bfloat16), (8, 5), (torch.int32, torch.int64),
            ("shared", "per-row", "index"), (None, torch.int32, torch.int64), (0, 1, L)):
        T = {"shared": 1, "per-row": B, "index": 2}[mode]
        index = torch.tensor([1, -1, 0], dtype=id_dtype) if mode == "index" else None
        lens = torch.tensor([2, 0, 3][:T], dtype=lens_dtype) if lens_dtype else None
        args = (torch.randint(0, V, (B, L), generator=g, dtype=id_dtype),
                torch.randn(V, H, generator=g).to(dtype), torch.randn(T, P, H, generator=g).to(dtype),
                index, lens, insert_at)
        yield f"{dtype} H={H} ids={id_dtype} prompt_index={mode} lens={lens_dtype} insert_at={insert_at}", args
    for dtype in (torch.float16, torch.float64):
        yield f"{dtype}", (torch.randint(0, V, (B, L), dtype=torch.int64), torch.randn(V, 6).to(dtype),
                           torch.randn(1, P, 6).to(dtype), None, None, 2)
    yield "large (OpenMP-parallel on CPU)", (torch.randint(0, 1000, (4, 300), generator=g), torch.randn(1000, 64),
                                              torch.randn(4, 20, 64), torch.tensor([3, -1, 0, 1]),
                                              torch.tensor([20, 5, 0, 19]), 100)
    ids = torch.randint(0, V, (L, B), generator=g).t()  # non-contiguous ids, weight, prompts
    yield "non-contiguous inputs", (ids, torch.randn(V, 16, generator=g)[:, ::2], torch.randn(B, 8, P).transpose(1, 2),
                                    torch.tensor([2, 0, -1]), None, 1)


def run_kernel(device):
    op = torch.ops.peft_kernels.soft_prompt_embed_fwd
    mismatches, ran = [], 0
    for name, args in cases():
        expected = reference(*args)
        try:
            out = op(*[a.to(device) if isinstance(a, torch.Tensor) else a for a in args]).cpu()
            if out.dtype != expected.dtype or not torch.equal(out, expected):
                mismatches.append(name)
        except Exception as err:
            mismatches.append(f"{name}: {type(err).__name__}: {err}")
        ran += 1
    check(not mismatches, f"{device} kernel matches the reference in {ran - len(mismatches)}/{ran} cases"
          + "".join(f"\n        mismatch: {m}" for m in mismatches))
    bad = [("out-of-range id", (torch.tensor([[0, 99]]), torch.randn(4, 2), torch.randn(1, 1, 2), None, None, 0)),
           ("1-D input_ids", (torch.tensor([0, 1]), torch.randn(4, 2), torch.randn(1, 1, 2), None, None, 0)),
           ("dtype mismatch", (torch.tensor([[0]]), torch.randn(4, 2), torch.randn(1, 1, 2).double(), None, None, 0)),
           ("insert_at > L", (torch.tensor([[0]]), torch.randn(4, 2), torch.randn(1, 1, 2), None, None, 2))]
    for name, args in bad:
        if device == "cuda" and name == "out-of-range id":
            continue  # a device-side assert, which would poison the CUDA context
        try:
            op(*[a.to(device) if isinstance(a, torch.Tensor) else a for a in args])
            if device == "cuda":
                torch.cuda.synchronize()
            check(False, f"{device} kernel: {name} did not raise")
        except RuntimeError as err:  # the kernel's own argument check, not any failure
            check("soft_prompt_embed" in str(err), f"{device} kernel: {name} rejected by its own check ({err})")


def lora_reference(x, lora_a, lora_b, index, scaling, ranks, base):
    """Row by row in fp64: y[n] = base[n] + scaling[t] * B[t, :, :r] @ (A[t, :r] @ x[n])."""
    N, H_out = x.shape[0], lora_b.shape[1]
    T, R = lora_a.shape[:2]
    t_of = index.tolist() if index is not None else [n if T > 1 else 0 for n in range(N)]
    r_of = ranks.tolist() if ranks is not None else [R] * T
    y = base.double().clone() if base is not None else torch.zeros(N, H_out, dtype=torch.float64)
    for n, t in enumerate(t_of):
        if t >= 0:
            r = r_of[t]
            h = lora_a[t, :r].double() @ x[n].double()
            y[n] += float(scaling[t]) * (lora_b[t, :, :r].double() @ h)
    return y


def lora_cases():
    g = torch.Generator().manual_seed(1)
    nan = float("nan")
    for dtype, (N, T, H_in, H_out), index_dtype, base in itertools.product(
            (torch.float32, torch.float64, torch.float16, torch.bfloat16),
            ((5, 3, 40, 24), (300, 8, 256, 130), (3, 3, 4096, 64)), (torch.int32, torch.int64, None), (True, False)):
        R = 16
        ranks = torch.randint(1, R + 1, (T,), generator=g, dtype=index_dtype or torch.int64)
        pad = torch.arange(R)[None, :] >= ranks[:, None]  # NaN there: a kernel that reads padding fails
        a = torch.randn(T, R, H_in, generator=g) / H_in ** 0.5
        b = torch.randn(T, H_out, R, generator=g)
        a, b = a.masked_fill(pad[:, :, None], nan), b.masked_fill(pad[:, None, :], nan)
        index = torch.randint(-1, T, (N,), generator=g, dtype=index_dtype) if index_dtype else None
        if index is None:
            T = N  # index None: row n uses adapter n
            ranks = None
            a, b = torch.randn(N, R, H_in, generator=g) / H_in ** 0.5, torch.randn(N, H_out, R, generator=g)
        args = (torch.randn(N, H_in, generator=g).to(dtype), a.to(dtype), b.to(dtype), index,
                torch.rand(T, generator=g) + 0.5, ranks, torch.randn(N, H_out, generator=g).to(dtype) if base else None)
        yield f"{dtype} N={N} T={T} H={H_in}x{H_out} index={index_dtype} base={base}", args


def run_lora_kernel(device):
    op = torch.ops.peft_kernels.multi_lora_fwd
    tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
    mismatches, ran = [], 0
    for name, args in lora_cases():
        expected = lora_reference(*args)
        try:
            out = op(*[a.to(device) if isinstance(a, torch.Tensor) else a for a in args]).cpu()
            dtype = args[0].dtype
            if out.dtype != dtype or out.shape != expected.shape or not torch.allclose(
                    out.double(), expected, atol=tol[dtype], rtol=tol[dtype]):
                err = (out.double() - expected).abs().max().item() if out.shape == expected.shape else "shape"
                mismatches.append(f"{name} (max abs error {err})")
        except Exception as err:
            mismatches.append(f"{name}: {type(err).__name__}: {err}")
        ran += 1
    check(not mismatches,
          f"{device} multi_lora_fwd matches a pure-torch computation in {ran - len(mismatches)}/{ran} cases"
          + "".join(f"\n        mismatch: {m}" for m in mismatches))
    x, a, b = torch.randn(4, 8), torch.randn(2, 3, 8), torch.randn(2, 5, 3)
    bad = [("x/lora_a H_in mismatch", (x, torch.randn(2, 3, 9), b, None, torch.ones(2), None, None)),
           ("dtype mismatch", (x, a.double(), b, torch.tensor([0, 1, 1, -1]), torch.ones(2), None, None)),
           ("index None with T not in (1, N)", (x, a, b, None, torch.ones(2), None, None))]
    if device == "cpu":
        bad.append(("out-of-range adapter_index", (x, a, b, torch.tensor([0, 2, 1, -1]), torch.ones(2), None, None)))
    for name, args in bad:
        try:
            op(*[v.to(device) if isinstance(v, torch.Tensor) else v for v in args])
            if device == "cuda":
                torch.cuda.synchronize()
            check(False, f"{device} multi_lora_fwd: {name} did not raise")
        except RuntimeError as err:  # the kernel's own argument check, not any failure
            check("multi_lora" in str(err), f"{device} multi_lora_fwd: {name} rejected by its own check ({err})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--require-cuda", action="store_true", help="fail unless the CUDA kernel is registered")
    parser.add_argument("--from-dir", help="load the extension modules built in this folder")
    args = parser.parse_args()
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), python {sys.version.split()[0]}")

    cpu, where = load("_C", args.from_dir)
    if check(cpu is not None, f"_C: {where}"):
        print(f"      build_info: {cpu.build_info()}")
        cuda, where = load("_C_cuda", args.from_dir)
        if cuda is not None:
            print(f"ok    _C_cuda: {where}\n      build_info: {cuda.build_info()}")
        elif args.require_cuda:
            check(False, f"_C_cuda: {where}")
        else:
            print(f"skip  _C_cuda: {where}")

    for op, schema, run in ((OP, SCHEMA, run_kernel), (LORA_OP, LORA_SCHEMA, run_lora_kernel)):
        has = {key: torch._C._dispatch_has_kernel_for_dispatch_key(op, key) for key in ("CPU", "CUDA")}
        check(has["CPU"], f"{op} has a CPU kernel")
        if args.require_cuda:
            check(has["CUDA"], f"{op} has a CUDA kernel")
        if has["CPU"]:
            packet = getattr(torch.ops.peft_kernels, op.split("::")[1])
            check(str(packet.default._schema) == schema, f"{op} schema")
            run("cpu")
        if has["CUDA"] and torch.cuda.is_available():
            run("cuda")
        elif has["CUDA"]:
            print(f"skip  {op}: CUDA kernel registered, but no GPU to run it on")

    print(f"{len(failures)} failure(s)" if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
