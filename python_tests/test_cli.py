"""The nbl command: compress a (tiny, local) model end to end, report on it, and fail clearly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import nbl_ext
from _tiny import WORDS
from nbl_ext import cli


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> Path:
    gen = torch.Generator().manual_seed(0)
    docs = [
        {"text": " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (60,), generator=gen))} for _ in range(40)
    ]
    path = tmp_path_factory.mktemp("calib") / "docs.json"
    path.write_text(json.dumps(docs))
    return path


def test_help_teaches(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["compress", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for needle in ("--layers", "--method", "--calib", "self", "examples:", "nbl report"):
        assert needle in text


# Layer 0's input is the embedding of a 20-word vocabulary: rank 20 < hidden 32, so
# its covariance is singular by construction and fit_linear warns (tested elsewhere).
@pytest.mark.filterwarnings("ignore::nbl_ext.numerics.SingularWarning")
@pytest.mark.parametrize("method", ["nbl", "drop"])
def test_compress_then_report(tmp_path, tiny_model_dir, calib_file, capsys, method):
    out = tmp_path / "out"
    rc = cli.main(
        [
            "compress",
            str(tiny_model_dir),
            "--layers",
            "1",
            "--method",
            method,
            "--calib",
            str(calib_file),
            "--samples",
            "4",
            "--seq-len",
            "64",
            "--batch-size",
            "2",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "bound" in printed and "nmse" in printed and f"<- {method}" in printed
    run = json.loads((out / "nbl_run.json").read_text())
    assert run["method"] == method and len(run["layers"]) == 1
    model = nbl_ext.load_pretrained(out)
    assert model.config.nbl["method"] == method and model.config.nbl["layers"] == run["layers"]
    ids = torch.randint(4, len(WORDS) + 4, (1, 12), generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(model(ids).logits).all()

    assert cli.main(["report", str(out)]) == 0
    report = capsys.readouterr().out
    assert report.count("\n") >= 3 and f"<- {method}" in report
    png = out / "layers.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.filterwarnings("ignore::nbl_ext.numerics.SingularWarning")
def test_compress_gram_precision_reaches_the_accumulator(tmp_path, tiny_model_dir, calib_file, capsys, monkeypatch):
    calibrate_mod = sys.modules["nbl_ext.calibrate"]  # nbl_ext.calibrate is also the function's name
    seen = []
    real = calibrate_mod.CovarianceAccumulator

    def spy(*args, **kwargs):
        acc = real(*args, **kwargs)
        seen.append(acc.precision)
        return acc

    monkeypatch.setattr(calibrate_mod, "CovarianceAccumulator", spy)
    out = tmp_path / "out"
    rc = cli.main(
        [
            "compress",
            str(tiny_model_dir),
            "--layers",
            "1",
            "--calib",
            str(calib_file),
            "--samples",
            "4",
            "--seq-len",
            "64",
            "--gram-precision",
            "bfloat16",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    assert seen and set(seen) == {"bfloat16"}  # one accumulator per layer, all in bf16 mode
    assert json.loads((out / "nbl_run.json").read_text())["gram_precision"] == "bfloat16"
    assert json.loads((out / "nbl_run.json").read_text())["activations"] == "auto"
    assert json.loads((out / "nbl_calibration.json").read_text())["metadata"]["gram_precision"] == "bfloat16"
    with pytest.raises(SystemExit):
        cli.main(["compress", "--gram-precision", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err


def test_compress_help_lists_gram_precision(capsys):
    with pytest.raises(SystemExit):
        cli.main(["compress", "--help"])
    text = capsys.readouterr().out
    assert "--gram-precision {float32,bfloat16}" in text and "tensor-core" in text
    assert "--activations {auto,memory,disk}" in text


@pytest.mark.filterwarnings("ignore::nbl_ext.numerics.SingularWarning")
def test_compress_errors_are_clear(tmp_path, tiny_model_dir, calib_file, capsys):
    base = [
        "compress",
        str(tiny_model_dir),
        "--calib",
        str(calib_file),
        "--samples",
        "4",
        "--seq-len",
        "64",
        "--no-progress",
    ]
    assert cli.main(base + ["--layers", "5", "--out", str(tmp_path / "a")]) == 2
    assert "between 0 and the model's 2 layers" in capsys.readouterr().err
    (tmp_path / "exists").mkdir()
    assert cli.main(base + ["--out", str(tmp_path / "exists")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "compress",
                str(tiny_model_dir),
                "--calib",
                str(tmp_path / "missing.json"),
                "--out",
                str(tmp_path / "b"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "missing.json" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing half-written
    assert cli.main(["report", str(tmp_path / "nothing-here")]) == 2


def test_console_script_is_installed():
    exe = Path(sys.executable).with_name("nbl")
    if not exe.exists():
        pytest.skip("the nbl console script is not installed in this environment")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True)
    assert "compress" in out.stdout and "report" in out.stdout


def _tiny_eval_data(root: Path) -> Path:
    """A miniature ../shared/data layout (eval/ + calib/) in the tiny tokenizer's vocabulary."""
    gen = torch.Generator().manual_seed(5)

    def sentence(n):
        return " ".join(WORDS[int(i)] for i in torch.randint(0, 12, (n,), generator=gen))

    (root / "eval" / "arc_easy").mkdir(parents=True)
    items = [
        {
            "id": f"q{i}",
            "question": {"stem": sentence(6), "choices": [{"text": sentence(3), "label": lab} for lab in "ABCD"]},
            "answerKey": "ABCD"[i % 4],
        }
        for i in range(6)
    ]
    (root / "eval" / "arc_easy" / "ARC-Easy-Test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    (root / "eval" / "piqa").mkdir()
    (root / "eval" / "piqa" / "valid.jsonl").write_text(
        "".join(json.dumps({"goal": sentence(5), "sol1": sentence(4), "sol2": sentence(4)}) + "\n" for _ in range(5))
    )
    (root / "eval" / "piqa" / "valid-labels.lst").write_text("0\n1\n1\n0\n1\n")
    (root / "eval" / "wikitext2").mkdir()
    (root / "eval" / "wikitext2" / "wiki.test.raw").write_text(
        "".join(f" \n = {WORDS[i]} = \n \n {sentence(80)} \n" for i in range(4))
    )
    (root / "calib").mkdir()
    (root / "calib" / "c4_demo.json").write_text(json.dumps([{"text": sentence(60)} for _ in range(40)]))
    return root


@pytest.mark.filterwarnings("ignore::nbl_ext.numerics.SingularWarning")
def test_eval_a_compressed_model_offline(tmp_path, tiny_model_dir, capsys):
    pytest.importorskip("lm_eval")
    data = _tiny_eval_data(tmp_path / "data")
    c4 = data / "calib" / "c4_demo.json"
    out = tmp_path / "out"
    assert (
        cli.main(
            [
                "compress",
                str(tiny_model_dir),
                "--layers",
                "1",
                "--calib",
                str(c4),
                "--samples",
                "4",
                "--seq-len",
                "64",
                "--batch-size",
                "2",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert json.loads((out / "nbl_run.json").read_text())["holdout"] == 0.2
    capsys.readouterr()
    report_file = tmp_path / "eval.json"
    rc = cli.main(
        [
            "eval",
            str(out),
            "--data-dir",
            str(data / "eval"),
            "--tasks",
            "arc_easy,piqa",
            "--limit",
            "4",
            "--context",
            "32",
            "--batch-size",
            "2",
            "--output",
            str(report_file),
            "--no-progress",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr()
    assert "arc_easy" in printed.out and "acc_norm" in printed.out and "perplexity c4" in printed.out
    assert "calibrated on" not in printed.err  # the held-out documents were not calibrated on
    report = json.loads(report_file.read_text())
    assert report["model"]["nbl"]["layers"] == json.loads((out / "nbl_run.json").read_text())["layers"]
    assert report["versions"]["lm_eval"] and report["versions"]["transformers"]
    for task in ("arc_easy", "piqa"):
        t = report["tasks"][task]
        assert t["n"] == 4 and t["n_total"] in (6, 5) and t["source"] == "offline"
        assert 0.0 <= t["metrics"]["acc"] <= 1.0 and t["stderr"]["acc"] is not None
    for corpus in ("wikitext2", "c4"):
        p = report["perplexity"][corpus]
        assert p["context"] == 32 and p["bos"] is True and p["tokens"] > 0 and p["ppl"] > 1.0

    # calibrating on every document of the file that C4 perplexity is scored on gets a warning
    out0 = tmp_path / "out0"
    assert (
        cli.main(
            [
                "compress",
                str(tiny_model_dir),
                "--layers",
                "1",
                "--calib",
                str(c4),
                "--samples",
                "4",
                "--seq-len",
                "64",
                "--holdout",
                "0",
                "--out",
                str(out0),
                "--no-progress",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        cli.main(
            [
                "eval",
                str(out0),
                "--data-dir",
                str(data / "eval"),
                "--tasks",
                "none",
                "--ppl",
                "c4",
                "--context",
                "32",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "seen in calibration" in capsys.readouterr().err


def test_eval_errors_are_clear(tmp_path, tiny_model_dir, capsys):
    pytest.importorskip("lm_eval")
    data = _tiny_eval_data(tmp_path / "data")
    base = ["eval", str(tiny_model_dir), "--no-progress"]
    cases = [
        (["--data-dir", str(tmp_path / "nowhere")], "does not exist; pass --data-dir"),
        (["--data-dir", str(data / "eval"), "--tasks", "mmlu"], "no offline definition for mmlu"),
        (["--data-dir", str(data / "eval"), "--tasks", "boolq"], "lacks: "),
        (["--data-dir", str(data / "eval"), "--ppl", "ptb"], "unknown corpus ptb"),
        (["--tasks", "none", "--ppl", "none"], "nothing to evaluate"),
        (["--data-dir", str(data / "eval"), "--tasks", "piqa", "--output", str(tmp_path)], "is a directory"),
        (["--tasks", "none", "--ppl", "c4"], "--c4"),
    ]
    for extra, needle in cases:
        assert cli.main(base + extra) == 2, extra
        assert needle in capsys.readouterr().err, extra
    with pytest.raises(SystemExit):
        cli.main(base + ["--limit", "0"])
    assert "must be > 0" in capsys.readouterr().err


def test_eval_help_teaches(capsys):
    with pytest.raises(SystemExit):
        cli.main(["eval", "--help"])
    text = capsys.readouterr().out
    for needle in ("--tasks", "--data-dir", "--limit", "--ppl", "--context", "--stride", "held out", "examples:"):
        assert needle in text


@pytest.mark.filterwarnings("ignore::nbl_ext.numerics.SingularWarning")
def test_compress_folds_choose_the_ridge_and_print_the_heldout_nmse(tmp_path, tiny_model_dir, calib_file, capsys):
    out = tmp_path / "out"
    base = [
        "compress",
        str(tiny_model_dir),
        "--layers",
        "1",
        "--calib",
        str(calib_file),
        "--samples",
        "4",
        "--seq-len",
        "64",
        "--no-progress",
    ]
    assert cli.main(base + ["--folds", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "cv_nmse" in printed and "ridge" in printed
    assert json.loads((out / "nbl_run.json").read_text())["folds"] == 2
    rows = json.loads((out / "nbl_calibration.json").read_text())["layers"]
    assert all(r["ridge"] in nbl_ext.crossval.DEFAULT_RIDGES and r["cv_nmse"] > 0 for r in rows)
    assert cli.main(["report", str(out)]) == 0 and "cv_nmse" in capsys.readouterr().out
    assert cli.main(base + ["--folds", "5", "--out", str(tmp_path / "b")]) == 2
    assert "folds=5 is more than num_samples=4" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


@pytest.mark.filterwarnings("ignore::nbl_ext.numerics.SingularWarning")
def test_compress_with_a_criterion_scored_on_heldout_text(tmp_path, tiny_model_dir, calib_file, capsys):
    """--criterion direct_nll draws --selection-samples more sequences, scores every layer on them (never on
    the calibration ones) and replaces the layer whose replacement costs the least held-out NLL."""
    from nbl_ext.selection import layer_nll_increases

    out = tmp_path / "out"
    args = ["compress", str(tiny_model_dir), "--layers", "1", "--calib", str(calib_file), "--samples", "4"]
    args += ["--seq-len", "32", "--criterion", "direct_nll", "--selection-samples", "3", "--no-progress"]
    assert cli.main(args + ["--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "+ 3 x 32 held out for selection by direct_nll" in printed.err
    assert "direct_nll" in printed.out and "chosen by direct_nll" in printed.out
    run = json.loads((out / "nbl_run.json").read_text())
    assert run["criterion"] == "direct_nll" and run["selection_samples"] == 3 and run["seconds"]["select"] > 0
    rows = json.loads((out / "nbl_calibration.json").read_text())["layers"]
    scores = [r["direct_nll"] for r in rows]
    assert run["layers"] == [min(range(len(scores)), key=scores.__getitem__)]
    # the scores are the held-out NLL increases on the 3 sequences after the 4 calibration ones
    model, tok = nbl_ext.load_model(str(tiny_model_dir))
    ids = nbl_ext.load_calibration_tokens(
        nbl_ext.api.holdout_split(calib_file, None)[0], tok, num_samples=7, seq_len=32, progress=False
    )
    maps = nbl_ext.calibrate(
        model, ids[:4], batch_size=4, progress=False, folds=4, ridges=nbl_ext.crossval.DEFAULT_RIDGES
    )
    _, inc = layer_nll_increases(model, {lc.layer: (lc.weight, lc.bias) for lc in maps.layers}, ids[4:])
    assert scores == pytest.approx([inc[i] for i in range(len(scores))], rel=1e-4, abs=1e-6)
    # --method drop keeps DROP's cosine unless a criterion is named
    assert cli.main(args[:-5] + ["--method", "drop", "--no-progress", "--out", str(tmp_path / "d")]) == 0
    assert json.loads((tmp_path / "d" / "nbl_run.json").read_text())["criterion"] == "cosine"
    # nbl report shows the choosing criterion's column and a panel for it
    capsys.readouterr()
    assert cli.main(["report", str(out)]) == 0
    assert "direct_nll" in capsys.readouterr().out and (out / "layers.png").stat().st_size > 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.main(args[:-5] + ["--criterion", "best", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2 and "invalid choice: 'best'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
