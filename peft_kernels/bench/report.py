"""Result files: ``results.json``, ``results.md`` and PNG plots (matplotlib, Agg backend)."""
from __future__ import annotations

import json
import math
import os
from typing import Optional

SUITE_TITLES = {"prefix": "prefix_attention", "lora": "multi_lora", "prompt": "soft prompts", "e2e": "end to end"}


def write_json(path: str, meta: dict, rows: list[dict]) -> None:
    """Strict JSON: NaN/inf become null, anything else unknown becomes its str()."""
    with open(path, "w") as f:
        json.dump(_clean({"meta": meta, "rows": rows}), f, indent=1, allow_nan=False)
        f.write("\n")


def _clean(x):
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if x is None or isinstance(x, (bool, int, str)):
        return x
    return str(x)


def _ms(e: dict) -> str:
    if e.get("median_ms") is None:
        return ""
    return f"{e['median_ms']:.4g} ±{e['iqr_ms']:.2g}"


def _num(x: Optional[float], fmt: str = ".3g") -> str:
    return "" if x is None else format(x, fmt)


def _mem(e: dict) -> str:
    b = e.get("peak_mem_bytes")
    return "n/a" if b is None else f"{b / 2**20:.1f}"


def _baseline_cell(e: dict, footnotes: list[str]) -> str:
    status = e.get("status", "")
    if status != "ok":
        if status not in footnotes:
            footnotes.append(status)
        return f"— [{footnotes.index(status) + 1}]"
    cell = _ms(e).split(" ")[0] + " ms"
    if e.get("speedup") is not None:
        cell += f" · **{e['speedup']:.2f}×**"
    if e.get("agrees") is True:
        cell += " ✓"
    elif e.get("agrees") is False:
        cell += f" ✗ ({e['max_rel_err']:.2g})"
    return cell


