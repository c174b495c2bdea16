"""Offline lm-evaluation-harness tasks: lm-eval's own task definitions fed from local files.

The standard zero-shot suite (ARC-e/c, BoolQ, HellaSwag, OpenBookQA, PIQA, WinoGrande,
LAMBADA-OpenAI, WikiText-2) normally downloads from the Hugging Face hub. Offline, we keep
lm-eval's task definition *unchanged* (its YAML: prompt templates, ``process_docs``, choices,
targets, metrics, splits), and replace only where the documents come from: each loader below
reads the files of the ``../shared/data/eval`` layout (``SOURCES.md`` there) and returns them in
the exact schema of the hub dataset the stock task expects. The prompts and metrics are
therefore lm-eval's, by construction; what differs from the hub copy is listed in
:data:`OFFLINE_TASKS` (``note``) and reported with every result.

    from nbl_ext.tasks import offline_task_configs
    configs = offline_task_configs(["arc_easy", "piqa"], "../shared/data/eval")
    lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok), tasks=configs)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The 7 zero-shot tasks whose mean accuracy the NBL paper reports.
ZERO_SHOT_7 = ("arc_easy", "arc_challenge", "boolq", "hellaswag", "openbookqa", "piqa", "winogrande")
#: Every task with an offline definition, in the order of the ``nbl eval`` default.
DEFAULT_TASKS = ZERO_SHOT_7 + ("lambada_openai", "wikitext")


@dataclass(frozen=True)
class OfflineTask:
    stock: str  # lm-eval's YAML for this task, relative to lm_eval/tasks/
    files: tuple[str, ...]  # relative to the data directory
    split: str  # the split lm-eval's task evaluates, under the hub's name
    load: Callable[[Path], list[dict]]
    note: str = ""  # how our copy differs from the hub dataset ("" = same content)


def _jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not valid JSON ({exc.msg}); is this the right file?") from None
    return rows


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def _field(row: dict, key: str, path: Path, n: int) -> Any:
    try:
        return row[key]
    except (KeyError, TypeError):
        raise ValueError(f"{path}:{n}: record has no {key!r} field; expected the format in SOURCES.md") from None


def _ai2_mc(path: Path, stem_key: str) -> list[dict]:
    """AI2 jsonl (``question.stem``, ``question.choices[{text,label}]``) -> HF schema (choices flattened)."""
    out = []
    for n, row in enumerate(_jsonl(path), 1):
        q = _field(row, "question", path, n)
        choices = _field(q, "choices", path, n)
        out.append(
            {
                "id": row.get("id", str(n)),
                stem_key: _field(q, "stem", path, n),
                "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
                "answerKey": _field(row, "answerKey", path, n),
            }
        )
    return out


def _load_arc(sub: str) -> Callable[[Path], list[dict]]:
    return lambda root: _ai2_mc(root / sub, "question")


def _load_openbookqa(root: Path) -> list[dict]:
    return _ai2_mc(root / "openbookqa/test.jsonl", "question_stem")


def _bool_label(value: Any, path: Path, n: int) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and value in (0, 1):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return int(value.strip().lower() == "true")
    raise ValueError(f"{path}:{n}: BoolQ label {value!r} is not true/false")


def _load_boolq(root: Path) -> list[dict]:
    path = root / "boolq/val.jsonl"
    return [
        {
            "question": _field(r, "question", path, n),
            "passage": _field(r, "passage", path, n),
            "idx": r.get("idx", n - 1),
            "label": _bool_label(_field(r, "label", path, n), path, n),
        }
        for n, r in enumerate(_jsonl(path), 1)
    ]


def _labels(path: Path, count: int, allowed: set[str]) -> list[str]:
    labels = [s.strip() for s in _lines(path)]
    if len(labels) != count:
        raise ValueError(f"{path} has {len(labels)} labels for {count} items; the two files must be aligned")
    for n, lab in enumerate(labels, 1):
        if lab not in allowed:
            raise ValueError(f"{path}:{n}: label {lab!r} is not one of {sorted(allowed)}")
    return labels


def _load_piqa(root: Path) -> list[dict]:
    path = root / "piqa/valid.jsonl"
    rows = _jsonl(path)
    labels = _labels(root / "piqa/valid-labels.lst", len(rows), {"0", "1"})
    return [
        {
            "goal": _field(r, "goal", path, n),
            "sol1": _field(r, "sol1", path, n),
            "sol2": _field(r, "sol2", path, n),
            "label": int(lab),
        }
        for n, (r, lab) in enumerate(zip(rows, labels), 1)
    ]


def _load_winogrande(root: Path) -> list[dict]:
    path = root / "winogrande/dev.jsonl"
    rows = _jsonl(path)
    labels = _labels(root / "winogrande/dev-labels.lst", len(rows), {"1", "2"})
    out = []
    for n, (r, lab) in enumerate(zip(rows, labels), 1):
        sentence = _field(r, "sentence", path, n)
        if sentence.count("_") != 1:
            raise ValueError(f"{path}:{n}: a WinoGrande sentence must contain exactly one '_' blank")
        if str(r.get("answer", lab)) != lab:
            raise ValueError(f"{path}:{n}: answer {r.get('answer')!r} disagrees with dev-labels.lst ({lab})")
        out.append(
            {
                "sentence": sentence,
                "option1": _field(r, "option1", path, n),
                "option2": _field(r, "option2", path, n),
                "answer": lab,
            }
        )
    return out


def _load_hellaswag(root: Path) -> list[dict]:
    """llama.cpp's 6-lines-per-item text -> the Rowan/hellaswag schema lm-eval's process_docs reads.

    Line 1 is ``activity_label: ctx`` (split at the first ``": "``); the file has no
    ctx_a/ctx_b split, so ``ctx_a = ctx`` and ``ctx_b = ""`` (lm-eval's query is then
    ``activity_label + ": " + ctx`` after its own ``preprocess`` strips the trailing space).
    """
    path = root / "hellaswag/hellaswag_val_full.txt"
    lines = _lines(path)
    if len(lines) % 6:
        raise ValueError(f"{path} has {len(lines)} lines; the format has 6 lines per item")
    out = []
    for i in range(0, len(lines), 6):
        head, label, endings = lines[i], lines[i + 1].strip(), lines[i + 2 : i + 6]
        activity, sep, ctx = head.partition(": ")
        if not sep or label not in ("0", "1", "2", "3"):
            raise ValueError(f"{path}:{i + 1}: expected 'activity_label: context' then a label 0-3")
        out.append(
            {
                "ind": i // 6,
                "activity_label": activity,
                "ctx_a": ctx,
                "ctx_b": "",
                "ctx": ctx,
                "endings": endings,
                "source_id": "",
                "split": "val",
                "split_type": "",
                "label": label,
            }
        )
    return out


def _load_lambada(root: Path) -> list[dict]:
    path = root / "lambada_openai/lambada_test.jsonl"
    return [{"text": _field(r, "text", path, n)} for n, r in enumerate(_jsonl(path), 1)]


def wikitext_pages(raw_text: str) -> list[str]:
    """Split a WikiText raw file into articles at top-level ``= Title =`` headings.

    The rule of the ``EleutherAI/wikitext_document_level`` dataset that lm-eval's
    ``wikitext`` task reads (a heading line starts a new page; empty pages are dropped).
    """
    pages, cur = [], []
    for line in raw_text.split("\n"):
        rline = line.replace("= = =", "===").replace("= =", "==").strip()
        if rline.startswith("= ") and rline.endswith(" ="):
            page = "\n".join(cur)
            if page.strip():
                pages.append(page)
            cur = []
        cur.append(line)
    pages.append("\n".join(cur))
    return pages


def _load_wikitext(root: Path) -> list[dict]:
    return [{"page": p} for p in wikitext_pages((root / "wikitext2/wiki.test.raw").read_text(encoding="utf-8"))]


OFFLINE_TASKS: dict[str, OfflineTask] = {
    "arc_easy": OfflineTask(
        "arc/arc_easy.yaml", ("arc_easy/ARC-Easy-Test.jsonl",), "test", _load_arc("arc_easy/ARC-Easy-Test.jsonl")
    ),
    "arc_challenge": OfflineTask(
        "arc/arc_challenge.yaml",
        ("arc_challenge/ARC-Challenge-Test.jsonl",),
        "test",
        _load_arc("arc_challenge/ARC-Challenge-Test.jsonl"),
    ),
    "boolq": OfflineTask(
        "super_glue/boolq/default.yaml",
        ("boolq/val.jsonl",),
        "validation",
        _load_boolq,
        "labels stored as the strings 'true'/'false' (converted to 1/0); content identical",
    ),
    "hellaswag": OfflineTask(
        "hellaswag/hellaswag.yaml",
        ("hellaswag/hellaswag_val_full.txt",),
        "validation",
        _load_hellaswag,
        "derived llama.cpp text copy: the context's second half is not capitalized as lm-eval does "
        "(ctx_b.capitalize()) and bracket tags were removed upstream; absolute accuracy can differ slightly "
        "from hub numbers, comparisons between models on this copy are consistent",
    ),
    "openbookqa": OfflineTask("openbookqa/openbookqa.yaml", ("openbookqa/test.jsonl",), "test", _load_openbookqa),
    "piqa": OfflineTask("piqa/piqa.yaml", ("piqa/valid.jsonl", "piqa/valid-labels.lst"), "validation", _load_piqa),
    "winogrande": OfflineTask(
        "winogrande/default.yaml",
        ("winogrande/dev.jsonl", "winogrande/dev-labels.lst"),
        "validation",
        _load_winogrande,
        "derived copy without the qID field; content identical",
    ),
    "lambada_openai": OfflineTask(
        "lambada/lambada_openai.yaml", ("lambada_openai/lambada_test.jsonl",), "test", _load_lambada
    ),
    "wikitext": OfflineTask(
        "wikitext/wikitext.yaml",
        ("wikitext2/wiki.test.raw",),
        "test",
        _load_wikitext,
        "pages split from wiki.test.raw by the wikitext_document_level rule",
    ),
}


def check_data_dir(data_dir: str | os.PathLike, tasks: list[str]) -> Path:
    """The data directory as a Path, after checking every file the offline ``tasks`` need."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"evaluation data directory {root} does not exist; pass --data-dir pointing at a directory in "
            "the ../shared/data/eval layout (arc_easy/, boolq/, hellaswag/, ... see SOURCES.md there)"
        )
    missing = [
        str(root / f) for t in tasks if t in OFFLINE_TASKS for f in OFFLINE_TASKS[t].files if not (root / f).is_file()
    ]
    if missing:
        raise FileNotFoundError(f"evaluation data directory {root} lacks: {', '.join(missing)}")
    return root


