"""``nbl eval``: lm-eval accuracy and perplexity of a (compressed) model."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from nbl_ext import preflight
from nbl_ext.cli.common import load_for_eval, positive, write_report

EPILOG = """\
what it does:
  1. loads MODEL: a directory written by `nbl compress` (or nbl_ext.save_pretrained), or anything
     `nbl compress` accepts (alias, .gguf, HF directory, hub id); default: the bundled SmolLM2
  2. perplexity (--ppl): WikiText-2 test (from --data-dir) and the C4 documents held out from
     calibration (--c4; the same fixed 20% that `nbl compress` leaves out of a calibration file),
     in windows of --context tokens moved by --stride, float64 log-likelihoods
  3. accuracy (--tasks): stock lm-evaluation-harness on the in-memory model (its HFLM wrapper).
     With --data-dir, the tasks read local files (the ../shared/data/eval layout) through lm-eval's
     own task definitions: same prompts, metrics and preprocessing; where the local copy differs from
     the hub data the output says so. Without --data-dir, the hub tasks (network needed).
  4. prints a table and writes every metric with its standard error, the number of examples, the
     model/compression summary and the versions to --output (JSON)

tasks with offline definitions: arc_easy arc_challenge boolq hellaswag openbookqa piqa winogrande
  lambada_openai wikitext (lm-eval's rolling word perplexity over whole articles: slow on CPU)

examples:
  nbl eval nbl-out/smollm2-135m-nbl-k7 --data-dir ../shared/data/eval --limit 100 --output eval.json
  nbl eval smollm2-135m --data-dir ../shared/data/eval --tasks arc_easy,piqa --ppl none
  nbl eval out/ --data-dir ../shared/data/eval --tasks none --ppl wikitext2,c4 --context 2048 --stride 512
  nbl eval my/model --tasks arc_easy,hellaswag --device cuda --batch-size 32     # hub tasks, online
"""


#: `nbl eval --quick`: documents per task and perplexity windows, and the window length.
_QUICK_LIMIT = 10
_QUICK_CONTEXT = 512


def add_parser(sub) -> None:
    """The ``eval`` subcommand and its options."""

    e = sub.add_parser(
        "eval",
        help="lm-eval accuracy and perplexity of a (compressed) model",
        description="Evaluate MODEL: zero-shot accuracy with lm-evaluation-harness and perplexity.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument(
        "model",
        nargs="?",
        default=None,
        metavar="MODEL_OR_DIR",
        help="an `nbl compress` output directory, or a model as for `nbl compress` (default: bundled SmolLM2)",
    )
    e.add_argument(
        "--tasks",
        default=",".join(_default_tasks()),
        metavar="T1,T2,..",
        help="lm-eval tasks, comma-separated, or 'none' (default: %(default)s)",
    )
    e.add_argument(
        "--limit",
        type=positive(int),
        default=None,
        metavar="N",
        help="first N documents of each task and the first N perplexity windows of each corpus "
        "(default: all; standard errors are reported either way)",
    )
    e.add_argument(
        "--quick",
        action="store_true",
        help=f"a first look in about a minute on a CPU: --limit {_QUICK_LIMIT} and --context "
        f"{_QUICK_CONTEXT} unless given (numbers with wide standard errors, not the paper's setting)",
    )
    e.add_argument(
        "--data-dir",
        default=None,
        metavar="DIR",
        help="offline task data in the ../shared/data/eval layout (default: hub tasks, online)",
    )
    e.add_argument(
        "--ppl",
        default=None,
        metavar="C1,C2",
        help="perplexity corpora: wikitext2, c4, or none (default: wikitext2 with --data-dir, plus c4 "
        "when a C4 file is found)",
    )
    e.add_argument(
        "--c4",
        default=None,
        metavar="PATH",
        help="the C4 document file whose held-out part is scored (default: DIR/../calib/c4_demo.json)",
    )
    e.add_argument("--context", type=positive(int), default=None, metavar="L", help="perplexity window (default 2048)")
    e.add_argument(
        "--stride",
        type=positive(int),
        default=None,
        metavar="S",
        help="perplexity window step (default: the window, i.e. non-overlapping)",
    )
    e.add_argument(
        "--ppl-tokens",
        type=positive(int),
        default=None,
        metavar="N",
        help="score only the first N tokens of each corpus (default: all)",
    )
    e.add_argument("--batch-size", type=positive(int), default=8, metavar="B", help="lm-eval batch size (default 8)")
    e.add_argument(
        "--max-length",
        type=positive(int),
        default=None,
        metavar="L",
        help="longest sequence lm-eval feeds the model (default: the model's maximum)",
    )
    e.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available, else cpu)")
    e.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16", "auto"],
        help="model dtype (default: float32 on CPU, bfloat16 on CUDA)",
    )
    e.add_argument("--seed", type=int, default=0, help="lm-eval seeds (default 0)")
    e.add_argument("--output", default=None, metavar="FILE.json", help="write the full report here")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.add_argument(
        "--verbose",
        action="store_true",
        help="show lm-eval's own log messages (otherwise kept in FILE.log next to --output, or counted)",
    )


def _default_tasks() -> tuple[str, ...]:
    from nbl_ext.tasks import DEFAULT_TASKS

    return DEFAULT_TASKS


def run(args) -> int:
    import torch

    from nbl_ext.evaluate import PERPLEXITY_CORPORA, evaluate, format_report
    from nbl_ext.tasks import OFFLINE_TASKS, check_data_dir

    progress = not args.no_progress
    if args.quick:
        args.limit = args.limit or _QUICK_LIMIT
        args.context = args.context or _QUICK_CONTEXT
    args.context = args.context or 2048
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tasks = [] if args.tasks.strip().lower() == "none" else [t.strip() for t in args.tasks.split(",") if t.strip()]
    c4 = (
        Path(args.c4) if args.c4 else (Path(args.data_dir) / ".." / "calib" / "c4_demo.json" if args.data_dir else None)
    )
    if args.ppl is None:
        ppl = (["wikitext2"] if args.data_dir else []) + (["c4"] if c4 is not None and c4.is_file() else [])
    else:
        ppl = [] if args.ppl.strip().lower() == "none" else [c.strip() for c in args.ppl.split(",") if c.strip()]
        bad = [c for c in ppl if c not in PERPLEXITY_CORPORA]
        if bad:
            raise ValueError(
                f"--ppl: unknown corpus {', '.join(bad)}; choose from {', '.join(PERPLEXITY_CORPORA)} or none"
            )
    if not tasks and not ppl:
        raise ValueError("nothing to evaluate: give --tasks and/or --ppl (with --data-dir for the offline data)")
    if args.data_dir is not None:  # a wrong path or task fails here, before the model loads
        unknown = [t for t in tasks if t not in OFFLINE_TASKS]
        if unknown:
            raise ValueError(
                f"no offline definition for {', '.join(unknown)}; offline tasks: {', '.join(OFFLINE_TASKS)}"
            )
        check_data_dir(args.data_dir, tasks)
    if "wikitext2" in ppl and args.data_dir is None:
        raise ValueError(
            "WikiText-2 perplexity reads wikitext2/wiki.test.raw: pass --data-dir (the ../shared/data/eval layout)"
        )
    if "c4" in ppl and (c4 is None or not c4.is_file()):
        raise FileNotFoundError(
            f"C4 perplexity needs the C4 document file{f' ({c4} not found)' if c4 else ''}: "
            "pass --c4 PATH (e.g. ../shared/data/calib/c4_demo.json)"
        )
    if args.output and Path(args.output).is_dir():
        raise IsADirectoryError(f"--output {args.output} is a directory; give a file name such as eval.json")

    model, tokenizer, source = load_for_eval(args.model, args.dtype, device, progress)
    notes = _overlap_notes(source, c4) if "c4" in ppl else []
    for note in notes:
        print(f"nbl eval: warning: {note}", file=sys.stderr)
    print(f"nbl eval: {source}: tasks {tasks or 'none'}, perplexity {ppl or 'none'}", file=sys.stderr)
    t0 = time.perf_counter()
    ppl_tokens = args.ppl_tokens
    if ppl_tokens is None and args.limit is not None:  # --limit N: N perplexity windows
        ppl_tokens = args.context + (args.limit - 1) * (args.stride or args.context)
    log_file = Path(args.output).with_suffix(".log") if args.output else None
    with preflight.lm_eval_notices(args.verbose, log_file):
        report = evaluate(
            model,
            tokenizer,
            tasks=tasks,
            data_dir=args.data_dir,
            perplexity_on=ppl,
            c4_path=c4,
            context=args.context,
            stride=args.stride,
            ppl_tokens=ppl_tokens,
            limit=args.limit,
            batch_size=args.batch_size,
            max_length=args.max_length,
            seed=args.seed,
            progress=progress,
        )
    report["seconds"] = round(time.perf_counter() - t0, 2)
    report["model"]["path"] = source
    report["notes"] = notes
    print(format_report(report))
    write_report(args.output, report, "eval")
    return 0


def _overlap_notes(source: str, c4: Path | None) -> list[str]:
    """Warn when the held-out C4 documents may have been calibrated on (nbl compress --holdout 0)."""
    from nbl_ext.data import HOLDOUT_FRACTION
    from nbl_ext.serialization import RUN

    run_file = Path(source) / RUN
    if c4 is None or not run_file.is_file():
        return []
    run = json.loads(run_file.read_text())
    calib = Path(str(run.get("calib", "")))
    if calib.is_file() and c4.is_file() and calib.resolve() == c4.resolve() and run.get("holdout") != HOLDOUT_FRACTION:
        return [
            f"{source} was calibrated on {calib} with holdout {run.get('holdout')}; the C4 perplexity documents "
            "were (partly) seen in calibration"
        ]
    return []
