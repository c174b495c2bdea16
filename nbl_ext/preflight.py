"""Checks and messages of the ``nbl`` command that run before (or around) the heavy work.

`nbl compress` checks every argument and path before the model loads (:func:`preflight_compress`:
layer counts, sequence length against the model's positions, the output directory, the calibration
file), says once up front when the calibration has too few tokens, and turns the per-layer
SingularWarnings into one line (:func:`singular_summary`). `nbl eval` keeps lm-eval's own log
records out of the way (:func:`lm_eval_notices`). An interrupted command says what it left behind
(:func:`nothing_written`). The CLI (``nbl_ext.cli``) is the only user; nothing here loads weights.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path

__all__ = [
    "calibration_source",
    "check_layers",
    "check_out",
    "default_out",
    "lm_eval_notices",
    "nothing_written",
    "preflight_compress",
    "singular_summary",
    "warn_few_tokens",
]


def default_out(model: str | None, method: str, k: int) -> Path:
    """``nbl-out/<model>-<method>-k<K>``: where `nbl compress` writes without --out."""
    from nbl_ext.models import DEFAULT_MODEL

    name = Path(str(model or DEFAULT_MODEL)).name.lower()
    slug = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in name).strip("-.") or "model"
    return Path("nbl-out") / f"{slug}-{method}-k{k}"


def nothing_written(args) -> str:
    """What an interrupted subcommand leaves behind: nothing at the path the user asked for (and, for
    `nbl heal`, the resume state: the same command continues from it)."""
    if args.command == "heal":
        out = Path(args.dir if args.in_place else (args.out or args.dir))
        state = args.state_dir or out.with_name(out.name + ".heal-state")
        return (
            f"nothing was written to {out}; resume with the same command (it continues from the last state "
            f"saved in {state})"
        )
    target = {"compress": "out", "eval": "output", "bench": "output", "report": "plot"}.get(args.command)
    path = getattr(args, target, None) if target else None
    if args.command == "report" and path is None:
        path = str(Path(args.dir) / "layers.png")
    return f"nothing was written to {path}" if path else "nothing was written"


def preflight_compress(args) -> dict:
    """Every check of `nbl compress` that needs no weights, run before the model loads.

    The model's config (read cheaply, nbl_ext.models.peek_config) gives the layer count, positions and
    hidden size; the output path must be creatable; a calibration file must be readable, hold enough
    documents for the held-out part and enough tokens for SAMPLES x SEQ_LEN (counted with the model's
    tokenizer when it is on disk). Returns {"calibration": (source, holdout), "hidden_size": int | None}.
    """
    from nbl_ext.api import default_k
    from nbl_ext.models import DEFAULT_MODEL, peek_config

    name = args.model or DEFAULT_MODEL
    if args.layers is not None and args.layers <= 0:
        check_layers(args.layers, None, args.allow_no_op)
    peek = peek_config(args.model) or {}
    if peek.get("nbl"):
        raise ValueError(
            f"{name} is already linearized by nbl ({peek['nbl'].get('method')} on layers "
            f"{peek['nbl'].get('layers')}); compress the original model, or use this one with "
            f"`nbl eval {name}` / nbl_ext.load_pretrained({str(name)!r})"
        )
    n_layers, positions, hidden = (
        peek.get(key) for key in ("num_hidden_layers", "max_position_embeddings", "hidden_size")
    )
    if n_layers is not None:
        k = args.layers if args.layers is not None else default_k(n_layers)
        check_layers(k, n_layers, args.allow_no_op)
        if args.out is None:
            args.out = str(default_out(args.model, args.method, k))
    if positions is not None and args.seq_len > positions:
        raise ValueError(
            f"--seq-len {args.seq_len} is longer than the {positions} positions {name} handles "
            f"(max_position_embeddings); use --seq-len {positions} or less"
        )
    if args.out is not None:
        check_out(Path(args.out), args.out, args.overwrite)
    source, holdout = calibration_source(args)
    if args.calib != "self" and not str(args.calib).startswith("hf:") and peek.get("path"):
        _check_calibration_size(source, holdout, args, peek["path"])
    if hidden is not None:
        warn_few_tokens(args.samples * args.seq_len, hidden)
    return {"calibration": (source, holdout), "hidden_size": hidden}


def check_layers(k: int, n_layers: int | None, allow_no_op: bool) -> None:
    if k < 0 or (n_layers is not None and k > n_layers):
        raise ValueError(
            f"--layers must be between 0 and the model's {n_layers} layers, got {k}"
            if n_layers
            else f"--layers must be >= 0, got {k}"
        )
    if k == 0 and not allow_no_op:
        raise ValueError(
            "--layers 0 replaces no attention block: the output would be an unchanged copy of the model "
            "after a full calibration. Give --layers K >= 1 (default: a quarter of the layers), or add "
            "--allow-no-op if that copy is what you want (e.g. a baseline for nbl eval)"
        )


def check_out(out: Path, given: str, overwrite: bool) -> None:
    """OUT must be a new (or, with --overwrite, an existing) directory whose parent can be written."""
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise FileExistsError(f"--out {given} exists and is not a directory; choose another --out")
        if not overwrite:
            raise FileExistsError(f"{out} exists; choose another --out or pass --overwrite to replace it")
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise FileExistsError(f"--out {given}: {parent} is a file, so the directory cannot be created there")
    try:  # os.access is not enough: root passes it on read-only and virtual file systems (/proc)
        os.rmdir(tempfile.mkdtemp(prefix=".nbl-write-check-", dir=parent))
    except OSError as exc:
        raise ValueError(
            f"--out {given}: cannot create a directory in {parent} ({exc.strerror}); choose a "
            "writable location, e.g. --out ~/nbl-out/run1"
        ) from None


def _samples(args) -> int:
    """The sequences `nbl compress` draws: SAMPLES, plus the selection ones when the criterion needs them."""
    from nbl_ext.config import NBLConfig, needs_selection

    crit = getattr(args, "criterion", None) or ("cosine" if args.method == "drop" else NBLConfig().criterion)
    return args.samples + (getattr(args, "selection_samples", 0) if needs_selection(crit) else 0)


def _check_calibration_size(source, holdout, args, tokenizer_dir: str) -> None:
    """SAMPLES x SEQ_LEN tokens must fit in the calibration file (counted with the model's own tokenizer)."""
    from transformers import AutoTokenizer

    from nbl_ext.data import load_calibration_tokens

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    except (OSError, ValueError):
        return  # the model load reports a broken tokenizer in full; the count then happens there
    try:
        load_calibration_tokens(
            source, tokenizer, num_samples=_samples(args), seq_len=args.seq_len, seed=args.seed, progress=False
        )
    except ValueError as exc:
        kept = f" less the {holdout:.0%} held out" if holdout else ""
        raise ValueError(f"--calib {args.calib}{kept}: {exc}") from None


def warn_few_tokens(tokens: int, hidden: int) -> None:
    """Said once, up front: fewer calibration tokens than hidden dimensions make every fit singular."""
    if tokens > hidden:
        return
    print(
        f"nbl compress: warning: {tokens} calibration tokens for {hidden} hidden dimensions: every layer's "
        f"{hidden} x {hidden} input covariance is singular, so each affine fit reproduces the calibration text "
        f"exactly (in-sample NMSE 0) with a ridge it has to grow, and the ranking of the layers means little. "
        f"Calibrate on more than {hidden} tokens, better {10 * hidden}+ (--samples x --seq-len), or set --ridge "
        "(e.g. 1e-2)",
        file=sys.stderr,
    )


@contextlib.contextmanager
def singular_summary():
    """All layers' SingularWarnings as one SingularWarning (otherwise one per layer, each echoing a source line).

    The summary is a real warning, so ``-W error`` and ``pytest.warns`` still see it; it is issued
    from the pseudo-file "nbl compress" so that Python prints one line without a source line.
    """
    from nbl_ext.numerics import SingularWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SingularWarning)
        yield
    singular = [w for w in caught if issubclass(w.category, SingularWarning)]
    for w in caught:  # anything else goes on as it came
        if not issubclass(w.category, SingularWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if not singular:
        return
    layers = sorted({int(m.group(1)) for w in singular if (m := re.search(r"decoder layer (\d+)", str(w.message)))})
    ridges = [
        float(m.group(1)) for w in singular if (m := re.search(r"ridge of ([0-9.eE+-]+) instead", str(w.message)))
    ]
    where = f"{len(layers)} layers ({', '.join(map(str, layers))})" if layers else f"{len(singular)} fits"
    grown = f"; solved with a relative ridge of up to {max(ridges):g}" if ridges else ""
    message = (
        f"singular input covariance in {where}{grown} (fewer calibration tokens than hidden dimensions, or "
        f"linearly dependent channels). Calibrate on more tokens, or pass --ridge R (e.g. "
        f"{max(ridges, default=1e-4):g}) to set the ridge yourself"
    )
    warnings.warn_explicit(message, SingularWarning, "nbl compress", 0, module="nbl_ext.preflight")


def calibration_source(args):
    """nbl_ext.api.holdout_split for --calib/--holdout, with the file read and its document count checked first.

    The messages name the options: a one-document file under the default holdout is a mistake the
    user fixes with --holdout 0 or more text, not split_documents' "use a larger fraction".
    """
    from nbl_ext.api import holdout_split
    from nbl_ext.data import HOLDOUT_FRACTION, SUFFIXES, read_documents

    if args.holdout is not None and not 0.0 <= args.holdout < 1.0:
        raise ValueError(f"--holdout must be in [0, 1), got {args.holdout}")
    path = Path(args.calib).expanduser()
    if args.calib != "self" and not args.calib.startswith("hf:"):
        if path.is_file():
            docs = read_documents(path)  # readable and well-formed, before anything loads
            fraction = HOLDOUT_FRACTION if args.holdout is None else args.holdout
            if fraction > 0 and round(fraction * len(docs)) == 0:
                given = "the default --holdout" if args.holdout is None else "--holdout"
                raise ValueError(
                    f"--calib {args.calib} holds {len(docs)} document(s); {given} {fraction:g} (the "
                    "share kept out of calibration for `nbl eval --c4`) holds out none of them. Pass "
                    "--holdout 0 to calibrate on all of it, or give a file with more documents (blank "
                    "lines separate documents in a .txt file)"
                )
        elif path.exists() or path.suffix.lower() in SUFFIXES:
            read_documents(path)  # says what is wrong: missing, a directory, an unknown file type
    return holdout_split(args.calib, args.holdout)


@contextlib.contextmanager
def lm_eval_notices(verbose: bool, log_file: Path | None):
    """lm-eval's own log records (notes on `pretrained`, metadata, ...) kept out of the user's way.

    With ``verbose`` they print as lm-eval prints them; otherwise they go to ``log_file`` (next to
    --output) or are counted, and one line says where they are.
    """
    import logging

    if verbose:
        yield
        return
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm-eval")]
    saved = [(lg.handlers[:], lg.propagate, lg.level) for lg in loggers]
    for lg in loggers:
        lg.handlers, lg.propagate = [handler], False
        lg.setLevel(logging.INFO)
    try:
        yield
    finally:
        for lg, (handlers, propagate, level) in zip(loggers, saved):
            lg.handlers, lg.propagate = handlers, propagate
            lg.setLevel(level)
    if records and log_file is not None:  # only after a finished evaluation, like --output
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text("".join(f"{r.levelname} {r.name}: {r.getMessage()}\n" for r in records))
    notices = [r for r in records if r.levelno >= logging.WARNING]
    if notices:
        where = f"in {log_file}" if log_file is not None else "hidden"
        print(f"nbl eval: {len(notices)} lm-eval notice(s) {where} (--verbose shows them)", file=sys.stderr)
