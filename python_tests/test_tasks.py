"""Offline lm-eval tasks: every local file maps onto the hub schema, and lm-eval's own task
definition renders it into the prompts, choices and gold answers the raw file says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from nbl_ext import tasks as T

DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "eval").resolve()
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared eval data not found at {DATA}")

# Item counts from ../shared/data/eval/SOURCES.md (hellaswag: 60252 lines / 6; wikitext: lm-eval's 62 test pages).
COUNTS = {
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "boolq": 3270,
    "hellaswag": 10042,
    "openbookqa": 500,
    "piqa": 1838,
    "winogrande": 1267,
    "lambada_openai": 5153,
    "wikitext": 62,
}


@pytest.fixture(scope="module")
def built():
    """lm-eval Task objects built from our offline configs (one build for the module)."""
    if not DATA.is_dir():
        pytest.skip(f"shared eval data not found at {DATA}")
    configs = T.offline_task_configs(list(T.DEFAULT_TASKS), DATA)
    return T.task_manager().load(configs)["tasks"]


@needs_data
@pytest.mark.parametrize("name", list(T.DEFAULT_TASKS))
def test_every_item_loads(name):
    rows = T.OFFLINE_TASKS[name].load(DATA)
    assert len(rows) == COUNTS[name]


def _first_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8").splitlines()[0])


def _docs(task):
    return list(task.test_docs() if task.has_test_docs() else task.validation_docs())


@needs_data
def test_arc_prompt_choices_and_gold_are_lm_evals(built):
    raw = _first_json(DATA / "arc_easy" / "ARC-Easy-Test.jsonl")
    task = built["arc_easy"]
    doc = _docs(task)[0]
    assert task.doc_to_text(doc) == f"Question: {raw['question']['stem']}\nAnswer:"
    assert task.doc_to_choice(doc) == [c["text"] for c in raw["question"]["choices"]]
    assert task.doc_to_target(doc) == [c["label"] for c in raw["question"]["choices"]].index(raw["answerKey"])
    assert [m["metric"] for m in task.config.metric_list] == ["acc", "acc_norm"]


@needs_data
def test_arc_numeric_labels_and_five_choices(built):
    docs = _docs(built["arc_challenge"])
    numeric = [d for d in docs if d["choices"]["label"][0] == "1"]
    five = [d for d in docs if len(d["choices"]["text"]) == 5]
    assert numeric and len(five) == 3  # SOURCES.md: 3 ARC-C items have 5 choices
    d = numeric[0]
    assert built["arc_challenge"].doc_to_target(d) == d["choices"]["label"].index(d["answerKey"])


@needs_data
def test_boolq_string_labels_become_lm_evals_no_yes(built):
    task = built["boolq"]
    docs = _docs(task)
    raw = [json.loads(line) for line in (DATA / "boolq" / "val.jsonl").read_text().splitlines()[:20]]
    for doc, r in zip(docs, raw):
        assert task.doc_to_text(doc) == f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:"
        assert task.doc_to_choice(doc)[task.doc_to_target(doc)] == ("yes" if r["label"] == "true" else "no")
    assert sum(d["label"] for d in docs) == 2033  # SOURCES.md: 2033 true, 1237 false


@needs_data
def test_hellaswag_query_from_the_six_line_format(built):
    lines = (DATA / "hellaswag" / "hellaswag_val_full.txt").read_text(encoding="utf-8").splitlines()
    task = built["hellaswag"]
    doc = _docs(task)[0]
    assert task.doc_to_text(doc) == lines[0].strip()  # "activity_label: ctx" after lm-eval's preprocess
    assert task.doc_to_choice(doc) == [e.strip() for e in lines[2:6]]
    assert task.doc_to_target(doc) == int(lines[1])
    gold = [int(lines[i + 1]) for i in range(0, len(lines), 6)]
    assert [gold.count(g) for g in range(4)] == [2515, 2485, 2584, 2458]


@needs_data
def test_piqa_and_winogrande_labels_come_from_the_lst_files(built):
    piqa = _docs(built["piqa"])
    labels = (DATA / "piqa" / "valid-labels.lst").read_text().split()
    assert [d["label"] for d in piqa] == [int(x) for x in labels]
    raw = _first_json(DATA / "piqa" / "valid.jsonl")
    assert built["piqa"].doc_to_text(piqa[0]) == f"Question: {raw['goal']}\nAnswer:"
    wino = built["winogrande"]
    doc = _docs(wino)[0]
    blank = doc["sentence"].index("_")
    assert wino.doc_to_choice(doc) == [
        doc["sentence"][:blank] + doc["option1"],
        doc["sentence"][:blank] + doc["option2"],
    ]
    assert wino.doc_to_text(doc) == int((DATA / "winogrande" / "dev-labels.lst").read_text().split()[0]) - 1


@needs_data
def test_lambada_and_wikitext(built):
    lam = built["lambada_openai"]
    doc = _docs(lam)[0]
    words = doc["text"].split(" ")
    assert lam.doc_to_text(doc) == " ".join(words[:-1]) and lam.doc_to_target(doc) == " " + words[-1]
    pages = _docs(built["wikitext"])
    raw = (DATA / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")
    assert raw.startswith(" \n")  # the blank line before the first heading is an empty page, dropped
    assert "\n".join(p["page"] for p in pages) == raw[2:]
    assert pages[0]["page"].lstrip().startswith("= Robert Boulter =")


def test_wikitext_pages_split_at_top_level_headings_only():
    text = " \n = A = \n \n x \n = = Sub = = \n y \n = B = \n z \n"
    pages = T.wikitext_pages(text)
    # the blank line before the first heading is an empty page: dropped, as wikitext_document_level does
    assert pages == [" = A = \n \n x \n = = Sub = = \n y ", " = B = \n z \n"]


def test_unknown_task_and_missing_data_are_clear(tmp_path):
    with pytest.raises(ValueError, match="no offline definition for mmlu"):
        T.offline_task_configs(["mmlu"], tmp_path)
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        T.offline_task_configs(["piqa"], tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="lacks: .*piqa/valid.jsonl"):
        T.offline_task_configs(["piqa"], tmp_path)


def test_malformed_files_name_the_file_and_line(tmp_path):
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n' * 3)
    (tmp_path / "piqa" / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(ValueError, match="2 labels for 3 items"):
        T.OFFLINE_TASKS["piqa"].load(tmp_path)
    (tmp_path / "piqa" / "valid-labels.lst").write_text("0\n1\n7\n")
    with pytest.raises(ValueError, match=r"valid-labels.lst:3: label '7'"):
        T.OFFLINE_TASKS["piqa"].load(tmp_path)
    (tmp_path / "boolq").mkdir()
    (tmp_path / "boolq" / "val.jsonl").write_text('{"question": "q", "passage": "p", "label": "maybe"}\n')
    with pytest.raises(ValueError, match=r"val.jsonl:1: BoolQ label 'maybe'"):
        T.OFFLINE_TASKS["boolq"].load(tmp_path)
    (tmp_path / "hellaswag").mkdir()
    (tmp_path / "hellaswag" / "hellaswag_val_full.txt").write_text("a: b\n0\nx\ny\nz\n")
    with pytest.raises(ValueError, match="6 lines per item"):
        T.OFFLINE_TASKS["hellaswag"].load(tmp_path)
    (tmp_path / "openbookqa").mkdir()
    (tmp_path / "openbookqa" / "test.jsonl").write_text('{"question": {"stem": "s"}}\n')
    with pytest.raises(ValueError, match="test.jsonl:1: record has no 'choices' field"):
        T.OFFLINE_TASKS["openbookqa"].load(tmp_path)
    (tmp_path / "openbookqa" / "test.jsonl").write_text('{"question": {"stem": "s"}}\nnot json\n')
    with pytest.raises(ValueError, match="test.jsonl:2: not valid JSON"):
        T.OFFLINE_TASKS["openbookqa"].load(tmp_path)
