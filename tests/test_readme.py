"""The README's two commands come first, and CI runs exactly the test one."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text):
    blocks, inside = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            inside = line.strip() == "```bash"
            continue
        if inside and line.strip():
            blocks.append(line.strip())
    return blocks


def test_readme_starts_with_demo_and_test_commands_and_ci_runs_the_test_one():
    commands = _bash_blocks((ROOT / "README.md").read_text())
    demo, tests = commands[0], commands[1]
    assert demo.endswith("python -m peft_kernels demo")
    assert "pip install" in tests and tests.endswith("python -m pytest")
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert tests in ci_lines
