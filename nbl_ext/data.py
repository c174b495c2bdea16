"""Calibration tokens for NBL: text files, Hugging Face datasets, or text the model writes itself.

:func:`load_calibration_tokens` returns a ``(num_samples, seq_len)`` LongTensor::

    tokens = load_calibration_tokens("../shared/data/calib/c4_demo.json", tokenizer,
                                     num_samples=64, seq_len=2048)
    tokens = load_calibration_tokens("self", tokenizer, model=model, num_samples=16, seq_len=512)

Sources
-------
* a path: ``.json`` (a JSON array of ``{"text": ...}`` objects, as the C4 sample,
  or of strings), ``.jsonl`` (one ``{"text": ...}`` object or string per line),
  ``.txt`` (documents separated by blank lines; a file without blank lines is
  one document);
* a list of strings (documents), e.g. one half of :func:`split_documents`;
* ``"hf:NAME[:CONFIG][:SPLIT]"`` (e.g. ``"hf:allenai/c4:en:validation"``) or a
  bare ``"owner/name"`` that is not a local path: a Hugging Face dataset, read
  in streaming mode with the optional ``datasets`` package (network needed);
  SPLIT defaults to ``train``;
* ``"self"``: data-free calibration, text sampled from ``model`` itself.

Packing (text sources)
----------------------
1. Documents are put in a seeded order: document ``i`` sorts by
   ``sha256(f"shuffle:{seed}:{i}")``. The order depends only on the seed and the
   number of documents, not on the torch/numpy/Python version.
2. In that order, each document is tokenized without special tokens and
   followed by the tokenizer's EOS token (when it has one): one token stream.
   Documents that are empty or whitespace are skipped.
3. The stream is cut into ``num_samples`` consecutive, non-overlapping blocks.
   When the tokenizer adds a BOS token by itself (Llama, Gemma; not SmolLM2),
   every block is that BOS followed by ``seq_len - 1`` stream tokens, as the
   model sees text at inference; otherwise ``seq_len`` stream tokens. The rest
   of the stream is unused. Documents are tokenized only until the blocks are
   full, so a large file costs only what is used.

Hugging Face datasets are read in their own order until enough tokens are
collected; that pool is then ordered and packed as above.

Holding out documents
---------------------
:func:`split_documents` splits a file's documents into a calibration part and
a held-out part (deterministic for a seed); pass the first to
:func:`load_calibration_tokens` and keep the second for evaluation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from nbl_ext.validation import check_int

__all__ = [
    "HOLDOUT_FRACTION",
    "HOLDOUT_SEED",
    "SUFFIXES",
    "load_calibration_tokens",
    "read_documents",
    "split_documents",
]

#: The one held-out convention shared by ``nbl compress`` (calibrates on the rest of a document
#: file) and ``nbl eval`` / the quality study (C4 perplexity on the held-out part): a fixed
#: fraction and seed, so the two never overlap whatever ``--seed`` packing uses.
HOLDOUT_FRACTION = 0.2
HOLDOUT_SEED = 0

#: File suffixes :func:`read_documents` understands.
SUFFIXES = (".json", ".jsonl", ".txt")
_TOKENIZE_BATCH = 64  # documents per tokenizer call


# --- documents -----------------------------------------------------------------------


def read_documents(path: str | os.PathLike, *, text_field: str = "text") -> list[str]:
    """The documents of a ``.json``, ``.jsonl`` or ``.txt`` file (see the module docstring).

    Raises FileNotFoundError for a missing file and ValueError for an unknown
    suffix, malformed content, a record without ``text_field`` or a file with
    no text at all. Whitespace-only documents are dropped.
    """
    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(
            f"calibration file {p}: unknown file type {suffix or '(no suffix)'!r}; supported are "
            f'{", ".join(SUFFIXES)} (JSON array of {{"{text_field}": ...}} objects or strings, JSON lines, '
            "plain text with documents separated by blank lines)"
        )
    if not p.is_file():
        raise FileNotFoundError(f"calibration file not found: {p}" + (" (it is a directory)" if p.is_dir() else ""))
    raw = p.read_text(encoding="utf-8")
    if suffix == ".txt":
        docs = [d.strip() for d in re.split(r"\n[ \t\r\f\v]*\n", raw)]
    elif suffix == ".json":
        try:
            records = json.loads(raw) if raw.strip() else []
        except json.JSONDecodeError as e:
            raise ValueError(f"calibration file {p}: invalid JSON ({e})") from e
        if not isinstance(records, list):
            raise ValueError(
                f'calibration file {p}: expected a JSON array of {{"{text_field}": ...}} objects or strings, '
                f"got a JSON {type(records).__name__}"
            )
        docs = [_record_text(r, text_field, f"{p}: item {i}") for i, r in enumerate(records)]
    else:  # .jsonl
        docs = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"calibration file {p}: line {n} is not valid JSON ({e})") from e
            docs.append(_record_text(record, text_field, f"{p}: line {n}"))
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"calibration file {p} contains no text (it is empty, or every document is blank)")
    return docs


def _record_text(record: Any, text_field: str, where: str) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        if text_field not in record:
            raise ValueError(
                f"calibration file {where} has no {text_field!r} field (fields: {sorted(record)}); "
                "each record must be a string or an object with a text field (text_field= names it)"
            )
        value = record[text_field]
        if not isinstance(value, str):
            raise ValueError(f"calibration file {where}: {text_field!r} is a {type(value).__name__}, not a string")
        return value
    raise ValueError(
        f"calibration file {where} is a {type(record).__name__}; expected a string or an object "
        f"with a {text_field!r} field"
    )


def _seeded_order(n: int, seed: int, salt: str) -> list[int]:
    """A permutation of range(n) fixed by (seed, salt), independent of library versions."""
    return sorted(range(n), key=lambda i: hashlib.sha256(f"{salt}:{seed}:{i}".encode()).digest())


def split_documents(
    documents: str | os.PathLike | Sequence[str],
    holdout_fraction: float,
    *,
    seed: int = 0,
    text_field: str = "text",
) -> tuple[list[str], list[str]]:
    """Split documents (a list, or a file for :func:`read_documents`) into (calibration, held out).

    ``round(holdout_fraction * n)`` documents are held out, chosen by a seeded
    order (``sha256(f"holdout:{seed}:{i}")``), so the split is reproducible
    anywhere. Both parts keep the documents' original order. Use the first part
    as the ``source`` of :func:`load_calibration_tokens` and evaluate on the
    second: no held-out document is then seen during calibration.
    """
    if isinstance(documents, (str, os.PathLike)):
        docs = read_documents(documents, text_field=text_field)
    else:
        docs = _check_documents(documents)
    if (
        isinstance(holdout_fraction, bool)
        or not isinstance(holdout_fraction, (int, float))
        or not 0.0 <= float(holdout_fraction) < 1.0
    ):
        raise ValueError(f"split_documents: holdout_fraction must be a number in [0, 1), got {holdout_fraction!r}")
    n_hold = int(round(float(holdout_fraction) * len(docs)))
    if holdout_fraction > 0 and n_hold == 0:
        raise ValueError(
            f"split_documents: holdout_fraction={holdout_fraction} of {len(docs)} documents holds out none; "
            "use a larger fraction"
        )
    held = set(_seeded_order(len(docs), check_int(seed, "seed", 0), "holdout")[:n_hold])
    return ([d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held])


def _check_documents(documents: Any) -> list[str]:
    if isinstance(documents, (bytes, dict)) or not isinstance(documents, Sequence):
        raise TypeError(f"documents must be a list of strings or a file path, got {type(documents).__name__}")
    bad = [i for i, d in enumerate(documents) if not isinstance(d, str)]
    if bad:
        raise TypeError(f"documents must all be strings; item {bad[0]} is a {type(documents[bad[0]]).__name__}")
    docs = [d for d in documents if d.strip()]
    if not docs:
        raise ValueError("the document list contains no text (it is empty, or every document is blank)")
    return docs


# --- tokenization and packing ---------------------------------------------------------------


def _adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts its BOS token in front of text by itself."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def _tokenize(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def _token_lists(tokenizer: Any, texts: Iterable[str]) -> Iterator[list[int]]:
    """Token ids of each text followed by EOS, tokenized lazily in batches."""
    eos = getattr(tokenizer, "eos_token_id", None)
    tail = [eos] if eos is not None else []
    batch: list[str] = []
    for text in texts:
        if not text.strip():
            continue
        batch.append(text)
        if len(batch) == _TOKENIZE_BATCH:
            yield from (ids + tail for ids in _tokenize(tokenizer, batch))
            batch = []
    if batch:
        yield from (ids + tail for ids in _tokenize(tokenizer, batch))


def _pack(token_lists: Iterable[list[int]], num_samples: int, seq_len: int, bos: int | None, what: str) -> torch.Tensor:
    body = seq_len - (1 if bos is not None else 0)
    need = num_samples * body
    stream: list[int] = []
    docs = 0
    for ids in token_lists:
        stream.extend(ids)
        docs += 1
        if len(stream) >= need:
            break
    if len(stream) < need:
        fit = len(stream) // body
        per = f"{body} text tokens per sample" + (" plus the BOS token" if bos is not None else "")
        raise ValueError(
            f"{what} has {len(stream)} tokens in {docs} documents with this tokenizer (EOS separators "
            f"included), but num_samples={num_samples} x seq_len={seq_len} needs {need} ({per}). "
            f"Use fewer samples (at most {fit} of seq_len={seq_len} fit) or a shorter seq_len, or give more text."
        )
    out = torch.tensor(stream[:need], dtype=torch.long).view(num_samples, body)
    if bos is not None:
        out = torch.cat([torch.full((num_samples, 1), bos, dtype=torch.long), out], dim=1)
    return out


# --- sources -------------------------------------------------------------------------------


def _classify(source: Any) -> tuple[str, Any]:
    if isinstance(source, os.PathLike):
        return "file", Path(source)
    if isinstance(source, str):
        s = source.strip()
        if s == "self":
            return "self", None
        if s.startswith("hf:"):
            return "hf", s[3:]
        p = Path(s).expanduser()
        if p.exists() or p.suffix.lower() in SUFFIXES:
            return "file", p
        if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", s):
            return "hf", s
        raise FileNotFoundError(
            f"calibration source {source!r} is not an existing file; sources are a path to a "
            f"{'/'.join(SUFFIXES)} file, a list of documents, 'hf:NAME[:CONFIG][:SPLIT]' "
            "(a Hugging Face dataset, online) or 'self' (text sampled from the model)"
        )
    if isinstance(source, Sequence) and not isinstance(source, (bytes, dict)):
        return "docs", source
    raise TypeError(
        f"calibration source must be a path, a list of documents, 'hf:...' or 'self'; got {type(source).__name__}"
    )


def _hf_texts(spec: str, text_field: str) -> tuple[Iterator[str], str]:
    """Texts of a Hugging Face dataset (streaming) and a description of it."""
    parts = spec.split(":")
    if not parts[0] or len(parts) > 3:
        raise ValueError(
            f"calibration source 'hf:{spec}': expected 'hf:NAME[:CONFIG][:SPLIT]', e.g. 'hf:allenai/c4:en:validation'"
        )
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    what = f"Hugging Face dataset {name!r} (config {config!r}, split {split!r})"
    offline_hint = (
        "Offline, use a local file (.json/.jsonl/.txt, e.g. the C4 sample ../shared/data/calib/c4_demo.json) "
        "or source='self' (text sampled from the model)."
    )
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            f"calibration source {spec!r} is read as a Hugging Face dataset (it is not a local file), which "
            f"needs the optional `datasets` package (pip install datasets) and network access. {offline_hint}"
        ) from e
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
        rows = iter(ds)
        first = next(rows, None)
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError...)
        from nbl_ext.models import _hub_reachable

        reason = "this machine is offline (the Hugging Face hub cannot be reached). " if not _hub_reachable() else ""
        raise RuntimeError(f"could not load {what}: {type(e).__name__}: {e}\n{reason}{offline_hint}") from e
    if first is None:
        raise ValueError(f"{what} is empty")
    if not isinstance(first, dict) or text_field not in first:
        cols = sorted(first) if isinstance(first, dict) else type(first).__name__
        raise ValueError(f"{what} has no {text_field!r} column (columns: {cols}); pass text_field=")

    def texts() -> Iterator[str]:
        yield first[text_field]
        for row in rows:
            yield row[text_field]

    return texts(), what


def load_calibration_tokens(
    source: str | os.PathLike | Sequence[str],
    tokenizer: Any,
    *,
    num_samples: int,
    seq_len: int,
    seed: int = 0,
    model: Any = None,
    progress: bool = True,
    text_field: str = "text",
    batch_size: int = 16,
    temperature: float = 1.0,
    top_k: int | None = 50,
) -> torch.Tensor:
    """Calibration token ids, a ``(num_samples, seq_len)`` int64 CPU tensor.

    ``source`` is a file path, a list of documents, ``"hf:NAME[:CONFIG][:SPLIT]"``
    or ``"self"`` (see the module docstring for the formats and the packing
    scheme). The result is deterministic for a given source, tokenizer and
    ``seed``.

    ``text_field`` names the text of JSON records and dataset rows.
    ``batch_size``, ``temperature`` and ``top_k`` apply to ``"self"`` only:
    ``num_samples`` sequences are sampled from ``model`` in batches of
    ``batch_size`` with the KV cache, each starting from the tokenizer's BOS
    when it adds one and otherwise from a uniformly drawn non-special token,
    then sampling with ``temperature`` from the ``top_k`` most likely tokens
    (``None``: all) among the non-special tokens, with a ``torch.Generator``
    seeded by ``seed`` (bit-for-bit reproducible on CPU for a given
    ``batch_size``; on GPU as far as the model's kernels are).
    """
    num_samples = check_int(num_samples, "num_samples", 1)
    seq_len = check_int(seq_len, "seq_len", 2)
    seed = check_int(seed, "seed", 0)
    if not callable(tokenizer):
        raise TypeError(f"tokenizer must be a Hugging Face tokenizer, got {type(tokenizer).__name__}")
    kind, arg = _classify(source)
    if kind == "self":
        return _sample_from_model(
            model,
            tokenizer,
            num_samples=num_samples,
            seq_len=seq_len,
            seed=seed,
            batch_size=batch_size,
            temperature=temperature,
            top_k=top_k,
            progress=progress,
        )
    bos = tokenizer.bos_token_id if _adds_bos(tokenizer) else None
    if kind == "hf":
        texts, what = _hf_texts(arg, text_field)
        body = seq_len - (1 if bos is not None else 0)
        need, pool, have = num_samples * body, [], 0
        for ids in _token_lists(tokenizer, texts):
            pool.append(ids)
            have += len(ids)
            if have >= need:
                break
        order = _seeded_order(len(pool), seed, "shuffle")
        return _pack((pool[i] for i in order), num_samples, seq_len, bos, what)
    if kind == "file":
        docs, what = read_documents(arg, text_field=text_field), f"calibration file {arg}"
    else:
        docs, what = _check_documents(arg), "the document list"
    order = _seeded_order(len(docs), seed, "shuffle")
    return _pack(_token_lists(tokenizer, (docs[i] for i in order)), num_samples, seq_len, bos, what)


# --- data-free calibration: text sampled from the model ------------------------------------------


@torch.inference_mode()
def _sample_from_model(
    model: Any,
    tokenizer: Any,
    *,
    num_samples: int,
    seq_len: int,
    seed: int,
    batch_size: int,
    temperature: float,
    top_k: int | None,
    progress: bool,
) -> torch.Tensor:
    if model is None:
        raise ValueError(
            "calibration source 'self' samples text from the model itself: pass model= (the causal LM "
            "being calibrated), or use a text source (a .json/.jsonl/.txt file)"
        )
    batch_size = check_int(batch_size, "batch_size", 1)
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if top_k is not None:
        top_k = check_int(top_k, "top_k", 1)
    try:
        device = next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError) as e:
        raise TypeError(f"model must be a torch causal LM with parameters, got {type(model).__name__}") from e

    vocab = min(len(tokenizer), int(model.config.vocab_size))
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    gen = torch.Generator(device="cpu").manual_seed(seed)
    start_bos = tokenizer.bos_token_id if _adds_bos(tokenizer) else None
    # Special tokens are never sampled: after an end-of-text token, instruct models drift into
    # chat-template loops ("<|im_end|>\n<|im_end|>..."), which is not text worth calibrating on.
    # Ids past len(tokenizer) (padded vocabularies) cannot be decoded and are cut off below.
    banned = torch.tensor(sorted(t for t in special if 0 <= t < vocab), dtype=torch.long)
    starts_pool = torch.tensor([t for t in range(vocab) if t not in special], dtype=torch.long)

    was_training = model.training
    model.eval()
    out = torch.empty(num_samples, seq_len, dtype=torch.long)
    bar = tqdm(total=num_samples * seq_len, unit="tok", desc="sampling calibration text", disable=not progress)
    try:
        for lo in range(0, num_samples, batch_size):
            b = min(batch_size, num_samples - lo)
            if start_bos is not None:
                tok = torch.full((b, 1), start_bos, dtype=torch.long)
            else:
                tok = starts_pool[torch.randint(len(starts_pool), (b, 1), generator=gen)]
            out[lo : lo + b, 0:1] = tok
            past = None
            for t in range(1, seq_len):
                res = model(input_ids=tok.to(device), past_key_values=past, use_cache=True)
                past = res.past_key_values
                logits = res.logits[:, -1, :vocab].float()
                if len(banned):
                    logits.index_fill_(1, banned.to(logits.device), float("-inf"))
                tok = _sample(logits / temperature, top_k, gen)
                out[lo : lo + b, t] = tok[:, 0]
                bar.update(b if t > 1 else 2 * b)
            del past
    finally:
        bar.close()
        model.train(was_training)
    return out


def _sample(logits: torch.Tensor, top_k: int | None, gen: torch.Generator) -> torch.Tensor:
    """One token per row from softmax(logits) restricted to the top_k; (b, 1) int64 on the CPU."""
    if top_k is not None and top_k < logits.shape[-1]:
        values, index = logits.topk(top_k, dim=-1)
    else:
        values, index = logits, None
    probs = torch.softmax(values, dim=-1).cpu()
    pick = torch.multinomial(probs, 1, generator=gen)
    return pick if index is None else index.cpu().gather(1, pick)
