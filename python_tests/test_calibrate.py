"""calibrate(): scores against independent float64 oracles, resume, validation, CalibrationResult I/O."""

from __future__ import annotations

import copy
import json
import tempfile

import numpy as np
import pytest
import torch

import nbl_ext
from hf_tiny import spy_updates, tiny_model, token_data
from nbl_ext import CalibrationResult


def _np(t):
    return t.detach().to(torch.float64).reshape(-1, t.shape[-1]).numpy()


def _np_cca_bound(x, y):
    """sum(1 - rho^2) between x and y, by numpy (whiten with eigh, then SVD)."""
    x, y = x - x.mean(0), y - y.mean(0)
    n = x.shape[0] - 1

    def inv_sqrt(c):
        w, v = np.linalg.eigh(c)
        return v @ np.diag(w**-0.5) @ v.T

    m = inv_sqrt(x.T @ x / n) @ (x.T @ y / n) @ inv_sqrt(y.T @ y / n)
    rho = np.clip(np.linalg.svd(m, compute_uv=False), 0, 1)
    return float((1 - rho**2).sum())


@pytest.fixture(scope="module", params=["llama", "gemma3_text"])
def calibrated64(request):
    """A float64 tiny model, its calibration, and the (X, A) chunks calibration streamed."""
    model = tiny_model(request.param, 3, dtype=torch.float64)
    data = token_data(4, 40)
    with spy_updates() as seen:
        result = nbl_ext.calibrate(model, data, batch_size=2, progress=False)
    xa = [
        (
            torch.cat([_x.reshape(-1, 32) for _x, _ in seen[i * 2 : i * 2 + 2]]),
            torch.cat([_a.reshape(-1, 32) for _, _a in seen[i * 2 : i * 2 + 2]]),
        )
        for i in range(3)
    ]
    return model, result, xa


def test_scores_match_float64_oracles(calibrated64):
    _, result, xa = calibrated64
    assert result.num_layers == 3 and result.metadata["tokens"] == 160
    for i, (x, a) in enumerate(xa):
        lc = result.layers[i]
        assert lc.tokens == 160 and lc.weight.dtype == torch.float64 and lc.weight.device.type == "cpu"
        xn, an = _np(x), _np(a)
        # LMMSE fit == least squares with an intercept
        design = np.concatenate([xn, np.ones((xn.shape[0], 1))], 1)
        coef = np.linalg.lstsq(design, an, rcond=None)[0]
        np.testing.assert_allclose(lc.weight.numpy(), coef[:-1].T, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(lc.bias.numpy(), coef[-1], rtol=1e-6, atol=1e-8)
        # CCA bound between X and X + A; DROP cosine of X and X + A
        assert lc.bound == pytest.approx(_np_cca_bound(xn, xn + an), rel=1e-6)
        cos = (xn * (xn + an)).sum(1) / np.linalg.norm(xn, axis=1) / np.linalg.norm(xn + an, axis=1)
        assert lc.cosine == pytest.approx(cos.mean(), rel=1e-6)


def test_closed_form_nmse_equals_error_of_the_linearized_layer(calibrated64):
    """The NMSE from the moments equals the error of running the linearized layer on the captured X, A."""
    model, result, xa = calibrated64
    lin = nbl_ext.linearize(copy.deepcopy(model), result, [0, 1, 2])
    layers = nbl_ext.get_adapter(lin).layers()
    for i, (x, a) in enumerate(xa):
        with torch.no_grad():
            a_hat = layers[i].nbl_affine(x) - x  # the linearized branch: h + hW^T + b, minus the residual
        measured = float(((a - a_hat) ** 2).sum() / ((a - a.mean(0)) ** 2).sum())
        assert result.layers[i].nmse == pytest.approx(measured, rel=1e-7, abs=1e-12)
        assert 0.0 < measured < 1.0


def test_batch_size_does_not_change_the_result():
    model = tiny_model("qwen3", 2, dtype=torch.float64)
    data = token_data(3, 40)
    r1 = nbl_ext.calibrate(model, data, batch_size=1, progress=False)
    r3 = nbl_ext.calibrate(model, data, batch_size=3, progress=False)
    for a, b in zip(r1.layers, r3.layers):
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-9, atol=1e-10)
        assert a.bound == pytest.approx(b.bound, rel=1e-9) and a.cosine == pytest.approx(b.cosine, rel=1e-12)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_boundaries_in_memory_give_the_same_result_as_on_disk(family, monkeypatch):
    """activations="memory" keeps each layer's outputs on the device instead of a spill directory: same numbers."""
    import nbl_ext.calibrate as cal_mod  # noqa: F401  (the module; nbl_ext.calibrate is also the function)

    model = tiny_model(family, 3, dtype=torch.float64)
    data = token_data(3, 40)
    spills = []
    real = tempfile.TemporaryDirectory

    def spy(*args, **kwargs):
        spills.append(kwargs.get("prefix"))
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryDirectory", spy)
    disk = nbl_ext.calibrate(model, data, batch_size=2, progress=False, activations="disk")
    assert spills == ["nbl-spill-"]
    mem = nbl_ext.calibrate(model, data, batch_size=2, progress=False, activations="memory")
    auto = nbl_ext.calibrate(model, data, batch_size=2, progress=False)  # CPU: auto means disk
    assert spills == ["nbl-spill-", "nbl-spill-"]
    for a, b, c in zip(disk.layers, mem.layers, auto.layers):
        torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)
        torch.testing.assert_close(a.bias, b.bias, rtol=0, atol=0)
        assert a.bound == b.bound == c.bound and a.cosine == b.cosine and a.nmse == b.nmse


