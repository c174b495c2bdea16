"""The healing study (issue 12): NBL and DROP before and after healing, at about 20% and 40% of the layers.

    .venv/bin/python scripts/heal_study.py                    # compute what is missing, then render
    .venv/bin/python scripts/heal_study.py --render-only      # docs/results.md from the JSONs
    .venv/bin/python scripts/heal_study.py --models smollm2-135m --k smollm2-135m:6 --steps 2 \\
        --samples 8 --seq-len 128 --acc-n 0 --ppl-tokens 512 --out /tmp/heal_smoke.json   # a smoke run
    # two processes side by side: run one with --out side.json (a copy of the study's JSON), then
    .venv/bin/python scripts/heal_study.py --merge side.json --models gemma3-270m \
        --points nbl/k4/none --points 'nbl/k4/lora@lr0.005,n128,rms' --note 'how it ran'

For each model (SmolLM2-135M-Instruct, Gemma 3 270M) the C4 sample is split by documents into
three disjoint parts, fixed by seed: the evaluation hold-out (nbl_ext.data.HOLDOUT_FRACTION, the
documents `nbl eval --c4` scores), the early-stopping hold-out (HealConfig.heldout_fraction of the
rest) and the training part (calibration and healing). Calibrate once on the training part; for
every k and method (NBL, DROP) linearize, measure, then heal a copy with each healing method
(NBL: LoRA on the maps and distillation of W, b; DROP: LoRA on the layers around the dropped blocks)
and measure again: WikiText-2 and held-out C4 perplexity and the 7-task zero-shot accuracy on the
seeded item subsets of the quality study (scripts/quality_study.py), with the tokens and seconds
every step took. Raw JSON is written after every point (a rerun resumes); its section of docs/results.md
is rendered from that JSON alone, by scripts/selection_report.py (the page's one renderer). CPU, float32.
Points measured with --acc-n 0 get their accuracy from a later run with --acc-n N and the same settings:
the healed model is rebuilt from its saved healing state (under heal_state/ beside --out) and must score
the first held-out C4 windows as the JSON says.
"""

from __future__ import annotations

import argparse
import copy
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
from nbl_ext.heal import HealConfig
from nbl_ext.tasks import OFFLINE_TASKS, ZERO_SHOT_7

sys.path.insert(0, str(Path(__file__).resolve().parent))
from selection_report import mean_acc7, write_page

ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT / ".." / "shared" / "data").resolve()  # --data-dir overrides (e.g. from a git worktree)
DOCS = ROOT / "docs"

MODELS = {"smollm2-135m": [6, 12], "gemma3-270m": [4, 7]}  # about 20% and 40% of 30 / 18 layers
HEALS = {"nbl": ("lora", "distill"), "drop": ("lora",)}
PAPER_LR = 1e-4  # the paper's LoRA learning rate; a point healed at another --lr carries "@lr<value>" in its key
SAMPLES = 64  # the committed study's healing sequences; a point healed on another --samples carries "n<value>"


def lora_around(linearization: str, heal: str, targets: str) -> bool:
    """NBL's LoRA also on the modules around the maps (--lora-targets around; DROP's LoRA is always there)."""
    return heal == "lora" and linearization == "nbl" and targets == "around"


def heal_key(
    method: str,
    k: int,
    heal: str,
    lr: float,
    samples: int = SAMPLES,
    scaling: str = "none",
    targets: str = "auto",
    around_lr: float | None = None,
) -> str:
    """A point's key: ``nbl/k12/lora``, or with the settings that differ from the committed study's after an
    ``@``: ``nbl/k12/lora@lr0.001`` (another learning rate), ``nbl/k12/lora@lr0.001,n128`` (and 128 healing
    sequences), ``...,rms`` (HealConfig.input_scaling="rms"), ``...,around`` (NBL's LoRA also on the modules
    around the maps, HealConfig.lora_targets="around"; DROP's LoRA is always there), ``...,around@lr0.0001``
    (those modules at their own rate, HealConfig.lora_around_lr). The renderer picks among a heal's variants by the
    early-stopping loss, never by test data."""
    tags = (
        []
        if heal == "none"
        else [f"lr{lr:g}"] * (lr != PAPER_LR)
        + [f"n{samples}"] * (samples != SAMPLES)
        + ["rms"] * (scaling == "rms")
        + (
            [f"around@lr{around_lr:g}" if around_lr is not None else "around"]
            if lora_around(method, heal, targets)
            else []
        )
    )
    return f"{method}/k{k}/{heal}" + (f"@{','.join(tags)}" if tags else "")


