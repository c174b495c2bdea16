"""Quality of a (linearized) causal LM: perplexity and lm-eval zero-shot accuracy.

* :func:`perplexity_stats` scores a token stream in windows of ``context`` tokens moved by
  ``stride`` (every token is scored once, with up to ``context - 1`` tokens of context), in
  float64, with a per-window standard error.
* :func:`wikitext2_ids` / :func:`c4_heldout_ids`: the two perplexity corpora. C4 uses only the
  documents held out from calibration (:data:`nbl_ext.data.HOLDOUT_FRACTION`).
* :func:`run_tasks` evaluates with stock lm-evaluation-harness (``HFLM`` wrapping the in-memory
  model, so a compressed model needs no saving; :func:`continuation_lm` only skips the LM head
  where no continuation is scored), on the hub tasks or on the offline copies of :mod:`nbl_ext.tasks`.
* :func:`evaluate` does all of it and returns one JSON-able report; :func:`format_report` prints it.
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from nbl_ext.numerics import next_token_nll

PERPLEXITY_CORPORA = ("wikitext2", "c4")


# --- perplexity ----------------------------------------------------------------------------------


def _windows(n: int, context: int, stride: int) -> list[tuple[int, int]]:
    """(start, first position it may score) of each window: no position is scored twice."""
    out, scored_to = [], 1  # positions < scored_to are already scored (position 0 never is)
    for start in range(0, n - context + 1, stride):
        out.append((start, scored_to))
        scored_to = start + context
    return out


def perplexity_stats(
    model,
    token_ids: torch.Tensor,
    *,
    context: int,
    stride: int | None = None,
    bos_id: int | None = None,
    batch_size: int = 1,
    progress: bool = False,
) -> dict:
    """Perplexity of the 1-D ``token_ids`` in sliding windows; a dict with the details.

    Windows hold ``context`` tokens and start every ``stride`` tokens (default: non-overlapping).
    A token is scored at most once, in the first window that holds it with context before it
    (with ``stride < context`` every token after the first window's first is scored, with at least
    ``context - stride`` tokens of context; non-overlapping windows cannot score their first
    token). The first token of the stream is not scored, and tokens after the last full window
    are ignored. With ``bos_id`` every window is that BOS followed by ``context - 1`` stream
    tokens, and a window's first stream token is scored given the BOS (models such as Gemma
    expect a BOS at the start of every sequence). Log-likelihoods are summed in float64.

    Returns ``ppl``, ``nll`` (mean per token), ``ppl_stderr`` (delta method over the windows'
    mean NLLs, treated as independent), ``tokens`` (scored), ``windows``, ``context``,
    ``stride``, ``bos`` and ``window_nll`` (each window's summed NLL and token count, for paired
    comparisons between models on the same windows).
    """
    if not isinstance(token_ids, torch.Tensor) or token_ids.dim() != 1:
        raise ValueError(
            f"perplexity: token_ids must be a 1-D tensor, got "
            f"{tuple(token_ids.shape) if isinstance(token_ids, torch.Tensor) else type(token_ids).__name__}"
        )
    body = context - (1 if bos_id is not None else 0)
    stride = body if stride is None else stride
    if body < 2 or not 1 <= stride <= body:
        raise ValueError(
            f"perplexity: need context >= {2 + (bos_id is not None)} and 1 <= stride <= "
            f"{'context - 1 (one slot is the BOS)' if bos_id is not None else 'context'}; "
            f"got context={context}, stride={stride}"
        )
    if token_ids.numel() < body:
        raise ValueError(f"perplexity: need at least one full window ({body} tokens), got {token_ids.numel()}")
    device = next(model.parameters()).device
    wins = _windows(token_ids.numel(), body, stride)
    sums, counts = [], []
    bar = tqdm(total=len(wins), desc="perplexity", unit="window", disable=not progress, leave=False)
    with torch.inference_mode():
        for b in range(0, len(wins), batch_size):
            group = wins[b : b + batch_size]
            chunk = torch.stack([token_ids[s : s + body] for s, _ in group])
            if bos_id is not None:
                chunk = torch.cat([torch.full((len(group), 1), bos_id, dtype=chunk.dtype), chunk], dim=1)
            chunk = chunk.to(device)
            tok_nll = next_token_nll(model(chunk).logits[:, :-1], chunk[:, 1:])  # predicts chunk[:, 1:]
            shift = 1 if bos_id is not None else 0  # tok_nll[:, j] scores stream position start + j + 1 - shift
            for row, (start, first) in enumerate(group):
                j0 = max(0, first - start - 1 + shift)
                sums.append(float(tok_nll[row, j0:].sum()))
                counts.append(tok_nll.shape[1] - j0)
            bar.update(len(group))
    bar.close()
    total, n = sum(sums), sum(counts)
    nll = total / n
    means = [s / c for s, c in zip(sums, counts)]
    if len(means) > 1:
        var = sum((m - nll) ** 2 for m in means) / (len(means) - 1)
        se = math.exp(nll) * math.sqrt(var / len(means))
    else:
        se = None  # one window: no spread to estimate from
    return {
        "ppl": math.exp(nll),
        "ppl_stderr": se,
        "nll": nll,
        "tokens": n,
        "windows": len(wins),
        "context": context,
        "stride": stride,
        "bos": bos_id is not None,
        "window_nll": [[s, c] for s, c in zip(sums, counts)],
    }


def perplexity(model, token_ids: torch.Tensor, window: int, stride: int | None = None) -> float:
    """Token-level perplexity of ``token_ids`` (1-D) in windows of ``window`` tokens.

    Non-overlapping by default (``stride = window``): each window is scored on its own and its
    first token is not predicted. See :func:`perplexity_stats` for overlapping windows and BOS.
    """
    return perplexity_stats(model, token_ids, context=window, stride=stride)["ppl"]


def _bos_for(tokenizer) -> int | None:
    from nbl_ext.data import _adds_bos

    return tokenizer.bos_token_id if _adds_bos(tokenizer) else None


def _stream(tokenizer, text: str, max_tokens: int | None) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)


def wikitext2_ids(tokenizer, data_dir: str | os.PathLike, max_tokens: int | None = None) -> torch.Tensor:
    """WikiText-2 raw test as one token stream: the file's lines joined by blank lines.

    That is ``"\\n\\n".join(rows)`` of the Hugging Face ``wikitext-2-raw-v1`` test rows, the
    convention of GPTQ/SparseGPT-style perplexity tables.
    """
    path = Path(data_dir) / "wikitext2" / "wiki.test.raw"
    if not path.is_file():
        raise FileNotFoundError(
            f"WikiText-2 test file not found at {path}; pass the ../shared/data/eval "
            "directory (the one holding wikitext2/wiki.test.raw) as the data directory"
        )
    rows = path.read_text(encoding="utf-8").splitlines(keepends=True)
    return _stream(tokenizer, "\n\n".join(rows), max_tokens)


def c4_heldout_ids(tokenizer, c4_path: str | os.PathLike, max_tokens: int | None = None) -> tuple[torch.Tensor, int]:
    """The held-out C4 documents (never used for calibration) as one stream, documents separated by EOS.

    Returns (token ids, number of held-out documents).
    """
    from nbl_ext.data import HOLDOUT_FRACTION, HOLDOUT_SEED, split_documents

    path = Path(c4_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"C4 sample not found at {path}; pass --c4 with the calibration document file "
            "(e.g. ../shared/data/calib/c4_demo.json)"
        )
    _, held = split_documents(path, HOLDOUT_FRACTION, seed=HOLDOUT_SEED)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in held:
        ids += tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"] + ([eos] if eos is not None else [])
        if max_tokens and len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long), len(held)


# --- lm-eval -------------------------------------------------------------------------------------


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:  # pragma: no cover - lm-eval is a dependency
        raise ImportError(
            f"accuracy evaluation needs lm-evaluation-harness: pip install 'lm-eval==0.4.13' ({exc})"
        ) from None
    return lm_eval, HFLM


def logits_to_keep(inps: torch.Tensor, continuations: dict[tuple[int, ...], int]) -> int:
    """How many trailing positions of a right-padded lm-eval batch hold every scored logit.

    ``continuations`` maps each row's fed tokens (context + continuation minus its last token) to
    the longest continuation lm-eval scores on them. lm-eval pads rows with zeros on the right and
    reads, for a row of true length ``n`` and continuation length ``c``, the logits at positions
    ``[n - c, n)``, indexed as ``logits[n + (L - T) - c : n + (L - T)]`` when the model returns
    ``L`` of ``T`` positions: the last ``L`` suffice when ``T - L <= min(n - c)``. A row's true
    length is found by looking its tokens up, trying every length from its last non-zero token to
    ``T`` (a real trailing token 0 is not padding); every match counts, so the answer is never too
    small. A row with no match keeps all positions.
    """
    t = inps.shape[1]
    start = t
    for row in inps.tolist():
        last = max((i for i, v in enumerate(row) if v != 0), default=-1) + 1
        found = [m - continuations[tuple(row[:m])] for m in range(last, t + 1) if tuple(row[:m]) in continuations]
        if not found:
            return t
        start = min(start, *found)
    return t - max(0, start)


def continuation_lm(HFLM):
    """lm-eval's ``HFLM`` that computes the LM head only where a continuation is scored.

    Stock ``HFLM`` takes the LM head and a float32 log-softmax at every position of every
    (context + continuation) row, then keeps the continuation's few. With a large vocabulary that
    is most of the cost (Gemma 3: 262k rows of 640, more than its transformer body per token).
    This subclass passes transformers' ``logits_to_keep`` with the trailing positions that the
    batch's rows score (:func:`logits_to_keep`), and lm-eval's own indexing (it allows models that
    return fewer positions than they were fed) picks the same logits. Everything else is stock
    lm-eval; models whose ``forward`` takes no ``logits_to_keep`` get the stock call.
    """
    import inspect

    class ContinuationHFLM(HFLM):
        _continuations: dict[tuple[int, ...], int] = {}

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
            params = inspect.signature(self.model.forward).parameters
            supported = "logits_to_keep" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
            spans: dict[tuple[int, ...], int] = {}
            for _, ctx, cont in requests if supported and self.backend == "causal" else ():
                fed = tuple((ctx + cont)[-(self.max_length + 1) :][:-1])  # the row lm-eval feeds (same truncation)
                spans[fed] = max(spans.get(fed, 0), len(cont))  # -> the longest continuation scored on it
            self._continuations = spans
            try:
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
            finally:
                self._continuations = {}

        def _model_call(self, inps, attn_mask=None, labels=None):
            plain = attn_mask is None and labels is None and inps.dim() == 2
            keep = logits_to_keep(inps, self._continuations) if plain and self._continuations else inps.shape[-1]
            if keep >= inps.shape[-1]:
                return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
            with (
                torch.no_grad(),
                torch.autocast(
                    device_type=self.device.type,
                    dtype=self.mixed_precision_dtype,
                    enabled=self.mixed_precision_dtype is not None,
                ),
            ):
                return self.model(inps, logits_to_keep=keep).logits

    return ContinuationHFLM


def run_tasks(
    model,
    tokenizer,
    tasks: Sequence[str],
    *,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    samples: dict[str, list[int]] | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    seed: int = 0,
    log_samples: bool = False,
    bootstrap_iters: int = 1000,
) -> dict:
    """Zero-shot lm-eval on the in-memory ``model`` (wrapped in lm-eval's ``HFLM``).

    ``data_dir``: a directory in the ``../shared/data/eval`` layout; its tasks run offline from
    those files with lm-eval's own prompts and metrics (:mod:`nbl_ext.tasks`). Without it the
    standard hub tasks are used (network needed). ``limit``: the first N documents of each task;
    ``samples``: explicit document indices per task (exclusive with ``limit``). ``max_length``:
    the longest sequence lm-eval feeds the model (default: the model's own maximum).

    Returns ``{task: {"metrics": {name: value}, "stderr": {name: value}, "n": int, "n_total":
    int, "note": str}}`` plus, with ``log_samples``, each task's per-document records under
    ``"samples"``.
    """
    from nbl_ext.tasks import OFFLINE_TASKS, offline_task_configs, task_manager

    lm_eval, HFLM = _lm_eval()
    tasks = list(tasks)
    if not tasks:
        raise ValueError("no tasks given; e.g. --tasks arc_easy,piqa")
    if limit is not None and samples is not None:
        raise ValueError("pass either limit or samples, not both")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer, got {limit!r}")
    task_specs: list[Any] = offline_task_configs(tasks, data_dir) if data_dir is not None else tasks
    device = next(model.parameters()).device
    lm = continuation_lm(HFLM)(
        pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device), max_length=max_length
    )
    try:
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=task_specs,
            limit=limit,
            samples=samples,
            task_manager=task_manager() if data_dir is not None else None,
            log_samples=log_samples,
            bootstrap_iters=bootstrap_iters,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    except (ConnectionError, OSError) as exc:
        if data_dir is None:
            raise RuntimeError(
                f"could not fetch the hub tasks ({exc}); offline, pass --data-dir with the ../shared/data/eval layout"
            ) from exc
        raise
    report: dict[str, Any] = {}
    for name in tasks:
        res = out["results"][name]
        metrics, stderr = {}, {}
        for key, value in res.items():
            if "," not in key:
                continue
            metric = key.split(",")[0]
            if metric.endswith("_stderr"):
                stderr[metric[: -len("_stderr")]] = value if isinstance(value, (int, float)) else None
            else:
                metrics[metric] = value
        n = out["n-samples"][name]
        report[name] = {
            "metrics": metrics,
            "stderr": stderr,
            "n": n["effective"],
            "n_total": n["original"],
            "source": "offline" if data_dir is not None else "hub",
            "note": OFFLINE_TASKS[name].note if data_dir is not None else "",
        }
        if log_samples:
            report[name]["samples"] = [
                {
                    "doc_id": s["doc_id"],
                    **{m: s[m] for m in ("acc", "acc_norm") if m in s},
                    "loglikelihoods": [float(r[0]) for r in s["filtered_resps"]]
                    if all(isinstance(r, (list, tuple)) for r in s["filtered_resps"])
                    else None,
                }
                for s in out["samples"][name]
            ]
    return report


# --- the whole evaluation ----------------------------------------------------------------------


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("nbl-ext", "transformers", "lm_eval", "datasets"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def model_summary(model) -> dict:
    """What was evaluated: the source, the linearized layers and how they were chosen."""
    cfg = model.config
    nbl = getattr(cfg, "nbl", None)
    return {
        "source": getattr(cfg, "nbl_source", None) or getattr(cfg, "_name_or_path", None),
        "architecture": getattr(cfg, "model_type", None),
        "layers": getattr(cfg, "num_hidden_layers", None),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "parameters": sum(p.numel() for p in model.parameters()),
        "nbl": nbl,
    }


def evaluate(
    model,
    tokenizer,
    *,
    tasks: Sequence[str] = (),
    data_dir: str | os.PathLike | None = None,
    perplexity_on: Sequence[str] = (),
    c4_path: str | os.PathLike | None = None,
    context: int = 2048,
    stride: int | None = None,
    ppl_tokens: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Accuracy on lm-eval ``tasks`` and perplexity on ``perplexity_on`` (``"wikitext2"``, ``"c4"``).

    Perplexity windows hold ``context`` tokens and move by ``stride`` (default ``context``);
    ``ppl_tokens`` caps each corpus (default: all of it). WikiText-2 is read from ``data_dir``;
    C4 from ``c4_path`` (its held-out documents only). Returns a JSON-able report.
    """
    unknown = [c for c in perplexity_on if c not in PERPLEXITY_CORPORA]
    if unknown:
        raise ValueError(f"unknown perplexity corpus {unknown}; choose from {', '.join(PERPLEXITY_CORPORA)}")
    report: dict[str, Any] = {
        "model": model_summary(model),
        "versions": versions(),
        "device": str(next(model.parameters()).device),
        "tasks": {},
        "perplexity": {},
    }
    bos = _bos_for(tokenizer)
    for corpus in perplexity_on:
        if corpus == "wikitext2":
            if data_dir is None:
                raise ValueError("WikiText-2 perplexity reads the local test file: pass --data-dir")
            ids, what = (
                wikitext2_ids(tokenizer, data_dir, ppl_tokens),
                "WikiText-2 raw test, rows joined by blank lines",
            )
        else:
            if c4_path is None:
                raise ValueError(
                    "C4 perplexity needs the C4 document file: pass --c4 (e.g. ../shared/data/calib/c4_demo.json)"
                )
            ids, n_docs = c4_heldout_ids(tokenizer, c4_path, ppl_tokens)
            what = f"{n_docs} held-out documents of {Path(c4_path).name}, EOS-separated"
        stats = perplexity_stats(
            model, ids, context=context, stride=stride, bos_id=bos, batch_size=1, progress=progress
        )
        report["perplexity"][corpus] = {"text": what, **stats}
    if tasks:
        report["tasks"] = run_tasks(
            model,
            tokenizer,
            tasks,
            data_dir=data_dir,
            limit=limit,
            batch_size=batch_size,
            max_length=max_length,
            seed=seed,
        )
    report["settings"] = {
        "limit": limit,
        "batch_size": batch_size,
        "max_length": max_length,
        "seed": seed,
        "context": context,
        "stride": stride,
        "ppl_tokens": ppl_tokens,
        "data_dir": str(data_dir) if data_dir is not None else None,
        "c4": str(c4_path) if c4_path is not None else None,
    }
    return report


def zero_shot_average(tasks: dict, names: Sequence[str]) -> tuple[float, float] | None:
    """Mean ``acc`` over ``names`` and its standard error (tasks independent), or None if one is missing."""
    if not all(n in tasks and "acc" in tasks[n]["metrics"] for n in names):
        return None
    accs = [tasks[n]["metrics"]["acc"] for n in names]
    ses = [tasks[n]["stderr"].get("acc") or 0.0 for n in names]
    return sum(accs) / len(accs), math.sqrt(sum(s * s for s in ses)) / len(ses)


def format_report(report: dict) -> str:
    """A readable table of a report from :func:`evaluate`."""
    from nbl_ext.tasks import ZERO_SHOT_7

    lines = []
    m = report["model"]
    nbl = m.get("nbl") or {}
    source = m.get("path") or m["source"]
    if isinstance(source, dict):  # config.nbl_source: where load_model got the weights
        source = source.get("description") or source.get("path") or source.get("name") or "model"
    desc = f"{source} ({m['architecture']}, {m['layers']} layers, {m['dtype']})"
    if nbl.get("layers"):
        desc += f"; {nbl.get('method')} on layers {nbl['layers']}"
    lines.append(desc)
    if report["tasks"]:
        lines.append(f"{'task':<16} {'metric':<16} {'value':>9} {'stderr':>9} {'n':>7}")
        for name, t in report["tasks"].items():
            for metric, value in t["metrics"].items():
                se = t["stderr"].get(metric)
                se_s = f"{se:9.4f}" if isinstance(se, float) else f"{'-':>9}"
                n_s = f"{t['n']}" + ("" if t["n"] == t["n_total"] else f"/{t['n_total']}")
                lines.append(f"{name:<16} {metric:<16} {value:9.4f} {se_s} {n_s:>7}")
        avg = zero_shot_average(report["tasks"], ZERO_SHOT_7)
        if avg:
            lines.append(f"{'average (7 tasks)':<16} {'acc':<16} {avg[0]:9.4f} {avg[1]:9.4f}")
        notes = [f"  {n}: {t['note']}" for n, t in report["tasks"].items() if t.get("note")]
        if notes:
            lines.append("offline data notes:")
            lines += notes
    for corpus, p in report["perplexity"].items():
        se = f" ± {p['ppl_stderr']:.3f}" if p["ppl_stderr"] is not None else ""
        lines.append(
            f"perplexity {corpus}: {p['ppl']:.3f}{se} over {p['tokens']} tokens "
            f"(context {p['context']}, stride {p['stride']}{', BOS per window' if p['bos'] else ''}; {p['text']})"
        )
    return "\n".join(lines)