def test_activations_argument_is_checked(tmp_path):
    model = tiny_model("llama", 2)
    with pytest.raises(ValueError, match="activations must be one of 'auto', 'memory', 'disk'"):
        nbl_ext.calibrate(model, token_data(2, 8), activations="gpu", progress=False)
    with pytest.raises(ValueError, match="activations='memory' cannot be resumed"):
        nbl_ext.calibrate(model, token_data(2, 8), activations="memory", output_dir=tmp_path, progress=False)
    assert not any(tmp_path.iterdir())  # refused before anything was written


class _Interrupt(Exception):
    pass


def test_resume_after_interruption_gives_the_same_result(tmp_path):
    model = tiny_model("llama", 4)
    data = token_data(3, 40)
    ref = nbl_ext.calibrate(model, data, batch_size=2, progress=False, output_dir=tmp_path / "ref")

    def boom(*_):
        raise _Interrupt("killed")

    handle = model.model.layers[2].self_attn.register_forward_hook(boom)
    with pytest.raises(_Interrupt):
        nbl_ext.calibrate(model, data, batch_size=2, progress=False, output_dir=tmp_path / "run")
    handle.remove()
    run = tmp_path / "run"
    assert json.loads((run / "progress.json").read_text())["layers_done"] == 2
    assert sorted(p.name for p in (run / "layers").glob("*.safetensors")) == [
        "layer_0000.safetensors",
        "layer_0001.safetensors",
    ]
    assert (run / "spill" / "rank_00000" / "boundary_0002").is_dir()

    calls = []
    handles = [model.model.layers[i].self_attn.register_forward_hook(lambda *_, i=i: calls.append(i)) for i in range(4)]
    resumed = nbl_ext.calibrate(model, data, batch_size=2, progress=False, output_dir=run)
    assert sorted(set(calls)) == [2, 3]  # layers 0 and 1 came from disk
    for a, b in zip(ref.layers, resumed.layers):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
        assert (a.bound, a.nmse, a.cosine, a.tokens) == (b.bound, b.nmse, b.cosine, b.tokens)
    assert (run / "calibration" / "calibration.json").is_file()
    assert not (run / "spill").exists() and not (run / "layers").exists()

    calls.clear()  # a finished run is read back, not recomputed
    again = nbl_ext.calibrate(model, data, batch_size=2, progress=False, output_dir=run)
    assert calls == [] and again.bounds == ref.bounds
    for h in handles:
        h.remove()

    with pytest.raises(ValueError, match="data_sha256.*resume=False"):
        nbl_ext.calibrate(model, token_data(3, 40, seed=7), batch_size=2, progress=False, output_dir=run)
    with pytest.raises(ValueError, match="batch_size"):
        nbl_ext.calibrate(model, data, batch_size=1, progress=False, output_dir=run)
    other_model = tiny_model("llama", 4, seed=3)
    with pytest.raises(ValueError, match="weights_sha256"):
        nbl_ext.calibrate(other_model, data, batch_size=2, progress=False, output_dir=run)
    fresh = nbl_ext.calibrate(
        model, token_data(3, 40, seed=7), batch_size=2, progress=False, output_dir=run, resume=False
    )
    assert fresh.bounds != ref.bounds


