"""The training example: four adapters of four kinds in one loop, each loss going down."""
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from peft_kernels.mixed_training import train  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "train_mixed_adapters.py"


def test_every_adapter_learns_its_own_task_in_mixed_batches():
    history = train(steps=25, log=lambda *_: None)
    for name, losses in history.items():
        assert sum(losses[-3:]) / 3 < losses[0] - 0.1, (name, losses)


def test_example_script_trains_every_adapter():
    res = subprocess.run([sys.executable, str(SCRIPT), "--steps", "20"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    table = res.stdout[res.stdout.index("last loss"):].splitlines()[1:]
    losses = {name: (float(first), float(last)) for name, first, last in (line.split() for line in table if line)}
    assert set(losses) == {"lora", "prefix", "prompt", "ptuning"}, res.stdout
    for name, (first, last) in losses.items():
        assert last < first, (name, first, last)
