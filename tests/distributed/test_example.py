"""examples/train_distributed.py under torchrun on 2 gloo ranks: trains and rank 0 writes PEFT directories."""
import os
import subprocess
import sys
from pathlib import Path

from torchrun import require_gloo

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "train_distributed.py"


def test_train_distributed_example_saves_every_adapter(tmp_path):
    require_gloo()
    out = tmp_path / "adapters"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
           "--mode", "ddp", "--steps", "3", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-4000:]
    assert "never communicated" in res.stdout and "saved lora, prefix, prompt, ptuning" in res.stdout, res.stdout
    for name in ("lora", "prefix", "prompt", "ptuning"):
        assert sorted(os.listdir(out / name)) == ["adapter_config.json", "adapter_model.safetensors"]
