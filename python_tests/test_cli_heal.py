"""nbl heal: heal a tiny `nbl compress` checkpoint end to end (LoRA and distill), and fail clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import nbl_ext  # noqa: E402
from _tiny import WORDS  # noqa: E402
from nbl_ext import cli  # noqa: E402


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    """(a C4-like document file, an NBL-k1 checkpoint of the tiny model calibrated on it)."""
    root = tmp_path_factory.mktemp("heal-cli")
    gen = torch.Generator().manual_seed(0)
    docs = [
        {"text": " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (60,), generator=gen))} for _ in range(40)
    ]
    calib = root / "docs.json"
    calib.write_text(json.dumps(docs))
    out = root / "nbl-k1"
    with pytest.warns(nbl_ext.SingularWarning):  # layer 0's input spans the 20-word vocabulary only
        assert (
            cli.main(
                [
                    "compress",
                    str(tiny_model_dir),
                    "--layers",
                    "1",
                    "--calib",
                    str(calib),
                    "--samples",
                    "4",
                    "--seq-len",
                    "64",
                    "--out",
                    str(out),
                    "--no-progress",
                ]
            )
            == 0
        )
    return calib, out


HEAL = [
    "--samples",
    "8",
    "--heldout-samples",
    "2",
    "--seq-len",
    "32",
    "--steps",
    "4",
    "--batch-size",
    "4",
    "--rank",
    "4",
    "--eval-every",
    "2",
    "--lr",
    "1e-3",
    "--no-progress",
]


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # transformers, inside peft
@pytest.mark.parametrize("method,scaling", [("lora", "none"), ("distill", "none"), ("lora", "rms"), ("distill", "rms")])
def test_heal_writes_a_loadable_checkpoint(tmp_path, compressed, capsys, method, scaling):
    calib, src = compressed
    out = tmp_path / "healed"
    argv = ["heal", str(src), "--method", method, "--input-scaling", scaling, "--calib", str(calib), "--out", str(out)]
    rc = cli.main([*argv, *HEAL])
    assert rc == 0, capsys.readouterr().err
    assert "held-out loss" in capsys.readouterr().out
    report = json.loads((out / "nbl_heal.json").read_text())
    assert report["method"] == method and report["steps"] <= 4 and len(report["history"]) >= 1
    assert report["config"]["input_scaling"] == scaling
    assert report["heldout_loss_after"] <= report["heldout_loss_before"]
    assert report["heldout_tokens"] == 2 * 32 and report["source"] == str(src)
    assert json.loads((out / "nbl_run.json").read_text()) == json.loads((src / "nbl_run.json").read_text())
    healed, unhealed = nbl_ext.load_pretrained(out), nbl_ext.load_pretrained(src)
    assert healed.config.nbl == unhealed.config.nbl
    ids = torch.randint(4, len(WORDS) + 4, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = healed(ids).logits
    assert torch.isfinite(logits).all()
    assert not (tmp_path / "healed.heal-state").exists()  # resume state removed after success
    if method == "lora":
        adapted = peft.PeftModel.from_pretrained(unhealed, str(out / "adapter")).eval()
        with torch.no_grad():
            torch.testing.assert_close(adapted(ids).logits, logits, rtol=1e-5, atol=1e-5)
    else:
        assert not (out / "adapter").exists()


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_heal_in_place_replaces_dir_atomically(tmp_path, compressed, capsys):
    import shutil

    calib, src = compressed
    target = tmp_path / "ckpt"
    shutil.copytree(src, target)
    before = nbl_ext.load_pretrained(target).state_dict()
    assert (
        cli.main(["heal", str(target), "--in-place", "--calib", str(calib), *HEAL, "--steps", "2", "--lr", "3e-2"]) == 0
    )
    assert (target / "nbl_heal.json").is_file() and (target / "adapter" / "adapter_config.json").is_file()
    after = nbl_ext.load_pretrained(target).state_dict()
    assert after.keys() == before.keys()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp or aside directories left over


def test_heal_errors_are_clear(tmp_path, tiny_model_dir, compressed, capsys):
    calib, src = compressed
    cases = [
        (
            ["heal", str(tiny_model_dir), "--calib", str(calib), "--out", str(tmp_path / "a")],
            "is not an nbl-ext checkpoint",
        ),
        (["heal", str(tmp_path / "nothing"), "--calib", str(calib), "--out", str(tmp_path / "a")], "no config.json"),
        (["heal", str(src), "--calib", str(calib)], "exactly one of --out OUT"),
        (["heal", str(src), "--calib", str(calib), "--out", str(src)], "pass --in-place"),
        (["heal", str(src), "--calib", str(calib), "--out", str(src.parent)], "--overwrite"),
        (["heal", str(src), "--calib", "self", "--out", str(tmp_path / "a")], "natural text"),
        (
            ["heal", str(src), "--calib", str(calib), "--out", str(tmp_path / "a"), "--samples", "500"],
            "Use fewer samples",
        ),
        (
            ["heal", str(src), "--method", "distill", "--around-lr", "1e-4", "--calib", str(calib)]
            + ["--out", str(tmp_path / "a")],
            "lora_around_lr is LoRA's rate on the modules around",
        ),
        (
            ["heal", str(src), "--targets", "maps", "--around-lr", "1e-4", "--calib", str(calib)]
            + ["--out", str(tmp_path / "a"), *HEAL],
            "LoRA has no targets around the blocks",
        ),
    ]
    for argv, needle in cases:
        assert cli.main(argv + ["--no-progress"]) == 2, argv
        assert needle in capsys.readouterr().err, argv
    assert not (tmp_path / "a").exists()  # nothing half-written
    with pytest.raises(SystemExit):
        cli.main(["heal", str(src), "--out", str(tmp_path / "a")])
    assert "--calib" in capsys.readouterr().err


def test_heal_help_teaches(capsys):
    with pytest.raises(SystemExit):
        cli.main(["heal", "--help"])
    text = capsys.readouterr().out
    for needle in (
        "--method {lora,distill}",
        "--input-scaling {none,rms}",
        "--around-lr LR",
        "--in-place",
        "--original",
        "held-out",
        "examples:",
        "adapter/",
    ):
        assert needle in text
