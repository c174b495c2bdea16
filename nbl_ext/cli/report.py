"""``nbl report``: the per-layer table and plot of a compressed model or a calibration directory."""

from __future__ import annotations

import json
from pathlib import Path

from nbl_ext.cli.common import print_table


def add_parser(sub) -> None:
    """The ``report`` subcommand and its options."""

    r = sub.add_parser(
        "report",
        help="per-layer table and plot of a compressed model or calibration",
        description="Print the per-layer table of DIR (written by nbl compress) and save a PNG plot.",
    )
    r.add_argument("dir", metavar="DIR")
    r.add_argument("--plot", default=None, metavar="PNG", help="where to write the plot (default: DIR/layers.png)")


def _load_report(path: Path) -> tuple[list[dict], set[int], str | None, str | None]:
    """Per-layer rows, the chosen layers, the method and the criterion that chose them, from a checkpoint
    (save_pretrained) or calibration directory."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory; pass the --out directory of `nbl compress`")
    from nbl_ext.result import CALIBRATION_JSON
    from nbl_ext.serialization import CONFIG, SUMMARY

    summary_file = next(
        (path / n for n in (SUMMARY, CALIBRATION_JSON, f"calibration/{CALIBRATION_JSON}") if (path / n).is_file()), None
    )
    if summary_file is None:
        raise FileNotFoundError(
            f"{path} holds no calibration summary (nbl_calibration.json or calibration.json); "
            "is it the output of `nbl compress` or nbl_ext.calibrate(..., output_dir=...)?"
        )
    summary = json.loads(summary_file.read_text())
    rows = summary.get("layers") if isinstance(summary, dict) else None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{summary_file} has no per-layer scores")
    chosen, method, criterion = set(), None, None
    config = path / CONFIG
    if config.is_file():
        nbl = json.loads(config.read_text()).get("nbl") or {}
        chosen, method = set(nbl.get("layers", [])), nbl.get("method")
        criterion = (nbl.get("config") or {}).get("criterion")
    return rows, chosen, method, criterion


def plot_layers(
    rows: list[dict], chosen: set[int], method: str | None, png: Path, criterion: str | None = None
) -> Path:
    """Bound, NMSE, cosine (and the choosing criterion's score) per layer, chosen layers marked; to ``png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = [r["layer"] for r in rows]
    series = [
        ("bound", "NBL bound  sum(1 - rho^2)  (lower = more linear)"),
        ("nmse", "NMSE of the affine fit  (lower = better)"),
        ("cosine", "cos(X, X + A)  (DROP score; higher = drop first)"),
    ]
    if criterion and criterion not in ("cca_bound", "nmse", "cosine") and all(criterion in r for r in rows):
        series.append((criterion, f"{criterion}  (the criterion that chose the layers)"))
    fig, axes = plt.subplots(len(series), 1, figsize=(max(6, 0.3 * len(idx) + 3), 2.5 * len(series)), sharex=True)
    for ax, (key, label) in zip(axes, series):
        vals = [r[key] for r in rows]
        colors = ["tab:red" if i in chosen else "tab:blue" for i in idx]
        ax.bar(idx, vals, color=colors)
        ax.set_ylabel(key)
        ax.set_title(label, fontsize=9, loc="left")
        if key == "nmse" and min(vals) > 0:
            ax.set_yscale("log")
        if key == "cosine":  # cosines sit near 1 (DROP's 0.98 vs 0.995): span the data, not 0..1
            lo, hi = min(vals), max(vals)
            pad = max(0.1 * (hi - lo), 1e-4)
            ax.set_ylim(lo - pad, min(1.0, hi + pad) if hi < 1.0 else hi + pad)
    axes[-1].set_xlabel("decoder layer")
    title = "per-layer scores" + (f"; red = linearized by {method} ({len(chosen)} layers)" if chosen else "")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def run(args) -> int:
    path = Path(args.dir)
    rows, chosen, method, criterion = _load_report(path)
    print_table(rows, chosen, method, criterion)
    png = plot_layers(rows, chosen, method, Path(args.plot) if args.plot else path / "layers.png", criterion)
    print(f"\nplot: {png}")
    return 0
