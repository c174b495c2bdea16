"""What the ``nbl`` subcommands share: argument types, the per-layer table, report files, model loading."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def int_list(text):
    """'4,8,12' -> [4, 8, 12] (positive ints)."""
    values = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated positive integers such as 4,8,12, got {text!r}"
            ) from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"values must be > 0, got {value} in {text!r}")
        values.append(value)
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"repeated value in {text!r}")
    return values


def choice_list(choices):
    def parse(text):
        values = [v.strip().lower() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"choose from {','.join(choices)} (comma-separated), got {text!r}")
        return list(dict.fromkeys(values))

    return parse


def positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def non_negative(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


#: An NMSE at or below this is an in-sample interpolation, not a measure of how linear the block is.
_EXACT_NMSE = 1e-6


def print_table(rows: list[dict], chosen: set[int], method: str | None, criterion: str | None = None, out=None) -> None:
    """The per-layer table: bound, nmse (cv_nmse and ridge with folds), cosine, and the score of
    ``criterion`` (the one that chose the layers) when it is not among those columns."""
    out = out or sys.stdout
    # Calibrated with folds: the cross-validated (held-out) NMSE and the chosen ridge beside the in-sample NMSE.
    folds = any("cv_nmse" in r for r in rows)
    head = f"  {'cv_nmse':>10}  {'ridge':>8}" if folds else ""
    extra = criterion if criterion and criterion not in ("bound", "cca_bound", "nmse", "cv_nmse", "cosine") else None
    if extra and not all(extra in r for r in rows):
        extra = None
    head_extra = f"  {extra:>14}" if extra else ""
    print(f"{'layer':>5}  {'bound':>10}  {'nmse':>10}{head}  {'cosine':>8}{head_extra}  chosen", file=out)
    exact = 0
    for r in rows:
        mark = f"<- {method}" if r["layer"] in chosen else ""
        star = "*" if r["nmse"] <= _EXACT_NMSE else " "
        exact += star == "*"
        cells = ""
        if folds:
            cv, ridge = r.get("cv_nmse"), r.get("ridge")
            cells = (f" {cv:>10.4g}" if cv is not None else f" {'-':>10}") + (
                f"  {ridge:>8.2g} " if ridge is not None else f"  {'-':>8} "
            )
        cell_extra = f"  {r[extra]:>14.4g}" if extra else ""
        print(
            f"{r['layer']:>5}  {r['bound']:>10.4f}  {r['nmse']:>10.4f}{star}{cells} {r['cosine']:>8.4f}"
            f"{cell_extra}  {mark}",
            file=out,
        )
    if exact:
        print(
            f"* in-sample exact fit ({exact} of {len(rows)} layers): the affine map reproduces the calibration "
            "tokens (fewer tokens than the fit has dimensions), so this NMSE says nothing about new text; "
            "calibrate on more tokens (--samples, --seq-len)",
            file=out,
        )


def write_report(output: str | None, report: dict, command: str) -> None:
    """Write ``report`` as JSON to ``output`` (atomically, parents created), if given."""
    if not output:
        return
    from nbl_ext._io import atomic_write_json

    Path(output).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(output), report)
    print(f"\nnbl {command}: wrote {output}")


def load_for_eval(model_arg, dtype, device, progress):
    import nbl_ext
    from nbl_ext.models import DEFAULT_MODEL, load_model

    path = Path(model_arg) if model_arg else None
    from nbl_ext.serialization import CONFIG

    if (
        path is not None
        and path.is_dir()
        and (path / CONFIG).is_file()
        and "nbl" in json.loads((path / CONFIG).read_text())
    ):
        from transformers import AutoTokenizer

        from nbl_ext.validation import parse_dtype

        kwargs = {} if dtype in (None, "auto") else {"dtype": parse_dtype(dtype, what="nbl eval")}
        model = nbl_ext.load_pretrained(path, device=device, **kwargs).eval()
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise FileNotFoundError(
                f"{path} has no tokenizer files ({exc}); save it with nbl_ext.save_pretrained(model, path, tokenizer)"
            ) from None
        return model, tokenizer, str(path)
    model, tokenizer = load_model(model_arg, dtype=dtype, device=device, progress=progress)
    return model, tokenizer, str(model_arg or DEFAULT_MODEL)
