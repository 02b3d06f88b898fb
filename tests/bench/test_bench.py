"""The benchmark suite on CPU: quick runs of every op write JSON + markdown + PNG, every row has ours,
baselines and speed-ups, and every baseline matched ours on the bench's own inputs before timing.

Also: the harness flags a wrong baseline, the baselines follow the ops' full contract, the BGMV
Triton kernel is right (under TRITON_INTERPRET=1, which conftest sets without CUDA), the peak
table, and the plots of a device with a known peak.
"""
from __future__ import annotations

import json

import pytest
import torch

from peft_kernels import reference
from peft_kernels.__main__ import main as pk_main
from peft_kernels.bench import device, harness, report
from peft_kernels.bench.baselines import lora_bgmv, lora_gather_bmm, lora_loop, prefix_sdpa, prompt_cat
from peft_kernels.bench.costs import Cost
from peft_kernels.bench.timing import Timer

OPS = ("prefix", "lora", "prompt", "e2e")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One quick CPU bench per op (``python -m peft_kernels bench ...``, in this process), each into its own dir."""
    out = {}
    for op in OPS:
        d = tmp_path_factory.mktemp(f"bench_{op}")
        rc = pk_main(["bench", "--op", op, "--quick", "--device", "cpu", "--threads", "1", "--cpu-min-time", "0.02",
                      "--out", str(d)])
        out[op] = (rc, d)
    return out


@pytest.mark.parametrize("op", OPS)
def test_quick_bench_writes_json_markdown_png(runs, op):
    rc, d = runs[op]
    assert rc == 0, (d / "results.md").read_text() if (d / "results.md").exists() else "no results.md"
    data = json.loads((d / "results.json").read_text())
    meta = data["meta"]
    for key in ("commit", "date", "device", "device_slug", "timer", "peak_note"):
        assert meta[key], key
    for pkg in ("torch", "triton", "transformers", "peft"):
        assert meta["versions"][pkg], pkg
    assert meta["peak"] is None and "CPU" in meta["peak_note"]  # no peak on CPU: % left empty
    md = (d / "results.md").read_text()
    assert "| op | mode | shape |" in md and meta["device"] in md
    assert (d / f"speedup_{op}.png").stat().st_size > 1000
    if op != "e2e":
        assert (d / f"roofline_{op}.png").stat().st_size > 1000


@pytest.mark.parametrize("op", OPS)
def test_every_row_has_ours_baselines_speedups_and_agreement(runs, op):
    rc, d = runs[op]
    rows = json.loads((d / "results.json").read_text())["rows"]
    assert rows
    for row in rows:
        what = f"{row['op']} {row['mode']} {row['shape_label']}"
        o = row["ours"]
        assert o["status"] == "ok" and o["median_ms"] > 0 and o["iqr_ms"] >= 0 and o["backend"], what
        assert o["pct_peak_bw"] is None and o["roofline_pct"] is None, what
        assert row["baselines"] and set(row["speedup"]) == set(row["baselines"]), what
        timed = 0
        for name, e in row["baselines"].items():
            assert e["status"] == "ok" or e["status"].startswith("unavailable: "), (what, name, e["status"])
            if e["status"] != "ok":
                continue
            timed += 1
            assert e["median_ms"] > 0 and e["speedup"] == pytest.approx(e["median_ms"] / o["median_ms"]), (what, name)
            assert row["speedup"][name] == e["speedup"]
            if name != "base_model":  # the model without adapters computes something else on purpose
                assert e["agrees"] is True and e["max_rel_err"] <= e["tol"], (what, name, e)
        assert timed >= 1, what
        if row["cost"]["bytes"]:
            assert o["tbps"] > 0, what


def test_bench_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        pk_main(["bench", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--op", "--quick", "--dtype", "--out", "--device"):
        assert opt in text


def test_harness_flags_a_wrong_baseline():
    x = torch.randn(8, 4)
    case = harness.Case("prompt", "toy", "fwd", {}, "toy", torch.float32, Cost(128, 0, "toy"),
                        harness.Impl("ours", lambda: x * 2),
                        [harness.Impl("right", lambda: x + x), harness.Impl("wrong", lambda: x * 2.01),
                         harness.Impl("gone", unavailable="not here")])
    env = {"device": "cpu", "peak": None}
    row = harness.run_case(case, Timer(torch.device("cpu"), quick=True), torch.device("cpu"), env)
    assert row["baselines"]["right"]["agrees"] is True
    assert row["baselines"]["wrong"]["agrees"] is False
    assert row["baselines"]["gone"]["status"] == "unavailable: not here" and row["speedup"]["gone"] is None
    assert [f for f in harness.row_failures(row) if "wrong disagrees" in f]


def test_prefix_sdpa_baseline_follows_the_contract():
    """-1 rows, prefix_lens, key padding, GQA, Lq < Lk (bottom-right causal)."""
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, Lq, Lk, P, D, T = 3, 4, 2, 5, 9, 6, 8, 2
    q, k, v = torch.randn(B, Hq, Lq, D, generator=g), torch.randn(B, Hkv, Lk, D, generator=g), torch.randn(B, Hkv, Lk, D, generator=g)
    pk, pv = torch.randn(T, Hkv, P, D, generator=g), torch.randn(T, Hkv, P, D, generator=g)
    idx, lens = torch.tensor([1, -1, 0]), torch.tensor([6, 3])
    kpm = torch.ones(B, Lk, dtype=torch.bool)
    kpm[2, :2] = False
    want, _ = reference.prefix_attention(q, k, v, pk, pv, idx, lens, kpm, True, None)
    got = prefix_sdpa.prefix_cat_sdpa(q, k, v, pk, pv, idx, lens, kpm)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _lora_inputs(N=37, H_in=70, H_out=45, ranks=(3, 8, 5)):
    g = torch.Generator().manual_seed(1)
    T, R = len(ranks), max(ranks)
    a, b = torch.randn(T, R, H_in, generator=g), torch.randn(T, H_out, R, generator=g)
    for t, r in enumerate(ranks):
        a[t, r:] = 0
        b[t, :, r:] = 0
    idx = torch.randint(-1, T, (N,), generator=g)
    return (torch.randn(N, H_in, generator=g), a, b, idx, torch.tensor([2.0, 0.5, 1.0]), torch.tensor(ranks),
            torch.randn(N, H_out, generator=g))


@pytest.mark.parametrize("fn", [lora_loop.lora_loop, lora_gather_bmm.lora_gather_bmm, lora_bgmv.lora_bgmv_torch])
def test_lora_baselines_follow_the_contract(fn):
    x, a, b, idx, s, ranks, base = _lora_inputs()
    want = reference.multi_lora(x, a, b, idx, s, ranks, base)
    torch.testing.assert_close(fn(x, a, b, idx, s, ranks, base), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fn(x, a, b, idx, s, ranks, None), reference.multi_lora(x, a, b, idx, s, ranks, None),
                               atol=1e-4, rtol=1e-4)


def test_bgmv_triton_kernel_matches_reference():
    why = lora_bgmv.triton_runs_on(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if why:
        pytest.skip(why)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x, a, b, idx, s, ranks, base = (t.to(dev) for t in _lora_inputs())
    want = reference.multi_lora(x, a, b, idx, s, ranks, base)
    torch.testing.assert_close(lora_bgmv.lora_bgmv(x, a, b, idx, s, ranks, base, block_r=4, block_k=32, block_o=16),
                               want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lora_bgmv.lora_bgmv(x, a, b, idx, s, ranks, None), reference.multi_lora(x, a, b, idx, s, ranks, None),
                               atol=1e-4, rtol=1e-4)


def test_prompt_baselines_follow_the_contract():
    g = torch.Generator().manual_seed(2)
    ids, w, p = torch.randint(0, 50, (3, 7), generator=g), torch.randn(50, 16, generator=g), torch.randn(2, 4, 16, generator=g)
    idx = torch.tensor([1, 0, 1])
    torch.testing.assert_close(prompt_cat.prompt_embed_cat(ids, w, p, idx), reference.soft_prompt_embed(ids, w, p, idx, None, 0))
    e = torch.randn(3, 7, 16, generator=g)
    for at, rep in ((0, False), (1, False), (1, True)):
        torch.testing.assert_close(prompt_cat.prompt_concat_cat(e, p, idx, at, rep),
                                   reference.soft_prompt_concat(e, p, idx, None, at, rep))


@pytest.mark.parametrize("name,tbps,tflops", [
    ("NVIDIA H100 80GB HBM3", 3.35, 989.0), ("NVIDIA H100 PCIe", 2.0, 756.0), ("NVIDIA H200", 4.8, 989.0),
    ("NVIDIA A100-SXM4-80GB", 2.0, 312.0), ("NVIDIA H100 NVL", None, None), ("NVIDIA GeForce RTX 4090", None, None),
])
def test_peak_table(name, tbps, tflops):
    peak = device.peak_for(name)
    assert (peak is None) == (tbps is None)
    if peak is not None:
        assert (peak.tbps, peak.tflops_16bit) == (tbps, tflops)


def test_roofline_plot_with_a_known_peak(runs, tmp_path):
    data = json.loads((runs["lora"][1] / "results.json").read_text())
    meta = dict(data["meta"], peak={"name": "H100 SXM", "tbps": 3.35, "tflops_16bit": 989.0}, device="fake H100")
    for r in data["rows"]:
        r["ours"]["roofline_pct"] = 42.0
    written = report.plots(str(tmp_path), meta, data["rows"])
    assert str(tmp_path / "roofline_lora.png") in written
    assert (tmp_path / "roofline_lora.png").stat().st_size > 1000