def subset(task: str, n: int, total: int, seed: int = 0) -> list[int]:
    from quality_study import subset as quality_subset  # the same items as the selection study

    return quality_subset(task, n, total, seed)


def _leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def merge_setup(old: dict | None, new: dict, notes: list[str] = ()) -> dict:
    """The JSON's setup after a run: the first run's settings stay (its points were measured with them); a later
    run whose settings differ adds a note naming them, with its commit, so every point's settings stay on the
    page. ``notes``: the user's own (``--note``)."""
    if not old:
        return {**new, "notes": list(notes)}
    merged = {**old, "notes": list(old.get("notes", []))}
    new = json.loads(json.dumps(new))  # as stored (tuples become lists): only real differences count
    was, now = _leaves({k: v for k, v in old.items() if k != "notes"}), _leaves(new)
    changed = [
        f"{k} = {now[k]}"
        for k in now
        if k not in ("commit", "device") and not k.startswith("versions.") and was.get(k) != now[k]
    ]
    if changed:
        merged["notes"].append(f"a run at commit {new['commit']} ({new['device']}) used " + "; ".join(changed))
    merged["notes"] += [n for n in notes if n not in merged["notes"]]
    return merged


def item_counts(points) -> set[int]:
    """The items per task that ``points`` were measured on (empty: no accuracy among them)."""
    return {t["n"] for p in points for t in p.get("tasks", {}).values()}


def check_items(name: str, rec: dict, acc_n: int) -> None:
    """Refuse accuracy on another item count than the model's points already have: accuracy differences are
    paired by item, so a point measured on 200 items per task cannot be compared with a baseline on 50."""
    have = item_counts(rec.get("points", {}).values())
    if acc_n and have and have != {acc_n}:
        sys.exit(
            f"{name}'s accuracy points have {', '.join(map(str, sorted(have)))} items per task; run with "
            f"--acc-n {max(have)} (the same items), or --acc-n 0 for perplexity only"
        )


def complete(point: dict | None, acc_n: int) -> bool:
    """A point is done when it is measured and, where this run measures accuracy, has accuracy: a point
    measured with --acc-n 0 gets its accuracy added by a later run with --acc-n (nothing else recomputed)."""
    return point is not None and (not acc_n or "tasks" in point)


def _same_windows(a: dict, b: dict) -> bool:
    return all(a.get(c, {}).get("window_nll") == b.get(c, {}).get("window_nll") for c in ("wikitext2", "c4"))