def markdown(meta: dict, rows: list[dict]) -> str:
    v = meta["versions"]
    lines = [
        f"# peft_kernels bench: {meta['device']}",
        "",
        f"- date {meta['date']}, commit `{meta['commit']}`{' (+ uncommitted changes)' if meta.get('dirty') else ''}",
        f"- torch {v['torch']} (CUDA {v['cuda']}), triton {v['triton']}, transformers {v['transformers']}, "
        f"peft {v['peft']}, python {v['python']}; CPU threads: {meta['threads']}",
        f"- mode: {'quick' if meta['quick'] else 'full'}; timer: {meta['timer']}",
        f"- peak: {meta['peak_note']}",
        f"- command: `{meta['command']}`",
        "",
        "Times are medians in ms (± IQR). Each baseline cell: its median, its speed-up = baseline / ours "
        "(both measured in this process on the same inputs), ✓ = its outputs (and grads) matched ours "
        "before timing. TB/s and TFLOP/s are ours' achieved rates for the row's minimal bytes/FLOPs model; "
        "% peak = those over the device peak (roofline % = the larger of the two). Peak mem: extra MiB "
        "allocated by one call on CUDA (n/a on CPU). See bench/README.md.",
        "",
    ]
    for suite in ("prefix", "lora", "prompt", "e2e"):
        srows = [r for r in rows if r["suite"] == suite]
        if not srows:
            continue
        names: list[str] = []
        for r in srows:
            for n in r["baselines"]:
                if n not in names:
                    names.append(n)
        footnotes: list[str] = []
        head = ["op", "mode", "shape", "dtype", "ours ms", "backend", *names, "TB/s", "TFLOP/s", "% peak BW",
                "% peak FLOP", "roofline %", "peak mem MiB (ours / " + " / ".join(names) + ")"]
        lines += [f"## {SUITE_TITLES[suite]}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in srows:
            o = r["ours"]
            if o.get("status") != "ok":
                cells = [r["op"], r["mode"], r["shape_label"], r["dtype"], f"**{o.get('status')}**", "",
                         *["" for _ in names], "", "", "", "", "", ""]
            else:
                mems = [_mem(o)] + [_mem(r["baselines"].get(n, {})) if r["baselines"].get(n, {}).get("status") == "ok"
                                    else "—" for n in names]
                cells = [r["op"], r["mode"], r["shape_label"], r["dtype"], _ms(o), str(o.get("backend")),
                         *[_baseline_cell(r["baselines"][n], footnotes) if n in r["baselines"] else "" for n in names],
                         _num(o.get("tbps")), _num(o.get("tflops")), _num(o.get("pct_peak_bw"), ".1f"),
                         _num(o.get("pct_peak_flops"), ".1f"), _num(o.get("roofline_pct"), ".1f"), " / ".join(mems)]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append("")
        for i, note in enumerate(footnotes, 1):
            lines.append(f"[{i}] {note}  ")
        notes = sorted({n for r in srows for n in r.get("notes", [])})
        impl_notes = {}
        for r in srows:
            for n, e in r["baselines"].items():
                if e.get("note"):
                    impl_notes.setdefault(n, e["note"])
        if footnotes:
            lines.append("")
        lines += [f"- {n}" for n in notes] + [f"- `{n}`: {t}" for n, t in impl_notes.items()] + [""]
        if suite == "e2e":
            from .suites import e2e

            lines += [e2e.summary(srows), ""]
    if meta.get("failures"):
        lines += ["## FAILURES", ""] + [f"- {f}" for f in meta["failures"]] + [""]
    return "\n".join(lines)


def _size(r: dict) -> Optional[float]:
    b = r["cost"].get("bytes")
    return b / 1e6 if b else None


def _regime(r: dict) -> str:
    """Which rows one plotted line connects: same mode and same kind of call (decode vs prefill...)."""
    shape = r["shape"]
    kind = shape.get("phase") or shape.get("kind") or ("decode" if shape.get("Lq") == 1 else "prefill" if "Lq" in shape else "")
    return f"{r['mode']}, {kind}" if kind else r["mode"]


def plots(out_dir: str, meta: dict, rows: list[dict]) -> list[str]:
    """``speedup_<suite>.png`` for every suite with rows, ``roofline_<suite>.png`` for those with a cost model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for suite in ("prefix", "lora", "prompt", "e2e"):
        srows = [r for r in rows if r["suite"] == suite and r["ours"].get("median_ms")]
        if not srows:
            continue
        has_cost = any(_size(r) for r in srows)
        xs = (lambda r: _size(r)) if has_cost else (lambda r: float(math.prod(
            v for k, v in r["shape"].items() if k in ("B", "L") and isinstance(v, int))))
        xlabel = "problem size: MB moved by the op (bytes model)" if has_cost else "tokens per batch (B x L)"

        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        ax.set_prop_cycle(color=plt.cm.tab20.colors)
        series: dict[str, list] = {}
        for r in srows:
            for n, e in r["baselines"].items():
                if e.get("speedup"):
                    series.setdefault(f"vs {n} ({_regime(r)})", []).append((xs(r), e["speedup"]))
        for name, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", lw=0.6, ms=4, label=name, alpha=0.8)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("speed-up of ours (baseline ms / ours ms)")
        ax.set_title(f"{SUITE_TITLES[suite]}: speed-up vs size, {meta['device']}", fontsize=9)
        if series:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no baseline ran", transform=ax.transAxes, ha="center")
        fig.tight_layout()
        path = os.path.join(out_dir, f"speedup_{suite}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

        if not has_cost:
            continue
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        if meta.get("peak") is None:
            ax.text(0.5, 0.5, f"{meta['peak_note']}\n(no roofline % without a known peak)", transform=ax.transAxes,
                    ha="center", va="center", fontsize=9, wrap=True)
            ax.set_xticks([])
            ax.set_yticks([])
        else:
            impls = ["ours"] + sorted({n for r in srows for n in r["baselines"]})
            for n in impls:
                pts = []
                for r in srows:
                    e = r["ours"] if n == "ours" else r["baselines"].get(n, {})
                    if e.get("roofline_pct") is not None and _size(r):
                        pts.append((_size(r), e["roofline_pct"], r["mode"]))
                for mode, marker in (("fwd", "o"), ("fwd+bwd", "s")):
                    sel = [p for p in pts if p[2] == mode]
                    if sel:
                        ax.scatter([p[0] for p in sel], [p[1] for p in sel], marker=marker, label=f"{n} ({mode})",
                                   alpha=0.9 if n == "ours" else 0.4, s=30 if n == "ours" else 16)
            ax.set_xscale("log")
            ax.set_ylim(0, 100)
            ax.set_xlabel("problem size: MB moved by the op (bytes model)")
            ax.set_ylabel("% of roofline (max of % peak BW, % peak FLOP/s)")
            ax.legend(fontsize=7)
        ax.set_title(f"{SUITE_TITLES[suite]}: roofline %, {meta['device']}", fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, f"roofline_{suite}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
