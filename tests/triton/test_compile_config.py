"""Config choice of the Triton kernels, checked on the CPU: arch-aware shared-memory pruning per dtype,
the spill screen, the committed decode table (well-formed, covering every decode launch's key) and a
decode launch that takes its config from the table without autotuning."""
from __future__ import annotations

import json

import pytest
import torch
import triton

tp = pytest.importorskip("peft_kernels.triton.prefix_attention")
tm = pytest.importorskip("peft_kernels.triton.multi_lora")
from peft_kernels.triton import _tuning  # noqa: E402

ARCHS = (80, 90)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KIB = 1024


def _attn_named(dtype, d_pad, m_bucket=256):
    return {"Q": torch.empty(1, dtype=dtype), "D_PAD": d_pad, "M_BUCKET": m_bucket}


def _lora_named(kernel, dtype, block_m=64):
    x = torch.empty(1, dtype=dtype)
    f32 = torch.empty(1, dtype=torch.float32)
    named = {"shrink": {"x_ptr": x, "w_ptr": x}, "expand": {"h_ptr": f32, "w_ptr": x},
             "segsum": {"p_ptr": x, "q_ptr": f32}}[kernel]
    return {**named, "BLOCK_M": block_m} if kernel != "segsum" else named


def test_smem_limits_per_arch():
    assert _tuning.smem_limit(80) == 163 * KIB
    assert _tuning.smem_limit(90) == 227 * KIB
    assert _tuning.smem_limit(86) == 99 * KIB
    assert _tuning.smem_limit(75) == 99 * KIB  # unknown: the smallest


