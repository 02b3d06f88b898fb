"""Render bench/results/compile/README.md from the JSON reports of tools/compile_triton.py and
tools/compile_cuda.py (one table per JSON)."""
from __future__ import annotations

import json
from pathlib import Path


def render(folder: Path) -> Path:
    """README.md of every report JSON in ``folder`` (one table per JSON)."""
    parts = ["# Ahead-of-time compile reports (no GPU)", "",
             "Written by tools/compile_triton.py and tools/compile_cuda.py; registers and spills from ptxas, "
             "shared memory in bytes (Triton: the compiled kernel's metadata; CUDA: static shared memory). "
             "Roles: `first` = the config a launch runs without autotuning (decode launches: the committed "
             "table's), `kept` = an autotune candidate the pruner keeps, `dropped: spills` = fits the arch's "
             "shared memory but the spill screen drops it (a non-spilling config remains), `fixed` = a kernel "
             "without configs. `smem_estimate` is the pruner's upper bound, `smem_limit` the arch's per-block "
             "maximum.", ""]
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        parts += [f"## {path.stem}", "", f"{data.get('summary', '')}", ""]
        cols = data["columns"]
        parts.append("| " + " | ".join(cols) + " |")
        parts.append("|" + "---|" * len(cols))
        for r in data["rows"]:
            parts.append("| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |")
        parts.append("")
    out = folder / "README.md"
    out.write_text("\n".join(parts))
    return out
