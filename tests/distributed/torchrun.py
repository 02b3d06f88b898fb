"""Launch a worker script on 2 CPU processes (torchrun, gloo) and read back each rank's JSON result."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKERS = Path(__file__).resolve().parent / "workers"
sys.path.insert(0, str(WORKERS))


def require_gloo() -> None:
    """Skip (with the reason printed by ``-ra``) where torch.distributed or its gloo backend is missing."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    if not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed has no gloo backend in this torch build")


def torchrun(script: str, *args, nproc: int = 2, timeout: float = 240) -> list[dict]:
    """Run ``workers/<script> args`` under ``torchrun --standalone --nproc_per_node nproc``; returns
    the per-rank results the worker wrote to the output directory (the last argument)."""
    require_gloo()
    out_dir = Path(args[-1])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(WORKERS),
                                                                                       os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(WORKERS / script), *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=WORKERS)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """The tiny Llama saved once for every worker to load (its directory)."""
    pytest.importorskip("transformers")
    import common

    path = tmp_path_factory.mktemp("tiny_llama")
    common.save_tiny_llama(str(path))
    return str(path)
