"""Validated fits and layer selection on tiny random models: calibrate's folds (closed form against the maps
applied to the held-out fold's activations), ridge choice, resume and batching with folds, the criteria that
need the model (direct_nll against linearize, greedy against an explicit oracle), determinism, bad inputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import nbl_ext
from hf_tiny import FAMILIES, tiny_model, token_data
from nbl_ext.criteria import criterion_names
from nbl_ext.crossval import DEFAULT_RIDGES
from nbl_ext.linearize import is_linearized
from nbl_ext.selection import heldout_nll, layer_damage, layer_nll_increases

RIDGES = [0.0, 1e-3, 1e-1, 1.0, 10.0]
K = 3


def _activations(model, data):
    """Per layer, per sample: (X, A) of the attention branch, from the model's own full forward (float64)."""
    adapter = nbl_ext.get_adapter(model)
    got = {i: [] for i in range(adapter.num_layers)}
    hooks = []
    for i, layer in enumerate(adapter.layers()):
        module, pick = adapter.branch_output(layer)
        xs = []
        hooks.append(
            layer.register_forward_pre_hook(
                lambda m, args, kwargs, xs=xs: xs.append(kwargs.get("hidden_states", args[0] if args else None)),
                with_kwargs=True,
            )
        )
        hooks.append(
            module.register_forward_hook(
                lambda m, a, out, i=i, xs=xs, pick=pick: got[i].append((xs.pop()[0].detach(), pick(out)[0].detach()))
            )
        )
    try:
        with torch.no_grad():
            for row in data:
                model(row[None], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return got


@pytest.fixture(scope="module")
def folded():
    model = tiny_model("llama", 3, dtype=torch.float64)
    data = token_data(7, 24)  # 7 samples over 3 folds: 3 + 2 + 2
    result = nbl_ext.calibrate(model, data, batch_size=3, progress=False, folds=K, ridges=RIDGES)
    return model, data, result


def test_cv_nmse_equals_the_per_fold_maps_applied_to_the_heldout_fold(folded):
    model, data, result = folded
    acts = _activations(model, data)
    assert result.metadata["folds"] == K and result.metadata["ridges"] == RIDGES
    for i, lc in enumerate(result.layers):
        per_sample = acts[i]
        err = torch.zeros(len(RIDGES), dtype=torch.float64)
        target, stream = 0.0, 0.0
        for j in range(K):
            test = [n for n in range(len(per_sample)) if n % K == j]
            train = nbl_ext.CovarianceAccumulator(32, 32)
            for n in range(len(per_sample)):
                if n % K != j:
                    train.update(*per_sample[n])
            xt = torch.cat([per_sample[n][0] for n in test])
            at = torch.cat([per_sample[n][1] for n in test])
            target += float(((at - at.mean(0)) ** 2).sum())
            stream += float(((xt + at) ** 2).sum())
            for r, ridge in enumerate(RIDGES):
                w, b = nbl_ext.fit_linear(train, ridge)
                err[r] += float(((at - xt @ w.T - b) ** 2).sum())  # the fold's map on the held-out activations
        curve = err / target
        assert lc.cv_curve == pytest.approx(curve.tolist(), rel=1e-7)
        best = max(r for r in range(len(RIDGES)) if curve[r] == curve.min())
        assert lc.ridge == RIDGES[int(curve.argmin())] == RIDGES[best]
        assert lc.scores["cv_nmse"] == pytest.approx(float(curve.min()), rel=1e-7)
        assert lc.scores["residual_ratio"] == pytest.approx(float(err[int(curve.argmin())]) / stream, rel=1e-7)
        # The final map: all samples, the chosen ridge; its in-sample NMSE at that ridge.
        full = nbl_ext.CovarianceAccumulator(32, 32)
        for x, a in per_sample:
            full.update(x, a)
        w, b = nbl_ext.fit_linear(full, lc.ridge)
        torch.testing.assert_close(lc.weight, w, rtol=1e-6, atol=1e-9)
        assert lc.nmse == pytest.approx(nbl_ext.lmmse_nmse(full, w, b), rel=1e-6)
        assert lc.scores["cv_nmse"] > lc.nmse  # held out is worse than in sample at 168 tokens for 33 x 32


def test_folds_do_not_depend_on_the_batch_size_and_save_and_load(folded, tmp_path):
    model, data, result = folded
    other = nbl_ext.calibrate(model, data, batch_size=2, progress=False, folds=K, ridges=RIDGES)
    for a, b in zip(result.layers, other.layers):
        assert a.ridge == b.ridge and a.cv_curve == pytest.approx(b.cv_curve, rel=1e-9)
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-9, atol=1e-11)
    result.save(tmp_path / "cal")
    rows = json.loads((tmp_path / "cal" / "calibration.json").read_text())["layers"]
    assert {"ridge", "cv_curve", "cv_nmse", "residual_ratio"} <= set(rows[0])
    loaded = nbl_ext.CalibrationResult.load(tmp_path / "cal")
    assert [lc.ridge for lc in loaded.layers] == [lc.ridge for lc in result.layers]
    assert loaded.select(2, "cv_nmse") == result.select(2, "cv_nmse")
    assert loaded.table()[0]["cv_curve"] == result.layers[0].cv_curve


