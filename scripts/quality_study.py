"""The quality study behind docs/quality_study.md: NBL vs DROP vs NBL + sequential refit, k = 0 .. L/2.

    .venv/bin/python scripts/quality_study.py                 # compute what is missing, then render
    .venv/bin/python scripts/quality_study.py --render-only   # docs/quality_study.md + plots from the JSON
    .venv/bin/python scripts/quality_study.py --fresh         # recompute everything from scratch

For each model (SmolLM2-135M-Instruct, Gemma 3 270M; the two offline real models) and each
calibration source (the C4 sample minus its held-out documents; text the model samples itself):
calibrate once, then for every k on the grid and every method measure WikiText-2 and held-out
C4 perplexity. At the main points (C4 calibration, the --acc-k values) also the 7-task zero-shot
accuracy with stock lm-eval on a fixed seeded subset of every task (--acc-n documents each; the
same documents for every model and method, so differences are paired). Per layer: the CCA bound,
the in-sample NMSE of the fitted map, and its NMSE measured on held-out C4 text.

Everything is written to docs/results/quality_study.json after each point (a rerun resumes), and
docs/quality_study.md + docs/results/*.png are regenerated from that JSON alone. CPU only, float32.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import nbl_ext
from nbl_ext.data import HOLDOUT_FRACTION, HOLDOUT_SEED, split_documents
from nbl_ext.evaluate import _bos_for, c4_heldout_ids, perplexity_stats, run_tasks, versions, wikitext2_ids
from nbl_ext.tasks import OFFLINE_TASKS, ZERO_SHOT_7

ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT / ".." / "shared" / "data").resolve()
C4 = SHARED / "calib" / "c4_demo.json"
EVAL = SHARED / "eval"
DOCS = ROOT / "docs"

MODELS = {  # name -> k grid, main k values (accuracy)
    "smollm2-135m": {"grid": [0, 3, 6, 9, 12, 15], "acc_k": [6, 12]},
    "gemma3-270m": {"grid": [0, 3, 6, 9], "acc_k": [6]},  # Gemma runs at ~120 tokens/s here: one main k
}
METHODS = ("nbl", "drop", "nbl_refit")
ACC_METHODS = ("nbl", "drop")  # accuracy is the expensive part on this CPU: the two methods being compared
CALIBS = ("c4", "self")


def subset(task: str, n: int, total: int, seed: int = 0) -> list[int]:
    """A fixed pseudo-random subset of a task's documents (sha256 order; version independent)."""
    order = sorted(range(total), key=lambda i: hashlib.sha256(f"{task}:{seed}:{i}".encode()).digest())
    return sorted(order[:n])


def heldout_nmse(model, adapter, result, ids: torch.Tensor, window: int, bos: int | None) -> list[float]:
    """Per layer: || A - (X W^T + b) ||^2 / || A - mean(A) ||^2 on held-out text (original model)."""
    n, d = adapter.num_layers, adapter.hidden_size
    err, a_sum, a_sq, count = [0.0] * n, [torch.zeros(d, dtype=torch.float64) for _ in range(n)], [0.0] * n, [0] * n
    xs: dict[int, torch.Tensor] = {}

    def make_hooks(i, pick):
        def pre(m, args, kwargs):
            xs[i] = kwargs.get("hidden_states", args[0] if args else None).detach().double().reshape(-1, d)

        def post(m, args, out):
            a, x, lc = pick(out).detach().double().reshape(-1, d), xs.pop(i), result.layers[i]
            err[i] += float(((a - x @ lc.weight.double().T - lc.bias.double()) ** 2).sum())
            a_sum[i] += a.sum(0)
            a_sq[i] += float((a * a).sum())
            count[i] += a.shape[0]

        return pre, post

    hooks = []
    for i, layer in enumerate(adapter.layers()):
        module, pick = adapter.branch_output(layer)
        pre, post = make_hooks(i, pick)
        hooks += [layer.register_forward_pre_hook(pre, with_kwargs=True), module.register_forward_hook(post)]
    try:
        body = window - (1 if bos is not None else 0)
        with torch.inference_mode():
            for s in range(0, ids.numel() - body + 1, body):
                chunk = ids[s : s + body][None]
                if bos is not None:
                    chunk = torch.cat([torch.tensor([[bos]]), chunk], 1)
                model(chunk)
    finally:
        for h in hooks:
            h.remove()
    return [err[i] / (a_sq[i] - float(a_sum[i] @ a_sum[i]) / count[i]) for i in range(n)]


