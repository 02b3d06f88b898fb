"""Layers point one way: ops <- attention glue <- methods <- integrations <- models / api / CLI.

Every import in the package (module level or inside a function) is resolved to the top-level part
of ``peft_kernels`` it names; a part may import only parts of its own tier or lower.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "peft_kernels"
TIERS = [
    {"_ext", "reference", "ops", "triton"},  # kernels and the ops over them
    {"attention", "cache_utils", "packing"},  # transformers glue the methods run on
    {"methods"},  # PEFT methods: know models, never kernels directly
    {"integrations"},  # peft: patch() and adapter directories
    {"adapters", "multi_adapter", "api", "mixed_training", "demo", "bench", "_info", "__main__", "__init__",
     "distributed", "serve"},  # distributed: TP, DDP / FSDP2 and comm counters over the model layer; serve: HTTP
]
TIER = {part: i for i, parts in enumerate(TIERS) for part in parts}


def _part(module: Path) -> str:
    rel = module.relative_to(PACKAGE).with_suffix("")
    return rel.parts[0]


def _imports(module: Path):
    """(line, imported top-level part of peft_kernels) for every import in ``module``."""
    yield from _imports_of(module.read_text(), list(module.relative_to(PACKAGE).parent.parts))


def _imports_of(source: str, package: list):
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = [*base, *(node.module.split(".") if node.module else [])]
                if not target:  # "from . import x" at the top of the package
                    for alias in node.names:
                        yield node.lineno, alias.name
                    continue
                yield node.lineno, target[0]
            elif node.module and node.module.split(".")[0] == "peft_kernels":
                parts = node.module.split(".")
                yield node.lineno, parts[1] if len(parts) > 1 else "__init__"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "peft_kernels":
                    yield node.lineno, parts[1] if len(parts) > 1 else "__init__"


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_part_of_the_package_has_a_tier():
    parts = {_part(m) for m in MODULES}
    assert parts <= set(TIER), f"give these a tier in tests/test_layers.py: {sorted(parts - set(TIER))}"


@pytest.mark.parametrize("module", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_lower_layer_imports_a_higher_one(module):
    source = _part(module)
    bad = [(line, target) for line, target in _imports(module)
           if target in TIER and TIER[target] > TIER[source]]
    assert not bad, (f"{module.relative_to(PACKAGE)} (tier {TIER[source]}: {source}) imports higher layers: "
                     + ", ".join(f"line {line}: {t} (tier {TIER[t]})" for line, t in bad))


def test_the_check_catches_an_upward_import():
    """The resolver sees relative, package-relative and absolute imports, so the test above can fail."""
    source = "from ..integrations import peft\nimport peft_kernels.api\nfrom .. import multi_adapter\n"
    assert {t for _, t in _imports_of(source, ["methods"])} == {"integrations", "api", "multi_adapter"}
    assert {t for _, t in _imports_of("from .lora import x\n", ["methods"])} == {"methods"}