def test_without_folds_nothing_changes_and_cv_criteria_say_what_they_need(tmp_path):
    model = tiny_model("llama", 2)
    plain = nbl_ext.calibrate(model, token_data(3, 16), progress=False)
    assert plain.metadata["folds"] == 1 and plain.metadata["ridges"] is None
    assert all(lc.ridge is None and lc.cv_curve is None and "cv_nmse" not in lc.scores for lc in plain.layers)
    plain.save(tmp_path / "cal")
    row = json.loads((tmp_path / "cal" / "calibration.json").read_text())["layers"][0]
    assert set(row) == {"layer", "bound", "nmse", "cosine", "tokens"}  # today's format
    with pytest.raises(ValueError, match=r"'cv_nmse' was not scored .*folds: calibrate\(\.\.\., folds=K >= 2\)"):
        plain.select(1, "cv_nmse")
    # One fixed ridge with folds: the cross-validated NMSE at that ridge, no curve.
    fixed = nbl_ext.calibrate(model, token_data(3, 16), progress=False, folds=3, ridge=1e-2)
    assert all(lc.ridge == 1e-2 and lc.cv_curve is None and lc.scores["cv_nmse"] > 0 for lc in fixed.layers)


def test_resume_with_folds_keeps_the_chosen_ridges(tmp_path):
    model = tiny_model("llama", 3)
    data = token_data(4, 24)
    ref = nbl_ext.calibrate(model, data, batch_size=2, progress=False, folds=2, ridges=RIDGES)

    def boom(*_):
        raise RuntimeError("killed")

    handle = model.model.layers[2].self_attn.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="killed"):
        nbl_ext.calibrate(model, data, batch_size=2, progress=False, output_dir=tmp_path, folds=2, ridges=RIDGES)
    handle.remove()
    with pytest.raises(ValueError, match="folds.*differ"):
        nbl_ext.calibrate(model, data, batch_size=2, progress=False, output_dir=tmp_path, folds=3, ridges=RIDGES)
    resumed = nbl_ext.calibrate(model, data, batch_size=2, progress=False, output_dir=tmp_path, folds=2, ridges=RIDGES)
    for a, b in zip(ref.layers, resumed.layers):
        assert (a.ridge, a.cv_curve, a.scores) == (b.ridge, b.cv_curve, b.scores)
        assert torch.equal(a.weight, b.weight)


def test_folds_and_ridges_bad_inputs_are_clear_errors():
    model = tiny_model("llama", 2)
    data = token_data(3, 16)
    for kwargs, msg in (
        (dict(folds=4), r"folds=4 is more than the 3 calibration samples"),
        (dict(folds=0), "folds must be a positive int"),
        (dict(folds=2.0), "folds must be a positive int"),
        (dict(ridges=RIDGES), "needs cross-validation folds; pass folds >= 2"),
        (dict(folds=2, ridges=RIDGES, ridge=0.1), "either ridge=0.1 .* or a ridges= grid"),
        (dict(folds=2, ridges=[1e-2, 1e-3]), "calibrate: ridges must be strictly increasing"),
        (dict(folds=2, ridges="0.1"), "ridges must be a sequence of numbers"),
        (dict(ridge=-1.0), "ridge must be a finite number >= 0"),
    ):
        with pytest.raises(ValueError, match=msg):
            nbl_ext.calibrate(model, data, progress=False, **kwargs)