def merge_points(target: dict, side: dict, name: str, keys: list[str], notes: list[str] = ()) -> list[str]:
    """Copy ``keys`` of model ``name`` from a side run's JSON (``side``, a run with another ``--out``) into
    ``target``, in the given order, and add ``notes`` (how the side run was made) to its setup notes. Refuses
    (SystemExit, saying why) what would pair a point with measurements of another model: another calibration, an
    original or unhealed baseline measured differently in the two files (their per-window NLLs must be equal), a
    healed point whose unhealed baseline or layers are not in ``target`` (merge the baseline first, in the same
    call), another accuracy item count, or a key ``target`` already has. Returns the keys merged."""
    if name not in side.get("models", {}):
        sys.exit(f"the side JSON has no model {name!r}; it has {sorted(side.get('models', {}))}")
    src = side["models"][name]
    rec = target.setdefault("models", {}).setdefault(name, {"points": {}})
    pts = rec.setdefault("points", {})
    calib, side_calib = rec.get("calibration", {}).get("tokens"), src.get("calibration", {}).get("tokens")
    if calib is not None and calib != side_calib:
        sys.exit(f"[{name}] the side run calibrated on {side_calib} tokens, the target's points on {calib}")
    if (
        "original" in pts
        and "original" in src["points"]
        and not _same_windows(pts["original"], src["points"]["original"])
    ):
        sys.exit(f"[{name}] the side run's original scores other perplexity windows than the target's")
    for key in keys:
        if key not in src["points"]:
            sys.exit(f"[{name}] the side JSON has no point {key!r}; it has {sorted(src['points'])}")
        if key in pts:
            sys.exit(f"[{name}] the target already has {key!r}; remove it there first to replace it")
        point = src["points"][key]
        if point.get("heal"):
            base_key = f"{point['method']}/k{point['k']}/none"
            base = pts.get(base_key)
            if (
                base is None
                or not _same_windows(base, src["points"].get(base_key, {}))
                or base.get("layers") != point.get("layers")
            ):
                sys.exit(
                    f"[{name}] {key}: its unhealed baseline {base_key} is missing from the target or differs from "
                    f"the side run's (windows or layers); merge {base_key} first, in the same call"
                )
        got, have = item_counts([point]), item_counts(pts.values())
        if got and have and got != have:
            sys.exit(f"[{name}] {key} has accuracy items {sorted(got)} per task, the target's points {sorted(have)}")
        pts[key] = point
    rec.setdefault("calibration", src.get("calibration", {}))
    rec.setdefault("num_layers", src.get("num_layers"))
    setup = target.setdefault("setup", {})
    setup.setdefault("notes", [])
    setup["notes"] += [n for n in notes if n not in setup["notes"]]
    return keys


def check_same_model(name: str, key: str, old: dict, now: dict) -> None:
    """Accuracy added to an existing point must come from the model its perplexity was measured on (a healed
    model is healed again from its saved state, or retrained from the same seed): the first held-out C4
    windows' NLL must match the JSON's."""
    got = [w[0] for w in now["window_nll"]]
    want = [w[0] for w in old["c4"]["window_nll"][: len(got)]]
    if not got or any(abs(x - y) > 1e-6 * max(1.0, abs(y)) for x, y in zip(got, want)):
        sys.exit(
            f"[{name}] {key}: the model rebuilt to add its accuracy scores C4 windows {got}, the JSON {want}: "
            "it is not the model that was measured (other settings or data, or its healing state is gone "
            "and training is not reproducible here); measure accuracy in a fresh run (--acc-n with another --out)"
        )


