"""``nbl bench``: generation latency of original vs NBL-k vs DROP-k, or (--calibration) calibration cost."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nbl_ext.cli.common import choice_list, int_list, positive, write_report

EPILOG = """\
what it does:
  1. builds the model: MODEL (real weights, anything `nbl compress` accepts; default the bundled
     SmolLM2-135M) or --shape (random weights of a real model's shape, made on the device, no
     download; speed does not depend on weight values)
  2. times greedy generation of the original, then NBL-k and DROP-k for each K (the last K
     attention blocks replaced by random affine maps / removed: no calibration, so only the speed
     means anything), each in every --mode:
       eager   model.generate with the dynamic cache; decode steps timed inside generate
       static  StaticCache + torch.compile'd decode step (CUDA graphs on CUDA), gpt-fast style
     prefill (the prompt's forward) and decode (median per-token step) apart, CUDA events on GPU
  3. prints a table with the ratios to the original, the KV cache and peak memory, and the ideal
     decode speedup from bytes per step (weights + KV read; see nbl_ext.benchmark.floors), and
     writes everything to --output (JSON with the device, versions and git commit)

calibration cost (--calibration; the generation options --k/--methods/--mode/... are not used):
  1. builds the model as above; random token ids of SAMPLES x SEQ_LEN (cost does not depend on them)
  2. for each count in --samples and each of --calib-methods, calibrates every layer:
       streaming  nbl_ext.calibrate as users run it: float64 statistics streamed layer by layer,
                  memory flat in the token count
       store_all  the reference code's approach on the same layer-by-layer forward: every layer's
                  X and A for all tokens kept on the host, then float64 torch.cov and the same fit
                  (refused with the estimate when it would not fit in host memory)
  3. prints time (forward / statistics / fit), tokens/s, peak host RSS growth, peak GPU memory and
     the floor (forward FLOPs / same-run matmul rate + Gram FLOPs / float32 rate; see
     nbl_ext.benchmark.calibration_cost), and writes everything to --output

examples:
  nbl bench --shape llama-3.1-8b --k 4,8,12 --mode eager,static --output bench-8b.json   # on a GPU
  nbl bench --shape mistral-7b --batch 16 --prompt-len 8192 --new-tokens 128 --prefill-chunk 2048
  nbl bench --prompt-len 256 --new-tokens 32 --k 6,12 --mode eager   # SmolLM2-135M, CPU-sized
  nbl bench --k 6,12 --mode eager --interleave --repeats 5          # a shared CPU: variants timed round by round
  nbl bench my/hf-model-dir --k 7 --methods drop --device cpu       # original weights of a local model
  nbl bench --calibration --shape llama-3.1-8b --samples 32,256 --output calib-8b.json   # on a GPU
  nbl bench --calibration --samples 4,16 --seq-len 512               # SmolLM2-135M on the CPU
"""


def add_parser(sub) -> None:
    """The ``bench`` subcommand and its options."""

    b = sub.add_parser(
        "bench",
        help="generation latency: original vs NBL-k vs DROP-k; --calibration: calibration cost",
        description="Time prefill and decode of MODEL (or a random-weight --shape), original vs "
        "NBL-k and DROP-k, and report ratios, memory and floors. With --calibration: time and "
        "peak memory of calibrating every layer, streaming vs store-all, against the floor.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument(
        "model",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="real weights, as for `nbl compress` (default: the bundled SmolLM2-135M unless --shape)",
    )
    from nbl_ext.benchmark import SHAPES

    b.add_argument("--shape", choices=list(SHAPES), default=None, help="random weights of this shape instead of MODEL")
    b.add_argument(
        "--num-layers",
        type=positive(int),
        default=None,
        metavar="N",
        help="with --shape: only the first N layers (quick runs)",
    )
    b.add_argument(
        "--k",
        type=int_list,
        default=[4, 8, 12],
        metavar="K1,K2",
        help="numbers of attention blocks to replace (default: 4,8,12)",
    )
    b.add_argument(
        "--methods",
        type=choice_list(("nbl", "drop")),
        default=["nbl", "drop"],
        metavar="M1,M2",
        help="nbl and/or drop (default: nbl,drop)",
    )
    b.add_argument(
        "--mode",
        type=choice_list(("eager", "static")),
        default=["eager", "static"],
        metavar="M1,M2",
        help="eager (HF generate) and/or static (StaticCache + torch.compile) (default: eager,static)",
    )
    b.add_argument("--batch", type=positive(int), default=1, metavar="B", help="sequences (default 1)")
    b.add_argument("--prompt-len", type=positive(int), default=2048, metavar="L", help="prompt tokens (default 2048)")
    b.add_argument(
        "--new-tokens",
        type=positive(int),
        default=2048,
        metavar="N",
        help="generated tokens, at least 2 (default 2048)",
    )
    b.add_argument("--warmup", type=int, default=1, metavar="W", help="untimed warm-up runs (default 1)")
    b.add_argument("--repeats", type=positive(int), default=3, metavar="R", help="timed runs (default 3)")
    b.add_argument(
        "--interleave",
        action="store_true",
        help="eager mode: build every variant first, then time them round by round (R rounds of one "
        "run each), so drift on a shared machine hits all variants alike; holds all the models "
        "at once (small models, CPU)",
    )
    b.add_argument(
        "--prefill-chunk",
        type=positive(int),
        default=None,
        metavar="C",
        help="prefill in chunks of C tokens (long contexts at large batch)",
    )
    b.add_argument("--no-compile", action="store_true", help="static mode without torch.compile")
    b.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available, else cpu)")
    b.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="model dtype (default: float32 on CPU, bfloat16 on CUDA)",
    )
    b.add_argument(
        "--no-ceilings",
        action="store_true",
        help="skip measuring bandwidth and matmul rate (then no floors in seconds)",
    )
    b.add_argument("--seed", type=int, default=0, help="prompt and random-map seed (default 0)")
    b.add_argument("--output", default=None, metavar="FILE.json", help="write the full result here")
    c = b.add_argument_group("calibration cost (--calibration)")
    c.add_argument(
        "--calibration",
        action="store_true",
        help="measure the cost of calibrating every layer instead of generation latency",
    )
    c.add_argument(
        "--samples",
        type=int_list,
        default=[256],
        metavar="S1,S2",
        help="calibration sample counts to measure (default: 256, the paper's)",
    )
    c.add_argument(
        "--seq-len", type=positive(int), default=2048, metavar="L", help="tokens per calibration sample (default 2048)"
    )
    c.add_argument(
        "--calib-methods",
        type=choice_list(("streaming", "store_all")),
        default=["streaming", "store_all"],
        metavar="M1,M2",
        help="streaming and/or store_all (default: streaming,store_all)",
    )
    c.add_argument(
        "--calib-batch-size",
        type=positive(int),
        default=1,
        metavar="B",
        help="samples per forward during calibration (default 1)",
    )
    c.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    import torch

    from nbl_ext import benchmark
    from nbl_ext.models import DEFAULT_MODEL, load_model

    if args.model is not None and args.shape is not None:
        raise ValueError(f"give MODEL ({args.model}) or --shape ({args.shape}), not both")
    if args.num_layers is not None and args.shape is None:
        raise ValueError("--num-layers applies to --shape (random weights) only")
    if args.output and Path(args.output).is_dir():
        raise IsADirectoryError(f"--output {args.output} is a directory; give a file name such as bench.json")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
    if args.calibration:
        return _bench_calibration(args, device)
    if args.new_tokens < 2:
        raise ValueError(
            f"--new-tokens must be at least 2 (one prefill token and one decode step), got {args.new_tokens}"
        )
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if args.shape is not None:  # the layer count is known before anything is built
        n_layers = args.num_layers or benchmark.SHAPES[args.shape]["num_hidden_layers"]
        too_big = [k for k in args.k if k > n_layers]
        if too_big:
            raise ValueError(f"--k {','.join(map(str, too_big))}: larger than the {n_layers} layers of {args.shape}")
        what = f"random {args.shape}" + (f" ({n_layers} layers)" if args.num_layers else "")

        def factory():
            return benchmark.random_model(
                args.shape, dtype=args.dtype, device=device, num_layers=args.num_layers, seed=args.seed
            )
    else:
        what = str(args.model or DEFAULT_MODEL)

        def factory():
            return load_model(args.model, dtype=args.dtype, device=device, progress=False)[0]

    pairs = [(m, k) for k in args.k for m in args.methods]
    info = benchmark.run_info(device)
    print(
        f"nbl bench: {what} on {info['device'].get('name', device)}; variants original, "
        f"{', '.join(f'{m}-k{k}' for m, k in pairs)}; modes {','.join(args.mode)}",
        file=sys.stderr,
    )
    ceilings = None
    if not args.no_ceilings:
        ceilings = benchmark.measure_ceilings(device, args.dtype)
    result = benchmark.compare(
        factory,
        pairs,
        modes=args.mode,
        batch=args.batch,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        warmup=args.warmup,
        repeats=args.repeats,
        compile=not args.no_compile,
        prefill_chunk=args.prefill_chunk,
        ceilings=ceilings,
        seed=args.seed,
        log=lambda msg: print(f"nbl bench: {msg}", file=sys.stderr),
        interleave=args.interleave,
    )
    report = {
        "nbl_bench": 1,
        **info,
        "model": {
            "name": what,
            "shape": args.shape,
            "num_layers": result["num_layers"],
            "weights": "random" if args.shape else "real",
            "maps": "random (synthetic_linearize, speed only)",
        },
        "args": {k: v for k, v in vars(args).items() if k != "command"},
        **result,
    }
    print(benchmark.format_bench(report))
    write_report(args.output, report, "bench")
    return 0


def _bench_calibration(args, device: str) -> int:
    from nbl_ext import benchmark
    from nbl_ext.models import DEFAULT_MODEL, load_model

    # MODEL vs --shape, --num-layers, --output and the device are checked by _bench before it comes here
    if args.shape is not None:
        what = f"random {args.shape}" + (f" ({args.num_layers} layers)" if args.num_layers else "")
        model = benchmark.random_model(
            args.shape, dtype=args.dtype, device=device, num_layers=args.num_layers, seed=args.seed
        )
    else:
        what = str(args.model or DEFAULT_MODEL)
        model = load_model(args.model, dtype=args.dtype, device=device, progress=not args.no_progress)[0]
    info = benchmark.run_info(device)
    print(
        f"nbl bench: calibration cost of {what} on {info['device'].get('name', device)}; methods "
        f"{','.join(args.calib_methods)}; samples {','.join(map(str, args.samples))} x {args.seq_len} tokens",
        file=sys.stderr,
    )
    ceilings = None if args.no_ceilings else benchmark.calibration_ceilings(device, next(model.parameters()).dtype)
    result = benchmark.compare_calibration(
        model,
        args.samples,
        seq_len=args.seq_len,
        methods=args.calib_methods,
        batch_size=args.calib_batch_size,
        ceilings=ceilings,
        seed=args.seed,
        progress=not args.no_progress,
        log=lambda msg: print(f"nbl bench: {msg}", file=sys.stderr),
    )
    report = {
        "nbl_bench_calibration": 1,
        **info,
        "model": {"name": what, "shape": args.shape, "weights": "random" if args.shape else "real"},
        "args": {k: v for k, v in vars(args).items() if k != "command"},
        **result,
    }
    print(benchmark.format_bench_calibration(report))
    write_report(args.output, report, "bench")
    return 0