def test_registry_lists_the_new_criteria_and_select_checks_k(folded):
    _, _, result = folded
    names = criterion_names()
    assert {"cca_bound", "nbl", "cosine", "drop", "cv_nmse", "residual_ratio", "direct_nll", "greedy"} <= set(names)
    with pytest.raises(
        ValueError,
        match=r"unknown selection criterion 'best'; known criteria: .*cv_nmse.*direct_nll"
        r".*greedy.*residual_ratio",
    ):
        result.select(1, "best")
    with pytest.raises(
        ValueError,
        match=r"'direct_nll' was not scored .*needs model, holdout\); score it with "
        r"nbl_ext.score_criteria\(model, result, 'direct_nll'",
    ):
        result.select(1, "direct_nll")
    with pytest.raises(ValueError, match=r"between 0 and the number of layers \(3\), got 4"):
        result.select(4, "cv_nmse")
    assert result.rank("residual_ratio") == sorted(
        range(3), key=lambda i: (result.layers[i].scores["residual_ratio"], i)
    )


def test_direct_nll_is_the_heldout_nll_increase_of_each_layer_linearized_alone(folded):
    model, _, result = folded
    result = copy.deepcopy(result)
    heldout = token_data(3, 20, seed=11)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = nbl_ext.score_criteria(model, result, "direct_nll", heldout=heldout, batch_size=2)["direct_nll"]
    base = heldout_nll(model, heldout)
    for i in range(3):
        lin = nbl_ext.linearize(copy.deepcopy(model), result, [i])
        assert scores[i] == pytest.approx(heldout_nll(lin, heldout) - base, rel=1e-9, abs=1e-12)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)  # unchanged
    assert not any(is_linearized(layer) for layer in model.model.layers)
    assert result.select(1, "direct_nll") == [min(range(3), key=lambda i: scores[i])]
    again = nbl_ext.score_criteria(model, copy.deepcopy(result), ["direct_nll"], heldout=heldout, batch_size=2)[
        "direct_nll"
    ]
    assert again == scores  # deterministic
    with pytest.raises(ValueError, match=r"'direct_nll' needs heldout="):
        nbl_ext.score_criteria(model, result, "direct_nll")
    with pytest.raises(ValueError, match="unknown selection criterion 'nll'"):
        nbl_ext.score_criteria(model, result, "nll", heldout=heldout)


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_nll_increases_resume_from_the_cached_layer_outputs(family):
    """The prefix-cached scores equal full forwards of models built by linearize, for every layer (layer 0,
    whose variant has no cached input, and the last) and every family (Gemma 3: per-layer masks and RoPE)."""
    model = tiny_model(family, 4, dtype=torch.float64, seed=5)
    data, heldout = token_data(6, 24), token_data(5, 20, seed=12)  # 5 samples, batch 2: a short last batch
    result = nbl_ext.calibrate(model, data, batch_size=3, progress=False)
    maps = {lc.layer: (lc.weight, lc.bias) for lc in result.layers}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base, inc = layer_nll_increases(model, maps, heldout, batch_size=2)
    assert base == pytest.approx(heldout_nll(model, heldout), rel=1e-12)
    for i in range(4):
        lin = nbl_ext.linearize(copy.deepcopy(model), result, [i])
        assert inc[i] == pytest.approx(heldout_nll(lin, heldout) - base, rel=1e-9, abs=1e-12), i
        assert abs(inc[i]) > 1e-8  # random maps of a random model: every layer costs something
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [type(m) for m in model.model.layers] == [type(model.model.layers[0])] * 4  # layers put back
    # a subset, in any order, scores the same; a layer already linearized is refused
    assert layer_nll_increases(model, {3: maps[3], 1: maps[1]}, heldout, batch_size=2)[1] == pytest.approx(
        {1: inc[1], 3: inc[3]}, rel=1e-12
    )
    lin = nbl_ext.linearize(copy.deepcopy(model), result, [2])
    with pytest.raises(ValueError, match="decoder layer 2 is already linearized"):
        layer_nll_increases(lin, {2: maps[2]}, heldout)