class Study:
    def __init__(self, args):
        self.args = args
        self.raw = Path(args.docs) / "results" / "quality_study.json"
        self.data = json.loads(self.raw.read_text()) if self.raw.is_file() and not args.fresh else {}
        self.data.setdefault("models", {})

    def save(self):
        self.raw.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.raw.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        tmp.replace(self.raw)

    def setup(self):
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        self.data["setup"] = {
            "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads), float32",
            "versions": versions(),
            "commit": commit,
            "calibration": {
                "c4": f"{C4.name} minus its held-out documents, {self.args.samples} x {self.args.seq_len} "
                f"tokens, seed 0",
                "self": f"{self.args.samples} x {self.args.seq_len} tokens sampled "
                "from the model (top-k 50, temperature 1, seed 0)",
            },
            "holdout": {"fraction": HOLDOUT_FRACTION, "seed": HOLDOUT_SEED},
            "perplexity": {
                "tokens": self.args.ppl_tokens,
                "context": self.args.context,
                "stride": self.args.context,
                "wikitext2": "wiki.test.raw rows joined by blank lines",
                "c4": "held-out documents of c4_demo.json, EOS-separated",
            },
            "accuracy": {
                "tasks": list(ZERO_SHOT_7),
                "docs_per_task": self.args.acc_n,
                "subset": "sha256(task:0:i) order, first N, same for every model and method",
                "lm_eval_max_length": self.args.context,
                "notes": {t: OFFLINE_TASKS[t].note for t in ZERO_SHOT_7 if OFFLINE_TASKS[t].note},
            },
        }

    def run_model(self, name: str, calibs=CALIBS):
        spec = MODELS[name]
        rec = self.data["models"].setdefault(name, {"points": {}, "calibration": {}, "accuracy": {}})
        torch.manual_seed(0)
        model, tok = nbl_ext.load_model(name, progress=False)
        adapter = nbl_ext.get_adapter(model)
        rec["num_layers"], rec["hidden_size"] = adapter.num_layers, adapter.hidden_size
        bos = _bos_for(tok)
        wiki = wikitext2_ids(tok, EVAL, self.args.ppl_tokens)
        c4_ids, _ = c4_heldout_ids(tok, C4, self.args.ppl_tokens)
        calib_docs, _ = split_documents(C4, HOLDOUT_FRACTION, seed=HOLDOUT_SEED)

        def ppl(m):
            out = {}
            for corpus, ids in (("wikitext2", wiki), ("c4", c4_ids)):
                s = perplexity_stats(m, ids, context=self.args.context, bos_id=bos)
                out[corpus] = {k: s[k] for k in ("ppl", "ppl_stderr", "nll", "tokens", "window_nll")}
            return out

        if "original" not in rec["points"]:
            t = time.perf_counter()
            rec["points"]["original"] = {"k": 0, "layers": [], **ppl(model), "seconds": time.perf_counter() - t}
            self.save()
        print(f"[{name}] original: {self._fmt(rec['points']['original'])}", flush=True)

        for calib in calibs:
            source = calib_docs if calib == "c4" else "self"
            tokens = None
            res = None
            todo = [(k, m) for k in spec["grid"] if k > 0 for m in METHODS if f"{calib}/{m}/k{k}" not in rec["points"]]
            need_layers = calib not in rec["calibration"]
            acc_todo = (
                calib == "c4"
                and self.args.acc_n > 0
                and any(
                    key not in rec["accuracy"] for key in [f"c4/{m}/k{k}" for k in spec["acc_k"] for m in ACC_METHODS]
                )
            )
            if not todo and not need_layers and not acc_todo:
                continue
            t = time.perf_counter()
            tokens = nbl_ext.load_calibration_tokens(
                source,
                tok,
                num_samples=self.args.samples,
                seq_len=self.args.seq_len,
                seed=0,
                model=model,
                progress=False,
            )
            t_data = time.perf_counter() - t
            t = time.perf_counter()
            res = nbl_ext.calibrate(model, tokens, batch_size=4, progress=False)
            t_cal = time.perf_counter() - t
            crec = {
                "tokens": int(tokens.numel()),
                "data_seconds": t_data,
                "calibrate_seconds": t_cal,
                "layers": res.table(),
            }
            crec["heldout_nmse"] = heldout_nmse(
                model, adapter, res, c4_ids[: 4 * self.args.context], self.args.context, bos
            )
            rec["calibration"][calib] = crec
            self.save()
            print(f"[{name}] calibrated on {calib} ({tokens.numel()} tokens) in {t_cal:.0f} s", flush=True)
            for k, method in todo:
                key = f"{calib}/{method}/k{k}"
                t = time.perf_counter()
                sel = res.select(k, "drop" if method == "drop" else "nbl")
                lin = nbl_ext.linearize(
                    copy.deepcopy(model),
                    res,
                    sel,
                    method="drop" if method == "drop" else "nbl",
                    refit="sequential" if method == "nbl_refit" else None,
                    data=tokens if method == "nbl_refit" else None,
                    batch_size=4,
                    progress=False,
                )
                rec["points"][key] = {
                    "k": k,
                    "method": method,
                    "calib": calib,
                    "layers": sel,
                    **ppl(lin),
                    "seconds": time.perf_counter() - t,
                }
                del lin
                self.save()
                print(f"[{name}] {key}: {self._fmt(rec['points'][key])}", flush=True)
            if calib == "c4":
                self.accuracy(name, rec, model, tok, res, tokens, spec)

    def accuracy(self, name, rec, model, tok, res, tokens, spec):
        if self.args.acc_n <= 0:
            return
        samples = {t: subset(t, self.args.acc_n, len(OFFLINE_TASKS[t].load(EVAL))) for t in ZERO_SHOT_7}
        points = [("original", None, 0)] + [(m, m, k) for k in spec["acc_k"] for m in ACC_METHODS]
        for _label, method, k in points:
            key = "original" if method is None else f"c4/{method}/k{k}"
            if key in rec["accuracy"]:
                continue
            t = time.perf_counter()
            if method is None:
                m = model
            else:
                sel = res.select(k, "drop" if method == "drop" else "nbl")
                m = nbl_ext.linearize(
                    copy.deepcopy(model),
                    res,
                    sel,
                    method="drop" if method == "drop" else "nbl",
                    refit="sequential" if method == "nbl_refit" else None,
                    data=tokens if method == "nbl_refit" else None,
                    batch_size=4,
                    progress=False,
                )
            out = run_tasks(
                m,
                tok,
                ZERO_SHOT_7,
                data_dir=EVAL,
                samples=samples,
                batch_size=8,
                max_length=self.args.context,
                log_samples=True,
            )
            rec["accuracy"][key] = {
                "k": k,
                "method": method or "original",
                "seconds": time.perf_counter() - t,
                "tasks": {
                    tn: {
                        "acc": r["metrics"].get("acc"),
                        "acc_stderr": r["stderr"].get("acc"),
                        "acc_norm": r["metrics"].get("acc_norm"),
                        "n": r["n"],
                        "correct": [int(s["acc"]) for s in sorted(r["samples"], key=lambda s: s["doc_id"])],
                    }
                    for tn, r in out.items()
                },
            }
            self.save()
            accs = [rec["accuracy"][key]["tasks"][t]["acc"] for t in ZERO_SHOT_7]
            print(
                f"[{name}] accuracy {key}: mean {sum(accs) / len(accs):.4f} ({time.perf_counter() - t:.0f} s)",
                flush=True,
            )

    @staticmethod
    def _fmt(p):
        return f"wikitext2 {p['wikitext2']['ppl']:.2f}, c4 {p['c4']['ppl']:.2f} (layers {p['layers']})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated (default: %(default)s)")
    ap.add_argument("--calibs", default=",".join(CALIBS), help="calibration sources to run (default: %(default)s)")
    ap.add_argument("--render-only", action="store_true", help="only regenerate docs/quality_study.md and the plots")
    ap.add_argument("--docs", default=str(DOCS), help="where quality_study.md and results/ go (default: docs/)")
    ap.add_argument("--fresh", action="store_true", help="ignore the existing JSON and recompute everything")
    ap.add_argument("--samples", type=int, default=16, help="calibration sequences (default 16)")
    ap.add_argument("--seq-len", type=int, default=512, help="calibration sequence length (default 512)")
    ap.add_argument("--ppl-tokens", type=int, default=4096, help="tokens per perplexity corpus (default 4096)")
    ap.add_argument("--context", type=int, default=512, help="perplexity window and lm-eval max length (default 512)")
    ap.add_argument("--acc-n", type=int, default=50, help="documents per zero-shot task (default 50; 0: skip accuracy)")
    args = ap.parse_args(argv)
    if not args.render_only:
        study = Study(args)
        study.setup()
        study.save()
        names = args.models.split(",")
        for name in names:
            if name not in MODELS:
                sys.exit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
        for calib in args.calibs.split(
            ","
        ):  # all models on C4 first: the main points come before the self-calibration sweep
            for name in names:
                study.run_model(name, calibs=(calib,))
    from study_report import render

    docs = Path(args.docs)
    plan = {
        name: {**spec, "calibs": list(CALIBS), "methods": list(METHODS), "acc_methods": list(ACC_METHODS)}
        for name, spec in MODELS.items()
    }
    render(docs / "results" / "quality_study.json", docs / "quality_study.md", docs / "results", plan)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
