"""The study page's healing section (scripts/selection_report.py): computed from the raw JSON alone."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
pytest.importorskip("matplotlib")
import selection_report

TASKS = selection_report.TASKS7


def _point(ppl_wt2: float, ppl_c4: float, correct: list[int], **extra) -> dict:
    # four windows of 100 tokens whose mean NLL gives the perplexity, with a little spread for the s.e.
    def corpus(ppl):
        nll = math.log(ppl)
        return {"ppl": ppl, "window_nll": [[(nll + e) * 100, 100] for e in (-0.01, 0.0, 0.01, 0.0)]}

    tasks = {t: {"acc": sum(correct) / len(correct), "n": len(correct), "correct": correct} for t in TASKS}
    return {"wikitext2": corpus(ppl_wt2), "c4": corpus(ppl_c4), "tasks": tasks, **extra}


def _heal_data() -> dict:
    right = [1, 0] * 20
    healing = {"steps": 12, "best_step": 9, "train_tokens": 98304, "seconds": 700.0}
    return {
        "setup": {"commit": "abc1234", "device": "cpu"},
        "models": {
            "m": {
                "num_layers": 30,
                "points": {
                    "original": _point(20.0, 40.0, right, k=0),
                    "nbl/k12/none": _point(60.0, 80.0, right, k=12, method="nbl", heal=None),
                    "nbl/k12/lora": _point(30.0, 70.0, right, k=12, method="nbl", heal="lora", healing=healing),
                    "drop/k12/none": _point(90.0, 120.0, right, k=12, method="drop", heal=None),
                    "drop/k12/lora": _point(85.0, 110.0, right, k=12, method="drop", heal="lora", healing=healing),
                },
            }
        },
    }


def test_healing_section_states_the_targets_from_the_numbers():
    text = "\n".join(selection_report.healing_section(_heal_data()))
    # WikiText-2: (60 - 30) / (60 - 20) = 75% recovered; C4: (80 - 70) / (80 - 40) = 25%
    assert "NBL + lora, WikiText-2: recovered 75% of the perplexity gap" in text
    assert "**met**" in text
    assert "NBL + lora, held-out C4: recovered 25% of the perplexity gap" in text
    assert "**missed by 25% of the gap**" in text
    assert "NBL + distill: not run yet" in text
    assert "| nbl/k12/lora | 30.00 | 70.00 | 75% / 25% |" in text
    assert "7-task accuracy: +0.0000 ± 0.0000 against unhealed (not worse beyond noise)" in text
    assert "NBL healed with lora against DROP healed with LoRA (drop/k12/lora), held-out C4: 70.00 vs 110.00" in text


def test_a_healed_model_worse_than_unhealed_is_a_miss():
    data = _heal_data()
    pts = data["models"]["m"]["points"]
    pts["nbl/k12/lora"]["c4"] = _point(1, 90.0, [1])["c4"]  # worse than unhealed (80)
    text = "\n".join(selection_report.healing_section(data))
    assert "held-out C4: recovered -25% of the perplexity gap" in text
    assert "missed: worse than unhealed by +0.1178" in text


def test_missing_names_what_the_study_has_not_run():
    rec = {
        "num_layers": 30,
        "truth": {"nll": [0.1]},
        "criteria": {c: {} for c in ("cca_bound", "cosine", "cv_nmse", "residual_ratio", "direct_nll", "direct_kl")},
        "ppl": {"original": {}},
        "overfit": {f"c4/{s}/{r}": {} for s in ("8k", "32k", "all") for r in ("ridge0", "validated")},
        "accuracy": {"original": {}, "direct_kl/k6": {}},
    }
    out = selection_report.missing("m", rec, "direct_kl", speed_run=True)
    assert out == [
        "criteria greedy",
        "overfit points self/validated",
        "accuracy points cca_bound/k6, drop/k6, direct_kl/k12, cca_bound/k12, drop/k12",
    ]
    rec["criteria"]["greedy"] = {"chosen": [4, 9, 2]}
    rec["ppl"] = {"original": {}, **{f"{c}/k{k}": {"k": k} for c in ("direct_kl", "drop") for k in (3, 6)}}
    rec["ppl"]["greedy/k3"] = {"k": 3}
    rec["overfit"]["self/validated"] = {}
    rec["accuracy"] = {k: {} for k in ("original", "drop/k6", "direct_kl/k12", "cca_bound/k12", "drop/k12")}
    rec["accuracy"]["cca_bound/k6"] = rec["accuracy"]["direct_kl/k6"] = {}
    assert selection_report.missing("m", rec, "direct_kl", speed_run=True) == [
        "perplexity points cca_bound/k3, cv_nmse/k3, residual_ratio/k3, direct_nll/k3, cca_bound/k6, "
        "cv_nmse/k6, residual_ratio/k6, direct_nll/k6, greedy/k6 (greedy ran 3 steps)",
    ]
    assert selection_report.missing("m", {"num_layers": 30}, "direct_kl", speed_run=False) == [
        "truth",
        "criteria",
        "ppl",
        "overfit",
        "accuracy",
        "speed",
    ]


def test_the_target_counts_the_variant_with_the_lowest_early_stopping_loss_not_the_best_test_ppl():
    data = _heal_data()
    pts = data["models"]["m"]["points"]
    right = [1, 0] * 20
    pts["nbl/k12/lora"]["healing"] = {**pts["nbl/k12/lora"]["healing"], "heldout_loss_after": 3.0}
    # better on the test data (C4 50 against 70) but worse on the early-stopping documents: not chosen
    healing = {**pts["nbl/k12/lora"]["healing"], "heldout_loss_after": 3.5}
    pts["nbl/k12/lora@lr0.001"] = _point(25.0, 50.0, right, k=12, method="nbl", heal="lora", healing=healing)

    text = "\n".join(selection_report.healing_section(data))
    assert "- NBL + lora: nbl/k12/lora counts (of nbl/k12/lora, nbl/k12/lora@lr0.001)" in text
    assert "NBL + lora, held-out C4: recovered 25% of the perplexity gap" in text
    assert "| nbl/k12/lora@lr0.001 | 25.00 | 50.00 | 88% / 75% |" in text  # the table shows every variant
    pts["nbl/k12/lora@lr0.001"]["healing"]["heldout_loss_after"] = 2.5
    text = "\n".join(selection_report.healing_section(data))
    assert "- NBL + lora: nbl/k12/lora@lr0.001 counts" in text
    assert "NBL + lora, held-out C4: recovered 75% of the perplexity gap" in text


def test_paired_differences_refuse_points_measured_on_other_windows_or_items():
    a = _point(20.0, 40.0, [1, 0] * 20)
    b = _point(20.0, 40.0, [1, 0] * 20)
    b["c4"]["window_nll"] = b["c4"]["window_nll"] * 2  # twice the windows: another --ppl-tokens
    with pytest.raises(ValueError, match="needs the same windows: 4 windows .* against 8"):
        selection_report.paired_nll(a, b, "c4")
    b = _point(20.0, 40.0, [1, 0] * 25)  # 50 items per task against 40
    with pytest.raises(ValueError, match="needs the same items: 40 against 50"):
        selection_report.paired_acc7(a, b)
