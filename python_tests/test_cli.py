"""The nbl command: compress a (tiny, local) model end to end, report on it, and fail clearly."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import nbl_ext  # noqa: E402
from _tiny import WORDS, tiny_llama, word_tokenizer  # noqa: E402
from nbl_ext import cli  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-model")
    tok = word_tokenizer()
    tiny_llama(vocab_size=len(tok), seed=3).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> Path:
    gen = torch.Generator().manual_seed(0)
    docs = [{"text": " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (60,), generator=gen))}
            for _ in range(40)]
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
    rc = cli.main(["compress", str(tiny_model_dir), "--layers", "1", "--method", method, "--calib", str(calib_file),
                   "--samples", "4", "--seq-len", "64", "--batch-size", "2", "--out", str(out), "--no-progress"])
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
def test_compress_errors_are_clear(tmp_path, tiny_model_dir, calib_file, capsys):
    base = ["compress", str(tiny_model_dir), "--calib", str(calib_file), "--samples", "4", "--seq-len", "64",
            "--no-progress"]
    assert cli.main(base + ["--layers", "5", "--out", str(tmp_path / "a")]) == 2
    assert "between 0 and the model's 2 layers" in capsys.readouterr().err
    (tmp_path / "exists").mkdir()
    assert cli.main(base + ["--out", str(tmp_path / "exists")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["compress", str(tiny_model_dir), "--calib", str(tmp_path / "missing.json"),
                     "--out", str(tmp_path / "b"), "--no-progress"]) == 2
    assert "missing.json" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing half-written
    assert cli.main(["report", str(tmp_path / "nothing-here")]) == 2


def test_console_script_is_installed():
    exe = Path(sys.executable).with_name("nbl")
    if not exe.exists():
        pytest.skip("the nbl console script is not installed in this environment")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True)
    assert "compress" in out.stdout and "report" in out.stdout