def _kl_reference(p_model, q_model, ids):
    """Mean KL(p || q) of the next-token distributions over every predicted position, float64."""
    with torch.no_grad():
        lp = torch.log_softmax(p_model(ids, use_cache=False).logits[:, :-1].double(), -1)
        lq = torch.log_softmax(q_model(ids, use_cache=False).logits[:, :-1].double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_direct_kl_is_the_divergence_from_the_original(family):
    model = tiny_model(family, 3, dtype=torch.float64, seed=4)
    data, heldout = token_data(6, 24), token_data(3, 20, seed=13)
    result = nbl_ext.calibrate(model, data, batch_size=3, progress=False)
    damage = layer_damage(model, {lc.layer: (lc.weight, lc.bias) for lc in result.layers}, heldout, batch_size=2)
    assert damage.tokens == 3 * 19
    for i in range(3):
        lin = nbl_ext.linearize(copy.deepcopy(model), result, [i])
        assert damage.kl[i] == pytest.approx(_kl_reference(model, lin, heldout), rel=1e-9)
        assert damage.kl[i] > 0
    # the registered criterion: both direct scores from one scoring call, stored in the result
    scores = nbl_ext.score_criteria(model, result, ["direct_kl", "direct_nll"], heldout=heldout, batch_size=2)
    assert scores["direct_kl"] == pytest.approx([damage.kl[i] for i in range(3)], rel=1e-12)
    assert scores["direct_nll"] == pytest.approx([damage.nll_increase[i] for i in range(3)], rel=1e-9, abs=1e-12)
    assert result.select(1, "direct_kl") == [min(range(3), key=lambda i: damage.kl[i])]
    # a layer scored alone (no maps of the others at hand) gives the same value
    from nbl_ext.criteria import LayerContext, get_criterion

    lc = result.layers[1]
    ctx = LayerContext(layer=1, accumulator=None, weight=lc.weight, bias=lc.bias, model=model, holdout=heldout)
    assert get_criterion("direct_kl").score(ctx) == pytest.approx(damage.kl[1], rel=1e-12)


def test_greedy_refits_on_the_partially_linearized_model_and_differs_from_one_shot():
    """Oracle: step 2's scores are the held-out NLL increases measured on models built by linearize itself."""
    model = tiny_model("llama", 4, dtype=torch.float64, seed=3)
    data, heldout = token_data(4, 24), token_data(3, 20, seed=11)
    result = nbl_ext.calibrate(model, data, batch_size=2, progress=False)
    one_shot = nbl_ext.score_criteria(model, copy.deepcopy(result), "direct_nll", heldout=heldout)["direct_nll"]
    g = nbl_ext.greedy_selection(model, data, steps=2, heldout=heldout, batch_size=2, base="direct_nll")
    assert g.calibration_passes == 2 and g.heldout_passes == (4 + 1) + (3 + 1)
    # Step 1 runs on the original model: its re-fits are the calibration's maps, its scores the one-shot ones.
    assert g.step_scores[0] == pytest.approx(dict(enumerate(one_shot)), rel=1e-9, abs=1e-12)
    first = g.chosen[0]
    assert first == min(range(4), key=lambda i: one_shot[i])
    torch.testing.assert_close(g.maps[first].weight, result.layers[first].weight, rtol=1e-9, atol=1e-12)
    # Step 2: every other layer re-fitted with `first` linearized (sequential refit = that, for later layers).
    base = heldout_nll(nbl_ext.linearize(copy.deepcopy(model), result, [first]), heldout)
    for i in set(range(4)) - {first}:
        if i > first:
            m = nbl_ext.linearize(copy.deepcopy(model), None, [first, i], refit="sequential", data=data, batch_size=2)
        else:  # an earlier layer's inputs do not depend on `first`: its map is the calibration's
            m = nbl_ext.linearize(copy.deepcopy(model), result, [i, first])
        assert g.step_scores[1][i] == pytest.approx(heldout_nll(m, heldout) - base, rel=1e-7, abs=1e-10), i
    assert g.chosen[1] == min(g.step_scores[1], key=g.step_scores[1].get)
    # In this model the greedy pair differs from the one-shot pair (seen: [1, 2] against [0, 1]): with layer 1
    # linearized, layer 2 re-fitted on its new inputs costs less than layer 0, the one-shot runner-up.
    one_shot_pair = sorted(sorted(range(4), key=lambda i: one_shot[i])[:2])
    assert sorted(g.chosen) != one_shot_pair and g.chosen[0] in one_shot_pair
    # As a registered criterion (one step, to stay fast): the greedy order, stored in the result; deterministic.
    scores = nbl_ext.score_criteria(
        model, result, "greedy", data=data, heldout=heldout, steps=1, batch_size=2, base="direct_nll"
    )
    rest = sorted(set(range(4)) - {first}, key=lambda i: g.step_scores[0][i])
    assert sorted(range(4), key=lambda i: scores["greedy"][i]) == [first] + rest
    assert result.select(1, "greedy") == [first]
    with pytest.raises(ValueError, match="steps must be an int between 0 and the number of layers \\(4\\)"):
        nbl_ext.greedy_selection(model, data, steps=5, heldout=heldout)
    with pytest.raises(ValueError, match="base='direct_kl' needs held-out token ids"):
        nbl_ext.greedy_selection(model, data, steps=1)
    # the default base, direct_kl: the first choice is the layer with the smallest KL from the original
    kl = nbl_ext.score_criteria(model, copy.deepcopy(result), "direct_kl", heldout=heldout)["direct_kl"]
    assert nbl_ext.greedy_selection(model, data, steps=1, heldout=heldout).chosen == [
        min(range(4), key=lambda i: kl[i])
    ]
    with pytest.raises(ValueError, match=r"'greedy' needs data="):
        nbl_ext.score_criteria(model, result, "greedy", heldout=heldout)


def test_greedy_with_a_statistics_base_and_folds():
    model = tiny_model("qwen3", 3, dtype=torch.float64)
    data = token_data(4, 24)
    g = nbl_ext.greedy_selection(model, data, steps=3, base="cv_nmse", folds=2, ridges=DEFAULT_RIDGES, batch_size=2)
    assert sorted(g.order) == [0, 1, 2] and g.order[:3] == g.chosen and g.heldout_passes == 0
    result = nbl_ext.calibrate(model, data, batch_size=2, progress=False, folds=2, ridges=DEFAULT_RIDGES)
    assert g.step_scores[0] == pytest.approx({i: lc.scores["cv_nmse"] for i, lc in enumerate(result.layers)}, rel=1e-9)
    assert all(g.maps[i].ridge is not None for i in g.chosen)


def test_nbl_config_holds_the_folds_and_the_ridge_grid():
    c = nbl_ext.NBLConfig(num_samples=3)
    assert c.folds is None and c.calibration_folds == 3 and c.calibration_ridges == DEFAULT_RIDGES
    assert nbl_ext.NBLConfig().calibration_folds == nbl_ext.crossval.DEFAULT_FOLDS
    assert nbl_ext.NBLConfig(folds=1).calibration_ridges is None
    fixed = nbl_ext.NBLConfig(ridges=None, ridge=1e-2, folds=4)
    assert nbl_ext.NBLConfig.from_dict(json.loads(json.dumps(fixed.to_dict()))) == fixed
    assert nbl_ext.NBLConfig.from_dict(c.to_dict()).ridges == DEFAULT_RIDGES
    with pytest.raises(ValueError, match="folds=5 is more than num_samples=4"):
        nbl_ext.NBLConfig(folds=5, num_samples=4)
    with pytest.raises(ValueError, match="ridge=0.1 fixes the ridge.*pass ridges=None"):
        nbl_ext.NBLConfig(ridge=0.1)
    with pytest.raises(ValueError, match="NBLConfig: ridges must be strictly increasing"):
        nbl_ext.NBLConfig(ridges=(1.0, 0.1))


def test_sequential_refit_with_folds_chooses_each_refitted_ridge():
    model = tiny_model("llama", 3, dtype=torch.float64)
    data = token_data(4, 24)
    lin = nbl_ext.linearize(
        copy.deepcopy(model), None, [0, 2], refit="sequential", data=data, batch_size=2, folds=2, ridges=RIDGES
    )
    refit = {r["layer"]: r for r in lin._nbl_calibration_summary["refit"]}
    ref = nbl_ext.calibrate(model, data, batch_size=2, progress=False, folds=2, ridges=RIDGES)
    assert refit[0]["ridge"] == ref.layers[0].ridge and refit[0]["cv_curve"] == pytest.approx(ref.layers[0].cv_curve)
    assert refit[2]["ridge"] in RIDGES and "cv_nmse" in refit[2]
    with pytest.raises(ValueError, match=r"linearize\(refit\): folds=5 is more than the 4 calibration samples"):
        nbl_ext.linearize(copy.deepcopy(model), None, [0], refit="sequential", data=data, folds=5)
