"""NBLConfig (validated, one serializer) and nbl_ext.compress (calibrate -> select -> linearize)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import nbl_ext
from hf_tiny import tiny_model, token_data
from nbl_ext import NBLConfig


def test_config_round_trips_and_normalizes():
    c = NBLConfig(criterion="drop", k=2, replacement="remove", num_samples=3, seq_len=40, holdout=0)
    assert c.criterion == "cosine" and c.holdout == 0.0
    d = c.to_dict()
    assert d["config_version"] == 1 and json.loads(json.dumps(d)) == d
    assert NBLConfig.from_dict(d) == c
    explicit = NBLConfig(layers=[3, 1], k=2)
    assert explicit.layers == (1, 3) and NBLConfig.from_dict(explicit.to_dict()) == explicit
    with pytest.raises(ValueError, match=r"unknown keys \['method'\]"):
        NBLConfig.from_dict({**d, "method": "drop"})
    assert NBLConfig.from_dict({**d, "method": "drop"}, strict=False) == c
    with pytest.raises(ValueError, match="unsupported config_version 9"):
        NBLConfig.from_dict({**d, "config_version": 9})


@pytest.mark.parametrize(
    "kwargs,exc,msg",
    [
        (dict(criterion="cka"), ValueError, "unknown selection criterion 'cka'; known criteria: cca_bound"),
        (dict(k=-1), ValueError, "k must be >= 0"),
        (dict(k=1.5), TypeError, "k must be an int"),
        (dict(layers=[1, 1]), ValueError, "layers must be unique"),
        (dict(layers=[0, 1], k=3), ValueError, "k=3 but 2 layers"),
        (dict(layers="01"), TypeError, "list of layer indices"),
        (dict(replacement="prune"), ValueError, "replacement must be one of 'affine', 'remove'"),
        (dict(replacement="remove", refit="sequential"), ValueError, "applies to replacement='affine' only"),
        (dict(refit="parallel"), ValueError, "refit must be one of"),
        (dict(ridge=-1.0), ValueError, "ridge must be a finite number >= 0"),
        (dict(num_samples=0), ValueError, "num_samples must be >= 1"),
        (dict(seq_len=1), ValueError, "seq_len must be >= 2"),
        (dict(batch_size=True), TypeError, "batch_size must be an int"),
        (dict(gram_precision="fp8"), ValueError, "gram_precision must be one of 'float32', 'bfloat16'"),
        (dict(activations="gpu"), ValueError, "activations must be one of 'auto', 'memory', 'disk'"),
        (dict(holdout=1.0), ValueError, r"holdout must be None or a fraction in \[0, 1\)"),
    ],
)
def test_config_errors_are_clear(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        NBLConfig(**kwargs)


def test_fit_options_resolve_folds_and_the_ridge_grid():
    from nbl_ext.crossval import DEFAULT_FOLDS, DEFAULT_RIDGES

    assert NBLConfig(num_samples=3).fit_options == {"ridge": NBLConfig().ridge, "folds": 3, "ridges": DEFAULT_RIDGES}
    assert NBLConfig(num_samples=64).fit_options["folds"] == DEFAULT_FOLDS
    assert NBLConfig(folds=1, ridges=None, ridge=0.01).fit_options == {"ridge": 0.01, "folds": 1, "ridges": None}


@pytest.mark.parametrize("criterion,replacement", [("cca_bound", "affine"), ("cosine", "remove")])
def test_compress_is_calibrate_select_linearize(criterion, replacement, tmp_path):
    model = tiny_model("llama", 4, dtype=torch.float64)
    data = token_data(3, 40)
    config = NBLConfig(criterion=criterion, k=2, replacement=replacement, num_samples=3, seq_len=40, batch_size=2)
    compressed, result = nbl_ext.compress(copy.deepcopy(model), data, config)
    by_hand = copy.deepcopy(model)
    ref = nbl_ext.calibrate(
        by_hand, data, batch_size=2, progress=False, folds=config.calibration_folds, ridges=config.calibration_ridges
    )  # the default: validated ridges
    nbl_ext.linearize(by_hand, ref, ref.select(2, criterion), replacement=replacement)
    assert result.bounds == ref.bounds and compressed.config.nbl["layers"] == ref.select(2, criterion)
    ids = token_data(1, 12, seed=4)
    with torch.no_grad():
        assert torch.equal(compressed(ids).logits, by_hand(ids).logits)
    assert NBLConfig.from_dict(compressed.config.nbl["config"]) == config
    nbl_ext.save_pretrained(compressed, tmp_path / "ckpt")
    loaded = nbl_ext.load_pretrained(tmp_path / "ckpt")
    assert loaded.config.nbl == compressed.config.nbl  # the config survives the checkpoint
    raw = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    raw["nbl"]["config"]["criterion"] = "cka"
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="nbl.config is not a valid NBLConfig.*unknown selection criterion"):
        nbl_ext.load_pretrained(tmp_path / "ckpt")


def test_compress_defaults_and_bad_input():
    model = tiny_model("llama", 4, dtype=torch.float64)
    # the default criterion scores layers on held-out rows: 2 calibration + 4 selection sequences
    config = NBLConfig(num_samples=2, seq_len=40)
    compressed, result = nbl_ext.compress(copy.deepcopy(model), token_data(6, 40), config)
    assert len(compressed.config.nbl["layers"]) == 1  # a quarter of 4 layers
    assert compressed.config.nbl["config"]["k"] == 1
    assert result.layers[0].tokens == 2 * 40  # the maps saw the 2 calibration rows only
    assert compressed.config.nbl["config"]["criterion"] == NBLConfig().criterion
    with pytest.raises(ValueError, match=r"shape \(2, 40\) but the config says num_samples x seq_len = \(16, 256\)"):
        nbl_ext.compress(copy.deepcopy(model), token_data(2, 40))
    with pytest.raises(ValueError, match=r"or 6 rows: the last selection_samples=4 are the held-out"):
        nbl_ext.compress(copy.deepcopy(model), token_data(5, 40), config)
    with pytest.raises(ValueError, match="k=5 is more than the model's 4 layers"):
        nbl_ext.compress(copy.deepcopy(model), token_data(2, 40), NBLConfig(k=5, num_samples=2, seq_len=40))
    with pytest.raises(TypeError, match="needs tokenizer="):
        nbl_ext.compress(copy.deepcopy(model), "self", NBLConfig(num_samples=2, seq_len=40))
    with pytest.raises(TypeError, match="config must be an NBLConfig"):
        nbl_ext.compress(copy.deepcopy(model), token_data(2, 40), {"k": 1})


def test_compress_scores_heldout_criteria_on_selection_tokens_only():
    """direct_nll: the chosen layer is the one whose replacement costs the least NLL on ``selection``; the
    maps are fitted on ``data`` alone (the same as a statistics criterion's)."""
    from nbl_ext.selection import layer_nll_increases

    model = tiny_model("llama", 4, dtype=torch.float64, seed=2)
    data, sel = token_data(3, 40), token_data(2, 40, seed=7)
    config = NBLConfig(criterion="direct_nll", k=1, num_samples=3, seq_len=40, folds=1, ridges=None, ridge=1e-3)
    assert config.needs_selection and not NBLConfig(criterion="cv_nmse").needs_selection
    assert NBLConfig(criterion="greedy").needs_selection and not config.replace(layers=[1], k=None).needs_selection
    compressed, result = nbl_ext.compress(copy.deepcopy(model), data, config, selection=sel)
    ref = nbl_ext.calibrate(model, data, progress=False, ridge=1e-3)
    _, inc = layer_nll_increases(model, {lc.layer: (lc.weight, lc.bias) for lc in ref.layers}, sel)
    assert [lc.scores["direct_nll"] for lc in result.layers] == pytest.approx([inc[i] for i in range(4)], rel=1e-9)
    assert compressed.config.nbl["layers"] == [min(inc, key=inc.get)]
    assert compressed.config.nbl["config"]["criterion"] == "direct_nll"
    with pytest.raises(ValueError, match="criterion 'direct_nll' scores layers on held-out tokens; .*pass selection="):
        nbl_ext.compress(copy.deepcopy(model), data, config)
    with pytest.raises(ValueError, match=r"compress\(selection\): token ids must lie in"):
        nbl_ext.compress(copy.deepcopy(model), data, config, selection=sel + 10**6)
    with pytest.raises(ValueError, match="selection_samples must be"):
        NBLConfig(selection_samples=0)


def test_compress_with_greedy_keeps_the_refitted_maps():
    model = tiny_model("llama", 4, dtype=torch.float64, seed=3)
    data, sel = token_data(4, 24), token_data(3, 20, seed=11)
    config = NBLConfig(criterion="greedy", k=2, num_samples=4, seq_len=24, batch_size=2, folds=2)
    compressed, result = nbl_ext.compress(copy.deepcopy(model), data, config, selection=sel)
    g = nbl_ext.greedy_selection(model, data, steps=2, heldout=sel, batch_size=2, folds=2, ridges=config.ridges)
    assert compressed.config.nbl["layers"] == sorted(g.chosen)
    assert result.select(2, "greedy") == sorted(g.chosen)
    for i in g.chosen:  # the second choice's map was fitted with the first one linearized
        torch.testing.assert_close(result.layers[i].weight, g.maps[i].weight, rtol=0, atol=0)
    first, second = g.chosen
    plain = nbl_ext.calibrate(model, data, progress=False, folds=2, ridges=config.ridges).layers[second].weight
    if second > first:  # its inputs changed when `first` was linearized: the re-fit differs
        assert not torch.allclose(result.layers[second].weight, plain)
    else:  # an earlier layer's inputs do not depend on `first`
        torch.testing.assert_close(result.layers[second].weight, plain)
