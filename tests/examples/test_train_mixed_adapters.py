"""The example script trains four adapters of four kinds in one loop, each loss going down."""
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "train_mixed_adapters.py"


def test_every_adapter_learns_its_own_task_in_mixed_batches():
    spec = importlib.util.spec_from_file_location("train_mixed_adapters", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    history = module.train(steps=25, log=lambda *_: None)
    for name, losses in history.items():
        assert sum(losses[-3:]) / 3 < losses[0] - 0.1, (name, losses)