def _dataset_loader(name: str) -> Callable[..., Any]:
    """lm-eval calls ``custom_dataset(**metadata, **dataset_kwargs)``: build the DatasetDict."""

    def load(*, nbl_data_dir: str, **_: Any):
        import datasets

        spec = OFFLINE_TASKS[name]
        return datasets.DatasetDict({spec.split: datasets.Dataset.from_list(spec.load(Path(nbl_data_dir)))})

    load.__name__ = f"load_offline_{name}"
    return load


def stock_task_config(name: str) -> dict:
    """lm-eval's own YAML config of offline task ``name`` (``include`` and ``!function`` resolved)."""
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    path = Path(lm_eval.tasks.__file__).parent / OFFLINE_TASKS[name].stock
    if not path.is_file():
        raise RuntimeError(
            f"lm-eval {_lm_eval_version()} has no {OFFLINE_TASKS[name].stock}; nbl-ext is tested with "
            "lm-eval 0.4.13 (pip install 'lm-eval==0.4.13')"
        )
    cfg = dict(load_yaml(path, resolve_func=True))
    if cfg.get("task") != name:
        raise RuntimeError(f"{path} defines task {cfg.get('task')!r}, expected {name!r}; unsupported lm-eval version")
    return cfg


def task_manager():
    """A TaskManager for the offline configs: no index of lm-eval's ~10k bundled YAMLs (that takes seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=False)


def offline_task_configs(tasks: list[str], data_dir: str | os.PathLike) -> list[dict]:
    """lm-eval task configs for ``tasks`` that read ``data_dir`` instead of the hub.

    Each is lm-eval's stock config with the dataset source replaced (``custom_dataset``) and
    the splits we do not have removed (zero-shot needs no training documents).
    """
    unknown = [t for t in tasks if t not in OFFLINE_TASKS]
    if unknown:
        raise ValueError(
            f"no offline definition for {', '.join(unknown)}; offline tasks: "
            f"{', '.join(OFFLINE_TASKS)} (drop --data-dir to use the hub versions)"
        )
    root = check_data_dir(data_dir, tasks)
    configs = []
    for name in tasks:
        cfg = stock_task_config(name)
        split = OFFLINE_TASKS[name].split
        for key in ("training_split", "validation_split", "test_split"):
            cfg[key] = split if key.split("_")[0] == {"validation": "validation", "test": "test"}[split] else None
        cfg["fewshot_split"] = None
        cfg.update(
            custom_dataset=_dataset_loader(name),
            dataset_path=f"nbl-offline:{root / name}",
            dataset_kwargs={"nbl_data_dir": str(root)},
        )
        configs.append(cfg)
    return configs


def _lm_eval_version() -> str:
    try:
        from importlib.metadata import version

        return version("lm_eval")
    except Exception:  # pragma: no cover - metadata missing
        return "?"