def test_nan_activations_name_the_layer_and_batch():
    model = tiny_model("llama", 3)
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite activations in decoder layer 1, batch 0 \(samples 0\.\.1\)"):
        nbl_ext.calibrate(model, token_data(4, 40), batch_size=2, progress=False)


def test_bad_inputs_are_clear_errors():
    model = tiny_model("llama", 2)
    with pytest.raises(TypeError, match="integer token ids"):
        nbl_ext.calibrate(model, torch.zeros(2, 8), progress=False)
    with pytest.raises(ValueError, match="shape \\(num_samples, seq_len\\)"):
        nbl_ext.calibrate(model, torch.zeros(8, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 256\)"):
        nbl_ext.calibrate(model, torch.full((2, 8), 256), progress=False)
    with pytest.raises(TypeError, match="LongTensor"):
        nbl_ext.calibrate(model, [[1, 2, 3]], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        nbl_ext.calibrate(model, token_data(2, 8), batch_size=0, progress=False)
    with pytest.raises(ValueError, match="target"):
        nbl_ext.calibrate(model, token_data(2, 8), target="mlp", progress=False)


@pytest.fixture(scope="module")
def small_result():
    return nbl_ext.calibrate(tiny_model("qwen2", 4), token_data(2, 40), progress=False)


def test_select_and_table(small_result):
    r = small_result
    assert r.select(0) == [] and r.select(4) == [0, 1, 2, 3]
    two = r.select(2)
    assert two == sorted(two) and {r.bounds[i] for i in two} == set(sorted(r.bounds)[:2])
    drop = r.select(2, method="drop")
    assert {r.cosines[i] for i in drop} == set(sorted(r.cosines)[-2:])
    rows = r.table()
    assert [row["layer"] for row in rows] == [0, 1, 2, 3]
    assert set(rows[0]) >= {"bound", "nmse", "cosine", "tokens", "nbl_rank", "drop_rank"}
    for bad, exc, msg in (
        (5, ValueError, "between 0 and the number of layers \\(4\\)"),
        (-1, ValueError, "between 0"),
        (True, TypeError, "must be an int"),
        (1.0, TypeError, "must be an int"),
    ):
        with pytest.raises(exc, match=msg):
            r.select(bad)
    with pytest.raises(ValueError, match="method"):
        r.select(1, method="cca")


def test_result_save_load_roundtrip_and_damage(small_result, tmp_path):
    path = tmp_path / "cal"
    small_result.save(path)
    small_result.save(path)  # overwriting is safe
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal"]  # no temp or aside directories left
    loaded = CalibrationResult.load(path)
    assert loaded.metadata == small_result.metadata and loaded.bounds == small_result.bounds
    for a, b in zip(small_result.layers, loaded.layers):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    doc = json.loads((path / "calibration.json").read_text())
    doc["layers"][1]["bound"] = "x"
    (path / "calibration.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="layer 1 has an invalid bound"):
        CalibrationResult.load(path)
    small_result.save(path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "calibration.safetensors")
    del tensors["layers.2.bias"]
    save_file(tensors, path / "calibration.safetensors")
    with pytest.raises(ValueError, match="layers.2.bias is missing"):
        CalibrationResult.load(path)
    with pytest.raises(FileNotFoundError):
        CalibrationResult.load(tmp_path / "nope")