@pytest.mark.parametrize("kernel", ["fwd", "bwd_kv", "bwd_q"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d_pad", [64, 128, 256])
def test_attention_pruner_keeps_only_what_fits(kernel, dtype, d_pad):
    """16-bit inputs choose from GPU_CONFIGS, fp32 from FP32_CONFIGS, each screened by the arch's shared memory."""
    configs = tp.GPU_CONFIGS[kernel] + tp.FP32_CONFIGS[kernel]
    family = tp.FP32_CONFIGS[kernel] if dtype == torch.float32 else tp.GPU_CONFIGS[kernel]
    prune = tp._pruner(kernel)
    for arch in ARCHS:
        kept = prune(configs, _attn_named(dtype, d_pad), arch, screen_spills=False)
        fits = [c for c in family if tp.smem_estimate(kernel, c, dtype.itemsize, d_pad) <= _tuning.smem_limit(arch)]
        assert kept == (fits or family[-1:])


def test_attention_pruner_depends_on_arch_and_dtype():
    prune = tp._pruner("fwd")
    configs = tp.GPU_CONFIGS["fwd"] + tp.FP32_CONFIGS["fwd"]
    wide = tp._cfg(128, 128, 8, 3)  # fp16 D=128: ~225 KiB
    assert wide in prune(configs, _attn_named(torch.float16, 128), 90, screen_spills=False)
    assert wide not in prune(configs, _attn_named(torch.float16, 128), 80, screen_spills=False)
    assert wide not in prune(configs, _attn_named(torch.bfloat16, 128), 80, screen_spills=False)
    assert wide not in prune(configs, _attn_named(torch.float32, 128), 90, screen_spills=False)
    # decode: no tile taller than the packed query rows (at least 16)
    kept = prune(configs, _attn_named(torch.float16, 128, m_bucket=4), 90, screen_spills=False)
    assert kept and all(c.kwargs["BLOCK_M"] <= 16 for c in kept)
    # fp32 never gets a 16-bit tile (ptxas gives up on them), 16-bit never an fp32 one
    fp32 = prune(configs, _attn_named(torch.float32, 128), 90, screen_spills=False)
    assert fp32 and all(tp._same_as_any(c, tp.FP32_CONFIGS["fwd"]) for c in fp32)
    f16 = prune(configs, _attn_named(torch.float16, 128), 90, screen_spills=False)
    assert not any(tp._same_as_any(c, tp.FP32_CONFIGS["fwd"]) for c in f16)


def test_attention_smem_estimate_counts_every_tile():
    cfg = tp._cfg(64, 128, 4, 3)
    # Q tile + 3 stages of K and V, fp16, D_PAD 128, plus scratch
    assert tp.smem_estimate("fwd", cfg, 2, 128) == (64 + 3 * 2 * 128) * 128 * 2 + 1024
    assert tp.smem_estimate("fwd", cfg, 4, 128) == 2 * tp.smem_estimate("fwd", cfg, 2, 128) - 1024
    assert tp.smem_estimate("bwd_kv", cfg, 2, 128) > tp.smem_estimate("bwd_kv", cfg, 2, 64)


@pytest.mark.parametrize("kernel", ["shrink", "expand", "segsum"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lora_pruner_keeps_only_what_fits(kernel, dtype):
    configs = tm.GPU_CONFIGS[kernel]
    named = _lora_named(kernel, dtype)
    a, b = (named[n].element_size() for n in tm._OPERANDS[kernel])
    for arch in ARCHS:
        kept = tm._pruner(kernel)(configs, named, arch, screen_spills=False)
        assert kept
        assert all(tm.smem_estimate(kernel, c, named, a, b) <= _tuning.smem_limit(arch) for c in kept) or len(kept) == 1
        dropped = [c for c in configs if c not in kept]
        assert all(tm.smem_estimate(kernel, c, named, a, b) > _tuning.smem_limit(arch) for c in dropped)


def test_lora_fp32_counts_wider_tiles():
    cfg = tm.GPU_CONFIGS["shrink"][3]  # BLOCK_K 256
    f16, f32 = _lora_named("shrink", torch.float16), _lora_named("shrink", torch.float32)
    assert tm.smem_estimate("shrink", cfg, f32, 4, 4) == 4 * tm.smem_estimate("shrink", cfg, f16, 2, 2)
    assert cfg in tm._pruner("shrink")(tm.GPU_CONFIGS["shrink"], f16, 80, screen_spills=False)
    assert cfg not in tm._pruner("shrink")(tm.GPU_CONFIGS["shrink"], f32, 90, screen_spills=False)


def test_spill_screen_drops_listed_configs_but_never_all(tmp_path):
    configs = tp.GPU_CONFIGS["bwd_kv"]
    listed = [{"kernel": "prefix_attention.bwd_kv", "config": _tuning.config_text(c), "dtype": "float16", "D": 128,
               "arch": 90, "spill_stores": 8} for c in configs[:2]]
    path = tmp_path / "spills.json"
    path.write_text(json.dumps({"spilling": {"x": listed}}))
    kept = _tuning.drop_spilling("prefix_attention.bwd_kv", configs, torch.float16, 128, 90, path=path)
    assert kept == configs[2:]
    assert _tuning.drop_spilling("prefix_attention.bwd_kv", configs, torch.float16, 128, 80, path=path) == configs
    everything = [dict(listed[0], config=_tuning.config_text(c)) for c in configs]
    path.write_text(json.dumps({"spilling": {"x": everything}}))
    _tuning._load_spills.cache_clear()
    assert _tuning.drop_spilling("prefix_attention.bwd_kv", configs, torch.float16, 128, 90, path=path) == configs
    _tuning._load_spills.cache_clear()


def test_config_text():
    assert _tuning.config_text(tp._cfg(64, 128, 4, 3)) == "M64,N128 w4s3"


# --------------------------------------------------------------------------- the committed decode table

TABLE = json.loads(_tuning.TABLE_PATH.read_text()) if _tuning.TABLE_PATH.exists() else {"entries": []}
KERNEL_CONFIGS = {"prefix_attention.fwd": tp.GPU_CONFIGS["fwd"] + tp.FP32_CONFIGS["fwd"],
                  "multi_lora.shrink": tm.GPU_CONFIGS["shrink"],
                  "multi_lora.expand": tm.GPU_CONFIGS["expand"]}


def test_table_is_well_formed():
    assert TABLE["entries"], f"no entries in {_tuning.TABLE_PATH}"
    keys = set()
    for e in TABLE["entries"]:
        assert set(e) >= {"kernel", "arch", "dtype", "bucket", "config", "source"}
        assert e["kernel"] in KERNEL_CONFIGS, e["kernel"]
        assert e["dtype"] in ("float16", "bfloat16", "float32")
        assert e["source"] == "compile-screened, not GPU-timed" or e["source"].startswith("autotuned on ")
        cfg = _tuning._as_config(e["config"])
        assert any(c.kwargs == cfg.kwargs and (c.num_warps, c.num_stages) == (cfg.num_warps, cfg.num_stages)
                   for c in KERNEL_CONFIGS[e["kernel"]]), f"{e['kernel']}: {e['config']} is not in its config list"
        key = (e["kernel"], e["arch"], e["dtype"], e["bucket"])
        assert key not in keys, f"duplicate entry {key}"
        keys.add(key)


def _attention_decode_keys():
    for D in tp.DECODE_HEAD_DIMS:
        for s in tp.DECODE_SHAPES:
            G = s["Hq"] // s["Hkv"]
            yield "prefix_attention.fwd", tp.decode_bucket(s["Lq"], s["Lq"] * G, max(16, triton.next_power_of_2(D)),
                                                           s["split"])


def _lora_decode_keys():
    for s in tm.DECODE_SHAPES:
        bucket = tm._decode_bucket(s["N"], tm.gpu_block_m(s["N"], s["T"]), s["R"])
        yield "multi_lora.shrink", bucket
        yield "multi_lora.expand", bucket


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_table_covers_every_decode_launch(arch, dtype):
    for kernel, bucket in [*_attention_decode_keys(), *_lora_decode_keys()]:
        assert bucket is not None
        assert _tuning.table_entry(kernel, arch, dtype, bucket) is not None, (kernel, arch, dtype, bucket)


@pytest.mark.parametrize("arch", ARCHS)
def test_table_entries_fit_their_arch(arch):
    """Every entry is one the arch-aware pruner keeps for its dtype, so the launch can use it."""
    for e in TABLE["entries"]:
        if e["arch"] != arch or e["kernel"] != "prefix_attention.fwd":
            continue
        d_pad = int(e["bucket"].split(",")[0].split("=")[1])
        m = int(e["bucket"].split(",")[1].split("=")[1])
        named = _attn_named(getattr(torch, e["dtype"]), d_pad, m_bucket=m)
        kept = tp._pruner("fwd")(KERNEL_CONFIGS["prefix_attention.fwd"], named, arch)
        assert tp._same_as_any(_tuning._as_config(e["config"]), kept), e


def test_decode_selection_uses_the_table():
    kernel, bucket = "prefix_attention.fwd", tp.decode_bucket(1, 4, 128, True)  # D=128, one-token decode
    named = _attn_named(torch.bfloat16, 128, m_bucket=4)
    configs = KERNEL_CONFIGS[kernel]
    cfg, source = _tuning.pick_config(kernel, configs, tp._pruner("fwd"), named, 90, torch.bfloat16, bucket)
    assert source == "table"
    assert _tuning._as_config(_tuning.table_entry(kernel, 90, torch.bfloat16, bucket)).kwargs == cfg.kwargs
    cfg, source = _tuning.pick_config(kernel, configs, tp._pruner("fwd"), named, 90, torch.bfloat16, "no-such-bucket")
    assert source == "default" and cfg == tp._pruner("fwd")(configs, named, 90)[0]


class _FakeJit:
    arg_names = ["Q", "D_PAD", "M_BUCKET"]

    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append(("jit", grid, kwargs))


class _FakeTuner:
    def __init__(self, log):
        self.fn, self.arch_prune, self.log = _FakeJit(log), tp._pruner("fwd"), log
        self.configs = tp.GPU_CONFIGS["fwd"] + tp.FP32_CONFIGS["fwd"]

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append(("autotune", grid, kwargs))


@pytest.mark.parametrize("mode,expect", [(None, "jit"), ("1", "autotune"), ("0", "jit")])
def test_decode_launch_never_autotunes_by_default(monkeypatch, mode, expect):
    """A decode launch runs the jit kernel at the table's config (no autotuner) unless autotuning is asked for."""
    monkeypatch.setattr(_tuning, "INTERPRET", False)
    if mode is None:
        monkeypatch.delenv("PEFT_KERNELS_AUTOTUNE", raising=False)
    else:
        monkeypatch.setenv("PEFT_KERNELS_AUTOTUNE", mode)
    kernel, bucket = "prefix_attention.fwd", tp.decode_bucket(1, 4, 128, True)  # D=128, one-token decode
    log = []
    q = torch.empty(1, dtype=torch.bfloat16)
    _tuning.launch(_FakeTuner(log), lambda m: (m["BLOCK_M"], 1, 1), (q, 128, 4), {}, kernel=kernel,
                   dtype=torch.bfloat16, bucket=bucket)
    (how, grid, kwargs), = log
    assert how == expect
    if expect == "jit":
        entry = _tuning.table_entry(kernel, 90, torch.bfloat16, bucket)
        first = tp._pruner("fwd")(KERNEL_CONFIGS[kernel], {"Q": q, "D_PAD": 128, "M_BUCKET": 4}, 90)[0]
        want = entry if mode is None else {"kwargs": dict(first.kwargs), "num_warps": first.num_warps,
                                                     "num_stages": first.num_stages}
        assert {k: kwargs[k] for k in want["kwargs"]} == want["kwargs"]
        assert (kwargs["num_warps"], kwargs["num_stages"]) == (want["num_warps"], want["num_stages"])
        assert grid == (want["kwargs"]["BLOCK_M"], 1, 1)


def test_non_decode_launch_autotunes_by_default(monkeypatch):
    monkeypatch.setattr(_tuning, "INTERPRET", False)
    monkeypatch.delenv("PEFT_KERNELS_AUTOTUNE", raising=False)
    log = []
    _tuning.launch(_FakeTuner(log), lambda m: (1,), (torch.empty(1), 128, 256), {}, kernel="prefix_attention.fwd",
                   dtype=torch.float32, bucket=None)
    assert log[0][0] == "autotune"
