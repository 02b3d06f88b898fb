"""The benchmark suite behind ``python -m peft_kernels bench`` (see bench/README.md).

Layout: ``baselines/`` (today's ways of computing each op, one small module each), ``suites/``
(shapes and inputs per ``--op``), ``harness`` (check each baseline against ours, then time
everything in one process), ``timing`` (CUDA events / torch.utils.benchmark), ``costs`` (the
bytes and FLOPs models), ``device`` (peaks per GPU, environment), ``report`` (JSON, markdown,
PNG), ``cli``. Importing this package imports nothing heavy.
"""


def main(argv=None) -> int:
    from .cli import main as _main

    return _main(argv)
