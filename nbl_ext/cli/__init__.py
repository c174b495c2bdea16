"""The ``nbl`` command: compress a Hugging Face causal LM with NBL, and report on it.

nbl compress                      # bundled SmolLM2-135M, self-generated calibration text
nbl compress MODEL --layers 8 --method nbl --calib ../shared/data/calib/c4_demo.json --out out/
nbl report out/                   # per-layer table + plot (bound, NMSE, cosine; chosen layers)
nbl eval out/ --data-dir ../shared/data/eval --limit 100   # lm-eval accuracy + perplexity
nbl bench --shape llama-3.1-8b --k 4,8,12 --mode eager,static   # generation latency (GPU)
nbl bench --calibration --shape llama-3.1-8b --samples 32,256   # calibration cost (GPU)
nbl heal out/ --calib ../shared/data/calib/c4_demo.json --out healed/   # LoRA healing of a compressed model
"""

from __future__ import annotations

import argparse
import sys

from nbl_ext import preflight
from nbl_ext.cli import bench, compress, evaluate, heal, report
from nbl_ext.cli.common import print_table as _print_table
from nbl_ext.cli.report import plot_layers

__all__ = ["_print_table", "build_parser", "main", "plot_layers"]

# What main() runs for each subcommand, looked up here at call time (so a test can replace one).
_compress, _eval, _bench, _heal, _report = compress.run, evaluate.run, bench.run, heal.run, report.run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbl",
        description="Neural Block Linearization: make a Hugging Face causal LM faster by replacing "
        "its most linear attention blocks with fitted affine maps.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in (compress, evaluate, bench, heal, report):  # the order of `nbl --help`
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "compress":
            return _compress(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "bench":
            return _bench(args)
        if args.command == "heal":
            return _heal(args)
        return _report(args)
    except (
        ValueError,
        TypeError,
        FileNotFoundError,
        FileExistsError,
        IsADirectoryError,
        RuntimeError,
        ImportError,
    ) as exc:
        print(f"nbl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: every write is atomic (temp + rename), so nothing half-written remains
        print(f"\nnbl {args.command}: interrupted; {preflight.nothing_written(args)}", file=sys.stderr)
        return 130