class Study:
    def __init__(self, args):
        self.args = args
        self.c4, self.eval = Path(args.data_dir) / "calib" / "c4_demo.json", Path(args.data_dir) / "eval"
        self.raw = Path(args.out)
        self.data = json.loads(self.raw.read_text()) if self.raw.is_file() and not args.fresh else {}
        self.data.setdefault("models", {})

    def save(self):
        self.raw.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.raw.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        tmp.replace(self.raw)

    def heal_config(self, method: str, seed: int = 0, linearization: str = "nbl") -> HealConfig:
        a = self.args
        return HealConfig(
            method=method,
            epochs=a.epochs,
            steps=a.steps,
            lr=a.lr,
            input_scaling=a.input_scaling,
            lora_targets=a.lora_targets if method == "lora" and linearization == "nbl" else "auto",
            lora_around_lr=a.lora_around_lr if lora_around(linearization, method, a.lora_targets) else None,
            batch_size=a.batch_size,
            micro_batch_size=a.micro_batch_size,
            patience=a.patience,
            seed=seed,
        )

    def setup(self):
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        a = self.args
        setup = {
            "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads), float32",
            "versions": versions(),
            "commit": commit,
            "splits": {
                "evaluation": {"fraction": HOLDOUT_FRACTION, "seed": HOLDOUT_SEED},
                "early_stopping": {
                    "fraction": HealConfig().heldout_fraction,
                    "seed": HOLDOUT_SEED + 1,
                    "of": "the documents left after the evaluation hold-out",
                },
            },
            "calibration": f"{a.calib_samples} x {a.seq_len} tokens of the training documents, seed 0",
            "selection": f"NBL: NBLConfig's default criterion on {a.selection_samples} x {a.seq_len} tokens of the "
            "early-stopping documents (seed 1; nothing is fitted on them); DROP: cosine",
            "healing": {
                "train": f"{a.samples} x {a.seq_len} tokens of the training documents",
                "heldout": f"{a.heldout_samples} x {a.seq_len} tokens of the early-stopping documents",
                "config": {m: self.heal_config(m).training_fields() for m in ("lora", "distill")},
            },
            "perplexity": {"tokens": a.ppl_tokens, "context": a.context, "stride": a.context},
            "accuracy": {
                "tasks": list(ZERO_SHOT_7),
                "docs_per_task": a.acc_n,
                "subset": "scripts/quality_study.py subset(): the selection study's items",
            },
        }
        self.data["setup"] = merge_setup(self.data.get("setup"), setup, a.note)

    def run_model(self, name: str, ks: list[int]):
        a = self.args
        rec = self.data["models"].setdefault(name, {"points": {}})
        torch.manual_seed(0)
        model, tok = nbl_ext.load_model(name, progress=False)
        rec["num_layers"] = nbl_ext.get_adapter(model).num_layers
        bos = _bos_for(tok)
        wiki = wikitext2_ids(tok, self.eval, a.ppl_tokens)
        c4_ids, _ = c4_heldout_ids(tok, self.c4, a.ppl_tokens)
        docs = split_documents(self.c4, HOLDOUT_FRACTION, seed=HOLDOUT_SEED)[0]
        train_docs, stop_docs = split_documents(docs, HealConfig().heldout_fraction, seed=HOLDOUT_SEED + 1)
        samples = {t: subset(t, a.acc_n, len(OFFLINE_TASKS[t].load(self.eval))) for t in ZERO_SHOT_7} if a.acc_n else {}

        def measure(m, key: str, extra: dict):
            old = rec["points"].get(key)
            if complete(old, a.acc_n):
                return
            t = time.perf_counter()
            if old is None:
                point = dict(extra)
                for corpus, ids in (("wikitext2", wiki), ("c4", c4_ids)):
                    s = perplexity_stats(m, ids, context=a.context, bos_id=bos)
                    point[corpus] = {k: s[k] for k in ("ppl", "ppl_stderr", "nll", "tokens", "window_nll")}
            else:  # a point measured without accuracy: add it, to the model whose perplexity the JSON holds
                check_same_model(
                    name, key, old, perplexity_stats(m, c4_ids[: 2 * a.context], context=a.context, bos_id=bos)
                )
                point = dict(old)
            if a.acc_n:
                out = run_tasks(
                    m,
                    tok,
                    ZERO_SHOT_7,
                    data_dir=self.eval,
                    samples=samples,
                    batch_size=8,
                    max_length=a.context,
                    log_samples=True,
                )
                point["tasks"] = {
                    tn: {
                        "acc": r["metrics"].get("acc"),
                        "acc_stderr": r["stderr"].get("acc"),
                        "n": r["n"],
                        "correct": [int(s["acc"]) for s in sorted(r["samples"], key=lambda s: s["doc_id"])],
                    }
                    for tn, r in out.items()
                }
            point["eval_seconds"] = time.perf_counter() - t + (old or {}).get("eval_seconds", 0.0)
            rec["points"][key] = point
            self.save()
            print(
                f"[{name}] {key}: wikitext2 {point['wikitext2']['ppl']:.2f}, c4 {point['c4']['ppl']:.2f}"
                + (f", 7-task mean {mean_acc7(point):.4f}" if a.acc_n else ""),
                flush=True,
            )

        measure(model, "original", {"k": 0})
        wanted = a.heals.split(",") if a.heals else None
        methods = {m: tuple(h for h in HEALS[m] if wanted is None or h in wanted) for m in a.methods.split(",")}
        todo = [
            heal_key(m, k, h, a.lr, a.samples, a.input_scaling, a.lora_targets, a.lora_around_lr)
            for k in ks
            for m, heals in methods.items()
            for h in ("none", *heals)
        ]
        if all(complete(rec["points"].get(key), a.acc_n) for key in todo):
            return
        prev = rec.get("calibration", {}).get("tokens")
        if prev is not None and prev != a.calib_samples * a.seq_len:
            sys.exit(
                f"[{name}] {self.raw}'s points were calibrated on {prev} tokens, this run would use "
                f"{a.calib_samples} x {a.seq_len} = {a.calib_samples * a.seq_len}: their unhealed baselines would not "
                f"be this run's. Pass --calib-samples {prev // a.seq_len} (and the same --seq-len), another --out, "
                "or --fresh."
            )
        t = time.perf_counter()
        calib = nbl_ext.load_calibration_tokens(
            train_docs, tok, num_samples=a.calib_samples, seq_len=a.seq_len, seed=0, progress=False
        )
        train = nbl_ext.load_calibration_tokens(
            train_docs, tok, num_samples=a.samples, seq_len=a.seq_len, seed=1, progress=False
        )
        heldout = nbl_ext.load_calibration_tokens(
            stop_docs, tok, num_samples=a.heldout_samples, seq_len=a.seq_len, seed=0, progress=False
        )
        # The product's defaults (NBLConfig): validated ridge per layer; NBL's layers by the default criterion
        # (direct_kl) on sequences of the early-stopping documents (nothing is fitted on them); DROP's by cosine.
        cfg = nbl_ext.NBLConfig(num_samples=a.calib_samples, seq_len=a.seq_len)
        res = nbl_ext.calibrate(  # cached (and resumable) under --work: a later run with other heals reuses it
            model,
            calib,
            batch_size=4,
            progress=False,
            output_dir=Path(a.work) / name / f"calib-{a.calib_samples}x{a.seq_len}",
            **cfg.fit_options,
        )
        # NBL's layers: scored by the default criterion (on Gemma 3 the direct_kl scoring is ~15 of the 18 minutes),
        # or, when the JSON already holds every k's unhealed NBL point scored the same way, those points' layers
        prev = rec.get("calibration", {})
        nbl_layers = {k: rec["points"].get(f"nbl/k{k}/none", {}).get("layers") for k in ks}
        reuse = (
            all(v is not None for v in nbl_layers.values())
            and prev.get("criterion") == cfg.criterion
            and prev.get("selection_tokens") == a.selection_samples * a.seq_len
        )
        scored = cfg.needs_selection and "nbl" in methods and not reuse  # DROP's cosine comes from calibration
        if scored:
            selection = nbl_ext.load_calibration_tokens(
                stop_docs, tok, num_samples=a.selection_samples, seq_len=a.seq_len, seed=1, progress=False
            )
            nbl_ext.score_criteria(model, res, cfg.criterion, heldout=selection, data=calib, batch_size=4)
        if scored or not prev:  # a run that reuses the layers keeps the record of the run that chose them
            rec["calibration"] = {
                "tokens": int(calib.numel()),
                "criterion": cfg.criterion,
                "selection_tokens": int(selection.numel()) if scored else 0,
                "seconds": time.perf_counter() - t,
            }
        for k in ks:
            for method, heals in methods.items():
                if method == "nbl" and reuse:
                    sel = nbl_layers[k]
                else:
                    sel = res.select(k, cfg.criterion if method == "nbl" else "cosine")
                known = rec["points"].get(f"{method}/k{k}/none", {}).get("layers")
                if known is not None and known != sel:
                    sys.exit(
                        f"[{name}] {method}/k{k}: this run selects layers {sel}, {self.raw} has {known}: the "
                        "settings differ from the run that wrote it (calibration, selection); use its settings, "
                        "another --out, or --fresh"
                    )
                base = nbl_ext.linearize(copy.deepcopy(model), res, sel, method=method)
                measure(base, f"{method}/k{k}/none", {"k": k, "method": method, "heal": None, "layers": sel})
                for h in heals:
                    key = heal_key(method, k, h, a.lr, a.samples, a.input_scaling, a.lora_targets, a.lora_around_lr)
                    if complete(rec["points"].get(key), a.acc_n):
                        continue  # (a point without accuracy is healed again: from its saved state, if kept)
                    healed = copy.deepcopy(base)
                    state = self.raw.parent / "heal_state" / name / key.replace("/", "-")
                    cfg = self.heal_config(h, linearization=method)
                    cfg.state_dir = str(state)
                    out = nbl_ext.heal(
                        healed,
                        train,
                        cfg,
                        heldout=heldout,
                        teacher=model if h == "distill" else None,
                        progress=a.progress,
                    )
                    summary = out.summary()
                    measure(
                        healed,
                        key,
                        {
                            "k": k,
                            "method": method,
                            "heal": h,
                            "layers": sel,
                            "healing": {
                                "lr": cfg.lr,
                                **{
                                    f: summary[f]
                                    for f in (
                                        "objective",
                                        "targets",
                                        "trainable_parameters",
                                        "steps",
                                        "planned_steps",
                                        "best_step",
                                        "stopped_early",
                                        "heldout_loss_before",
                                        "heldout_loss_after",
                                        "train_tokens",
                                        "heldout_tokens",
                                        "seconds",
                                        "history",
                                    )
                                },
                            },
                        },
                    )
                    del healed
                del base


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated (default: %(default)s)")
    ap.add_argument(
        "--k",
        default=None,
        metavar="MODEL:K1,K2[;MODEL:K]",
        help="k values per model (default: about 20%% and 40%% of the layers)",
    )
    ap.add_argument(
        "--methods",
        default=",".join(HEALS),
        help="comma-separated, e.g. drop to run DROP's points alone (default: %(default)s)",
    )
    ap.add_argument(
        "--heals",
        default=None,
        help="comma-separated healing methods to run (lora, distill; default: all of each method's)",
    )
    ap.add_argument("--data-dir", default=str(SHARED), help="the shared data (calib/, eval/; default: %(default)s)")
    ap.add_argument("--out", default=str(DOCS / "results" / "heal_study.json"), help="raw JSON (default: %(default)s)")
    ap.add_argument(
        "--page",
        default=None,
        help="rendered page (default: docs/results.md when --out is the study's own JSON; a side run with "
        "another --out renders nothing unless given one)",
    )
    ap.add_argument(
        "--selection-raw",
        default=str(DOCS / "results" / "selection_study.json"),
        help="the selection study's raw JSON, the rest of the page (default: %(default)s)",
    )
    ap.add_argument(
        "--work",
        default=str(ROOT / ".heal_work"),
        help="cached calibrations, one per model and size (default: %(default)s)",
    )
    ap.add_argument("--note", action="append", default=[], help="a note on how this run was made (kept in the JSON)")
    ap.add_argument("--render-only", action="store_true", help="only render the page from the JSON")
    ap.add_argument(
        "--merge",
        metavar="SIDE.json",
        help="copy the --points of one --models model from a side run's JSON (a run with another --out, e.g. two "
        "processes side by side) into --out, checking that they pair with its baselines; --note says how they ran",
    )
    ap.add_argument(
        "--points",
        metavar="KEY",
        action="append",
        default=[],
        help="with --merge: a point key (keys hold commas: repeat the flag for each), baselines first",
    )
    ap.add_argument("--fresh", action="store_true", help="ignore the existing JSON and recompute everything")
    ap.add_argument(
        "--calib-samples", type=int, default=64, help="calibration sequences (default 64, the committed study's)"
    )
    ap.add_argument("--selection-samples", type=int, default=8, help="selection sequences (default 8)")
    ap.add_argument(
        "--samples",
        type=int,
        default=SAMPLES,
        help="healing sequences (default %(default)s, the committed study's; another value keys its points "
        "'<method>/k<k>/<heal>@n<value>')",
    )
    ap.add_argument("--heldout-samples", type=int, default=8, help="early-stopping sequences (default 8)")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    ap.add_argument("--epochs", type=float, default=3.0, help="healing epochs (default 3, the paper's)")
    ap.add_argument("--steps", type=int, default=None, help="healing steps (overrides --epochs)")
    ap.add_argument(
        "--lr",
        type=float,
        default=PAPER_LR,
        help="healing learning rate (default 1e-4, the paper's; another value keys its points "
        "'<method>/k<k>/<heal>@lr<value>', beside the paper's)",
    )
    ap.add_argument(
        "--input-scaling",
        choices=["none", "rms"],
        default="none",
        help="HealConfig.input_scaling (default none, the committed study's; rms keys its points '...@rms')",
    )
    ap.add_argument(
        "--lora-targets",
        choices=["auto", "around"],
        default="auto",
        help="HealConfig.lora_targets for NBL's LoRA (default auto: the maps alone, the committed study's; around: "
        "also the modules around them, as DROP's LoRA always is; keys NBL's points '...@around')",
    )
    ap.add_argument(
        "--lora-around-lr",
        type=float,
        default=None,
        help="with --lora-targets around: HealConfig.lora_around_lr, the rate of the LoRA on the modules around "
        "the maps (default: --lr); keys NBL's points '...,around@lr<value>'",
    )
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per step (default 16, the paper's)")
    ap.add_argument("--micro-batch-size", type=int, default=4, help="sequences per forward (default 4)")
    ap.add_argument("--patience", type=int, default=3, help="early-stopping patience (default 3)")
    ap.add_argument("--ppl-tokens", type=int, default=4096, help="tokens per perplexity corpus (default 4096)")
    ap.add_argument("--context", type=int, default=512, help="perplexity window and lm-eval max length (default 512)")
    ap.add_argument("--acc-n", type=int, default=50, help="documents per zero-shot task (default 50; 0: skip)")
    ap.add_argument("--progress", action="store_true", help="healing progress bars")
    args = ap.parse_args(argv)
    if args.lora_around_lr is not None and args.lora_targets != "around":
        ap.error("--lora-around-lr sets the rate of the LoRA around the maps: it needs --lora-targets around")
    raw = Path(args.out)
    own = raw.resolve() == (DOCS / "results" / "heal_study.json").resolve()
    page = Path(args.page) if args.page else DOCS / "results.md" if own else None
    if args.merge:
        if not args.points or "," in args.models:
            sys.exit("--merge needs --points KEY (repeated for each point) and one model in --models")
        study = Study(args)
        merged = merge_points(study.data, json.loads(Path(args.merge).read_text()), args.models, args.points, args.note)
        study.save()
        print(f"merged {', '.join(merged)} of {args.models} from {args.merge} into {raw}", flush=True)
    elif not args.render_only:
        ks = dict(MODELS)
        for part in (args.k or "").split(";"):
            if part.strip():
                name, _, values = part.partition(":")
                ks[name.strip()] = [int(v) for v in values.split(",")]
        bad = set(args.methods.split(",")) - set(HEALS)
        if bad:
            sys.exit(f"unknown --methods {sorted(bad)}; choose from {', '.join(HEALS)}")
        known = sorted({h for hs in HEALS.values() for h in hs})
        bad = set((args.heals or ",".join(known)).split(",")) - set(known)
        if bad:
            sys.exit(f"unknown --heals {sorted(bad)}; choose from {', '.join(known)}")
        study = Study(args)
        for name in args.models.split(","):
            if name not in MODELS:
                sys.exit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
            check_items(name, study.data["models"].get(name, {}), args.acc_n)
        study.setup()
        study.save()
        for name in args.models.split(","):
            study.run_model(name, ks[name])
    if page is None:
        print(f"not rendering docs/results.md from {raw} (a side run); pass --page to render one", flush=True)
        return
    write_page(Path(args.selection_raw), page, nbl_ext.NBLConfig().criterion, heal_raw=raw)


if __name__ == "__main__":
    main()
