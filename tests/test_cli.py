"""The command line a new user runs first: ``info`` and ``demo``."""
import json
import os
import subprocess
import sys


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PEFT_KERNELS_BACKEND")}
    return subprocess.run([sys.executable, "-m", "peft_kernels", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def test_info_shows_reference_and_cpp_available():
    res = _run("info")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert any(line.strip().startswith("reference  cpu: yes") for line in lines), res.stdout
    assert any(line.strip().startswith("cpp        cpu: yes") for line in lines), res.stdout
    data = json.loads(_run("info", "--json").stdout)
    assert data["extensions"]["_C"]["loaded"]


def test_demo_runs_and_agrees_with_baselines():
    res = _run("demo")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "all ops agree with their baselines" in res.stdout
    assert "demo finished: all checks passed" in res.stdout
    for op in ("prefix_attention", "multi_lora", "soft_prompt_embed", "PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING"):
        assert op in res.stdout
