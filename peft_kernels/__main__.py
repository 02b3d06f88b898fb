"""Command line: ``python -m peft_kernels {info,demo,bench,serve}``."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peft_kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, device, and which backends are available (and why not)")
    p_info.add_argument("--json", action="store_true", help="print the raw dict as JSON")
    p_demo = sub.add_parser("demo", help="run every op on a small batch against today's baselines")
    p_demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p_demo.add_argument("--seed", type=int, default=0)
    p_bench = sub.add_parser("bench", help="time every op against today's baselines (JSON + markdown + PNG)")
    from .bench.cli import add_arguments as _bench_arguments

    _bench_arguments(p_bench)
    p_serve = sub.add_parser("serve", help="an OpenAI-compatible server: continuous batching over adapters of every kind")
    from .serve.cli import add_arguments as _serve_arguments

    _serve_arguments(p_serve)
    args = parser.parse_args(argv)

    if args.command == "info":
        from ._info import format_info, info

        from .ops._dispatch import BackendUnavailableError

        try:
            data = info()
        except BackendUnavailableError as exc:
            print(f"peft_kernels info: {exc}", file=sys.stderr)
            return 2
        print(json.dumps(data, indent=2, default=str) if args.json else format_info(data))
        return 0
    if args.command == "bench":
        from .bench.cli import run as run_bench

        raw = sys.argv[1:] if argv is None else list(argv)
        return run_bench(args, raw[raw.index("bench") + 1:] if "bench" in raw else raw)
    if args.command == "serve":
        from .serve.cli import run as run_serve

        return run_serve(args)
    from .demo import run_demo

    return run_demo(device=args.device, seed=args.seed)


if __name__ == "__main__":
    sys.exit(main())
