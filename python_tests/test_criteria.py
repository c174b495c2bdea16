"""Selection criteria: the registry, the streamed DROP cosine, selection by name, and the engine's hooks."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

import nbl_ext
from hf_tiny import spy_updates, tiny_model, token_data
from nbl_ext.criteria import get_criterion, register_criterion, unregister_criterion


@pytest.fixture(scope="module")
def result():
    return nbl_ext.calibrate(
        tiny_model("llama", 4, dtype=torch.float64), token_data(3, 40), batch_size=2, progress=False
    )


def test_cosine_is_the_streamed_mean_over_every_token():
    model = tiny_model("qwen3", 3, dtype=torch.float64)
    with spy_updates() as seen:
        r = nbl_ext.calibrate(model, token_data(3, 40), batch_size=2, progress=False)
    per_layer = [seen[2 * i : 2 * i + 2] for i in range(3)]  # 2 batches per layer
    for lc, chunks in zip(r.layers, per_layer):
        x = torch.cat([c[0].reshape(-1, 32) for c in chunks]).float()
        a = torch.cat([c[1].reshape(-1, 32) for c in chunks]).float()
        expected = torch.nn.functional.cosine_similarity(x, x + a, dim=-1).double().mean()
        assert lc.cosine == pytest.approx(float(expected), rel=1e-12)
        assert lc.scores["cosine"] == lc.cosine and lc.scores["cca_bound"] == lc.bound


def test_select_by_name_alias_and_method(result):
    r = result
    assert r.select(2) == r.select(2, "nbl") == r.select(2, criterion="cca_bound") == r.select(2, method="nbl")
    assert r.select(2, "drop") == r.select(2, criterion="cosine") == r.select(2, method="drop")
    assert set(r.select(2, "drop")) == set(sorted(range(4), key=lambda i: -r.cosines[i])[:2])
    assert set(r.select(2, "nmse")) == set(sorted(range(4), key=lambda i: r.nmse[i])[:2])
    assert r.rank("cca_bound") == sorted(range(4), key=lambda i: (r.bounds[i], i))
    with pytest.raises(ValueError, match=r"unknown selection criterion 'cka'; known criteria: .*cca_bound.*cosine"):
        r.select(1, criterion="cka")
    with pytest.raises(ValueError, match="unknown selection criterion"):
        get_criterion(None)


def test_a_new_criterion_is_one_function_and_one_registration():
    def energy_ratio(ctx):  # the branch's energy relative to its input's
        return float(ctx.accumulator.cov_yy.trace() / ctx.accumulator.cov_xx.trace())

    def max_abs(x, a):
        return a.abs().amax(dim=-1).double()

    register_criterion("energy_ratio", energy_ratio, direction="lower")
    register_criterion(
        "branch_peak", lambda ctx: ctx.token_means["branch_peak"], direction="lower", token_statistic=max_abs
    )
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_criterion("energy_ratio", energy_ratio, direction="lower")
        with pytest.raises(ValueError, match="direction"):
            register_criterion("other", energy_ratio, direction="down")
        with pytest.raises(ValueError, match="needs"):
            register_criterion("other", energy_ratio, direction="lower", needs=("tokenizer",))
        model = tiny_model("llama", 3, dtype=torch.float64)
        with spy_updates() as seen:
            r = nbl_ext.calibrate(model, token_data(2, 40), progress=False)
        for i, lc in enumerate(r.layers):
            x, a = seen[2 * i][0].reshape(-1, 32), seen[2 * i][1].reshape(-1, 32)
            x2, a2 = seen[2 * i + 1][0].reshape(-1, 32), seen[2 * i + 1][1].reshape(-1, 32)
            ratio = float(torch.cat([a, a2]).var(0).sum() / torch.cat([x, x2]).var(0).sum())
            assert lc.scores["energy_ratio"] == pytest.approx(ratio, rel=1e-9)
            peak = float(torch.cat([a, a2]).abs().amax(-1).mean())
            assert lc.scores["branch_peak"] == pytest.approx(peak, rel=1e-12)
        assert r.select(1, "energy_ratio") == [min(range(3), key=lambda i: r.layers[i].scores["energy_ratio"])]
    finally:
        unregister_criterion("energy_ratio")
        unregister_criterion("branch_peak")
    with pytest.raises(ValueError, match="unknown selection criterion 'energy_ratio'"):
        get_criterion("energy_ratio")


def test_a_criterion_that_needs_held_out_tokens_is_left_to_whoever_has_them():
    register_criterion("holdout_size", lambda ctx: float(ctx.holdout.numel()), direction="lower", needs=("holdout",))
    try:
        r = nbl_ext.calibrate(tiny_model("llama", 2), token_data(2, 40), progress=False)
        assert "holdout_size" not in r.layers[0].scores and "cca_bound" in r.layers[0].scores
        with pytest.raises(ValueError, match="'holdout_size' was not scored for decoder layer 0 .*needs holdout"):
            r.select(1, "holdout_size")
    finally:
        unregister_criterion("holdout_size")


def test_calibrate_takes_an_accumulator_factory_and_a_phase_timer():
    from nbl_ext.stats import CovarianceAccumulator

    made, phases = [], []

    def factory(dim_x, dim_y, *, device, precision):
        made.append((dim_x, dim_y, precision))
        return CovarianceAccumulator(dim_x, dim_y, device=device, precision=precision)

    @contextlib.contextmanager
    def timer(phase):
        phases.append(phase)
        yield

    model = tiny_model("llama", 3, dtype=torch.float64)
    data = token_data(3, 40)
    plain = nbl_ext.calibrate(model, data, batch_size=2, progress=False)
    timed = nbl_ext.calibrate(
        model, data, batch_size=2, progress=False, accumulator_factory=factory, timer=timer, gram_precision="bfloat16"
    )
    assert made == [(32, 32, "bfloat16")] * 3
    assert phases == (["accumulate"] * 2 + ["score"]) * 3  # 2 batches per layer, then its fit and scores
    assert [lc.cosine for lc in timed.layers] == [lc.cosine for lc in plain.layers]


def test_replacement_is_apart_from_the_criterion(result):
    model = tiny_model("llama", 4, dtype=torch.float64)
    layers = result.select(2, "drop")
    by_name = nbl_ext.linearize(copy.deepcopy(model), result, layers, replacement="remove")
    by_method = nbl_ext.linearize(copy.deepcopy(model), result, layers, method="drop")
    assert by_name.config.nbl == by_method.config.nbl and by_name.config.nbl["method"] == "drop"
    affine = nbl_ext.linearize(copy.deepcopy(model), result, layers, replacement="affine")  # DROP's layers, NBL's map
    assert affine.config.nbl["method"] == "nbl"
    ids = token_data(1, 12, seed=5)
    with torch.no_grad():
        assert not torch.equal(affine(ids).logits, by_name(ids).logits)
    with pytest.raises(ValueError, match="replacement must be one of"):
        nbl_ext.linearize(copy.deepcopy(model), result, layers, replacement="prune")
    with pytest.raises(ValueError, match="method='drop' means replacement='remove'"):
        nbl_ext.linearize(copy.deepcopy(model), result, layers, method="drop", replacement="affine")
