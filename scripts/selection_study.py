"""Layer selection that predicts the damage, and fits that hold up on held-out data (issue 11, items 3-5, 7).

    .venv/bin/python scripts/selection_study.py                      # compute what is missing, then render
    .venv/bin/python scripts/selection_study.py --parts truth,criteria --models smollm2-135m
    .venv/bin/python scripts/selection_study.py --render             # docs/results.md from the JSON only
    .venv/bin/python scripts/selection_study.py --smoke --out /tmp/s  # tiny budget: checks the script, no page

Resumable: the raw JSON (default docs/results/selection_study.json) is rewritten after every point, the
calibrations are cached (and resumable) under --work, and a rerun computes only what is missing. CPU,
float32, both offline real models (SmolLM2-135M, Gemma 3 270M).

Data: three disjoint sets, fixed by seed (GUIDE.md section 7), nothing reported is used to choose anything.

* test: the C4 documents held out from calibration by every nbl tool (``split_documents(c4_demo.json,
  HOLDOUT_FRACTION, seed=HOLDOUT_SEED)``, as :func:`nbl_ext.evaluate.c4_heldout_ids`), WikiText-2 test and
  the 7 zero-shot tasks;
* selection: ``SELECTION_FRACTION`` of the remaining C4 documents (``split_documents(..., seed=SELECTION_SEED)``),
  packed into ``--seq-len`` sequences: the first ``--direct-samples`` feed the direct score (direct_nll and
  greedy's steps), the next ``--truth-samples`` the ground truth (disjoint from the direct score's);
* calibration: the other C4 documents (the ridge is chosen by cross-validation inside them).

Parts (``--parts``):

* ``truth``: per layer, the increase of the mean NLL on the ground-truth selection tokens with that layer
  alone linearized (the validated map of the all-data calibration). (L + 1) forwards over those tokens.
* ``criteria``: every registered criterion on that calibration (the statistics ones come with it; direct_nll on
  the direct tokens; greedy with base direct_nll for the largest k of the grid), each one's cost in seconds and
  its Spearman correlation with the ground truth (signed so that +1 ranks the layers as the truth does).
* ``ppl``: perplexity on held-out C4 and WikiText-2 for k on the grid (10..40% of the layers), every criterion's
  layers with the NBL map, DROP beside (cosine, branch removed); paired (same windows) NLL differences.
  ``--confirm WHY`` re-measures into ``ppl_confirm`` beside the table (e.g. more ``--ppl-tokens`` where a
  comparison missed within noise); the page shows it under the table with WHY and its own target row.
* ``overfit``: in-sample, cross-validated and measured held-out NMSE (on test C4 tokens: a report, chooses
  nothing) against calibration size (about 8k, 32k and all calibration tokens), ridge 0 and validated ridge;
  and self-generated calibration at ``--self-samples`` sequences.
* ``accuracy``: the 7 zero-shot tasks at the headline points (original; at k = 20% and 40% of the layers: the
  criterion with the best Spearman on the selection set, the CCA bound, DROP), on
  ``--acc-n`` items per task chosen by ``sha256(task:0:i)`` order (scripts/quality_study.py's ``subset``), the
  same items for every variant; the paired s.e. of the 7-task mean difference is
  sqrt(sum_t var_t(d) / n_t) / 7 (GUIDE.md section 7: ~300 items per task give 0.01 at 20% disagreement).
* ``speed``: calibration (folds and ridge grid, all calibration tokens) against a plain forward pass over the
  same tokens in the same batches, same run; the ratio.

CPU time on this 2-core machine, as tokens forwarded per model (L layers, T_c ~110k calibration tokens at
seq_len 512, k grid 10..40% of L, greedy to the largest k), SmolLM2 (L = 30) figures:

* calibration, all tokens, 5 folds: ~1 forward over T_c (110k) plus L x (5 + 3) float64 eighs of d x d;
* ``overfit``: 2 x (8k + 32k + T_c) = 300k, 7 x 8k of measured held-out NMSE, 32 x 512 sampled tokens;
* ``truth``: (L + 1) x 16 x 512 = 254k; ``criteria``: direct_nll (L + 1) x 8 x 512 = 127k, greedy
  12 x T_c = 1.3M of re-fits plus sum_{s<12} (L - s + 1) = 306 direct passes = 1.25M (--greedy-samples and
  --greedy-steps cut it);
* ``ppl``: (1 + 7 x 4) points x 2 corpora x 8k = 0.48M; ``speed``: 2 x T_c = 220k;
* ``accuracy``: 7 variants x 7 tasks x 300 items, ~200 tokens per item (GUIDE.md: ~4M tokens for the ~20k
  items of the full splits): ~2.9M.

About 4.1M tokens without accuracy, 7M with it. At the GUIDE's rate (~250 tokens/s for one sequence, a few
times that batched: take ~600 tokens/s at batch 4) that is ~2 h + ~1.3 h for SmolLM2; Gemma 3 (L = 18, ~2x
slower per token, greedy 7 steps) about 5 h. Measured here: the --smoke run (seq_len 64, 768 calibration
tokens, SmolLM2) ran truth (31 x 256 tokens) in 231 s and direct_nll (31 x 128) in 159 s, i.e. ~35
tokens/s unbatched at length 64 with one thread while the 2 cores carried a load of ~10: a busy machine is
5-20x slower than the estimate. Run with ``OMP_NUM_THREADS=1`` when the cores are shared: a 576 x 576
float64 eigh took 18 s with 2 OpenMP threads under that load and 0.9 s with one. Start the parts in the
background (``nohup ... &``) and render when done.
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
from safetensors.torch import load_file, save_file

import nbl_ext
from nbl_ext.criteria import get_criterion
from nbl_ext.crossval import DEFAULT_FOLDS, DEFAULT_RIDGES
from nbl_ext.data import HOLDOUT_FRACTION, HOLDOUT_SEED, split_documents
from nbl_ext.evaluate import _bos_for, _windows, c4_heldout_ids, perplexity_stats, run_tasks, versions, wikitext2_ids
from nbl_ext.selection import layer_nll_increases
from nbl_ext.tasks import OFFLINE_TASKS, ZERO_SHOT_7

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_study import heldout_nmse, subset
from selection_report import CONFIRM, CONFIRM_SETUP, paired_nll, spearman, write_page
from selection_report import median as _median

ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT / ".." / "shared" / "data").resolve()
C4 = SHARED / "calib" / "c4_demo.json"
EVAL = SHARED / "eval"
MODELS = ("smollm2-135m", "gemma3-270m")
PARTS = ("truth", "criteria", "ppl", "greedy", "overfit", "accuracy", "speed")
SELECTION_FRACTION, SELECTION_SEED = 0.15, 1
K_FRACTIONS = (0.1, 0.2, 0.3, 0.4)  # the k grid; 0.2 and 0.4 are the headline points
#: Criteria that select layers for the NBL map in the ppl part (DROP is added beside them).
PPL_CRITERIA = ("cca_bound", "cv_nmse", "residual_ratio", "cosine", "direct_nll", "direct_kl", "greedy")
#: The default of --ppl-criteria (cosine with the NBL map left out to save CPU time; pass it to add it).
DEFAULT_PPL_CRITERIA = ("cca_bound", "cv_nmse", "residual_ratio", "direct_nll", "direct_kl", "greedy")
STATISTICS = ("cca_bound", "nmse", "cosine", "cv_nmse", "residual_ratio")


def ks(n_layers: int) -> list[int]:
    return sorted({max(1, round(f * n_layers)) for f in K_FRACTIONS})


def signed(crit: str, scores: list[float]) -> list[float]:
    """Scores turned so that lower = more replaceable (the ground truth's direction)."""
    return list(scores) if get_criterion(crit).direction == "lower" else [-s for s in scores]


def merge_items(old_ids: list[int], old: list[int], new_ids: list[int], new: list[int]) -> list[int]:
    """Per-item results of two disjoint item sets, merged in document order (the order of a fresh run's
    ``correct`` list); refuses overlapping or mismatched sets rather than pairing the wrong items."""
    if len(old_ids) != len(old) or len(new_ids) != len(new):
        raise ValueError(f"{len(old)} results for {len(old_ids)} items, {len(new)} for {len(new_ids)}")
    if set(old_ids) & set(new_ids):
        raise ValueError(f"the item sets overlap: {sorted(set(old_ids) & set(new_ids))[:5]}")
    return [c for _, c in sorted(zip(old_ids + new_ids, old + new))]


class Study:
    def __init__(self, args):
        self.args = args
        self.raw = Path(args.raw)
        self.work = Path(args.work)
        self.data = json.loads(self.raw.read_text()) if self.raw.is_file() and not args.fresh else {}
        self.data.setdefault("models", {})

    def save(self):
        self.raw.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.raw.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        tmp.replace(self.raw)

    def setup(self):
        a = self.args
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        old = self.data.get("setup", {})
        notes = list(old.get("notes", []))
        if old.get("commit") and old["commit"] != commit:  # a resumed study: say which parts ran where
            note = f"parts computed before commit {commit} ran on commit {old['commit']} (resumed)"
            if note not in notes:
                notes.append(note)
        for note in self.args.note:
            if note not in notes:
                notes.append(note)
        self.data["setup"] = {
            "notes": notes,
            "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads), float32",
            "versions": versions(),
            "commit": commit,
            "smoke": bool(a.smoke),
            "sets": {
                "test": f"C4 documents held out by split_documents({C4.name}, {HOLDOUT_FRACTION}, "
                f"seed={HOLDOUT_SEED}); "
                "WikiText-2 test; the 7 zero-shot tasks",
                "selection": f"{SELECTION_FRACTION} of the other C4 documents (split_documents seed {SELECTION_SEED}); "
                f"packed {a.seq_len}-token sequences: the first {a.direct_samples} for the direct score, "
                f"the next {a.truth_samples} for the ground truth",
                "calibration": "the remaining C4 documents, packed (seed 0)",
            },
            "folds": DEFAULT_FOLDS,
            "ridges": list(DEFAULT_RIDGES),
            "seq_len": a.seq_len,
            "perplexity": {"tokens": a.ppl_tokens, "context": a.context},
            "accuracy": {
                "tasks": list(ZERO_SHOT_7),
                "items_per_task": a.acc_n,
                "items": "sha256(task:0:i) order, first N (scripts/quality_study.py subset)",
            },
        }

    # --- data -------------------------------------------------------------------------------
    def sets(self, tok):
        rest, _test = split_documents(C4, HOLDOUT_FRACTION, seed=HOLDOUT_SEED)
        calib_docs, sel_docs = split_documents(rest, SELECTION_FRACTION, seed=SELECTION_SEED)
        a = self.args
        sel = nbl_ext.load_calibration_tokens(
            sel_docs, tok, num_samples=a.direct_samples + a.truth_samples, seq_len=a.seq_len, seed=0, progress=False
        )
        return calib_docs, sel[: a.direct_samples], sel[a.direct_samples :]

    def calib_tokens(self, tok, docs, samples: int | None):
        """``samples`` packed sequences of the calibration documents (None: as many as they hold)."""
        if samples is None:  # every sequence the documents fill (text + EOS per document, BOS per sequence)
            total = sum(
                len(ids) + 1
                for ids in tok([d for d in docs if d.strip()], add_special_tokens=False, verbose=False)["input_ids"]
            )
            samples = total // (self.args.seq_len - (1 if _bos_for(tok) is not None else 0))
        return nbl_ext.load_calibration_tokens(
            docs, tok, num_samples=samples, seq_len=self.args.seq_len, seed=0, progress=False
        )

    def calibrate(self, model, tokens, tag, **kwargs):
        t = time.perf_counter()
        res = nbl_ext.calibrate(
            model, tokens, batch_size=self.args.batch_size, progress=False, output_dir=self.work / tag, **kwargs
        )
        return res, time.perf_counter() - t

    # --- one model ---------------------------------------------------------------------------
    def run_model(self, name, parts):
        a = self.args
        rec = self.data["models"].setdefault(name, {})
        torch.manual_seed(0)
        model, tok = nbl_ext.load_model(name, progress=False)
        adapter = nbl_ext.get_adapter(model)
        n = adapter.num_layers
        rec.update(num_layers=n, hidden_size=adapter.hidden_size, k_grid=ks(n))
        bos = _bos_for(tok)
        calib_docs, direct_ids, truth_ids = self.sets(tok)
        full_tokens = self.calib_tokens(tok, calib_docs, a.calib_samples)
        grid = dict(folds=DEFAULT_FOLDS, ridges=DEFAULT_RIDGES)
        result, secs = self.calibrate(model, full_tokens, f"{name}/all", **grid)
        if "calibration" not in rec:
            rec["calibration"] = {"tokens": int(full_tokens.numel()), "seconds": secs, "layers": result.table()}
            self.save()
        log = lambda msg: print(f"[{name}] {msg}", flush=True)  # noqa: E731

        for part in parts:  # in the order given (ppl may come twice: before and after greedy)
            if part == "truth" and "truth" not in rec:
                t = time.perf_counter()
                maps = {lc.layer: (lc.weight, lc.bias) for lc in result.layers}  # each layer alone linearized
                base, inc = layer_nll_increases(model, maps, truth_ids, batch_size=a.batch_size)
                delta = [inc[i] for i in range(n)]
                rec["truth"] = {
                    "tokens": int(truth_ids.numel()),
                    "nll_original": base,
                    "delta": delta,
                    "seconds": time.perf_counter() - t,
                    "forward_passes": n + 1,
                }
                self.save()
                log(f"ground truth in {rec['truth']['seconds']:.0f} s")

            if part == "criteria":
                crits = rec.setdefault("criteria", {})
                for crit in STATISTICS:
                    if crit not in crits:
                        crits[crit] = {
                            "scores": [lc.score(crit) for lc in result.layers],
                            "seconds": None,
                            "cost": "in the calibration pass",
                        }
                todo = [c for c in ("direct_nll", "direct_kl") if c not in crits]  # one pass serves both
                if todo:
                    t = time.perf_counter()
                    got = nbl_ext.score_criteria(model, result, todo, heldout=direct_ids, batch_size=a.batch_size)
                    secs = time.perf_counter() - t
                    for c in todo:
                        crits[c] = {
                            "scores": got[c],
                            "seconds": secs,
                            "forward_passes": n + 1,
                            "tokens": int(direct_ids.numel()),
                            "shared_with": [o for o in todo if o != c],
                        }
                    self.save()
                    log(f"{', '.join(todo)} in {secs:.0f} s")
                self.spearmans(rec)
            if part == "greedy" and "greedy" not in rec.get("criteria", {}):
                crits = rec.setdefault("criteria", {})
                t = time.perf_counter()
                g_tokens = full_tokens if a.greedy_samples is None else full_tokens[: a.greedy_samples]
                g = nbl_ext.greedy_selection(
                    model,
                    g_tokens,
                    steps=a.greedy_steps or max(ks(n)),
                    heldout=direct_ids[: a.greedy_heldout_samples],
                    base=a.greedy_base,
                    batch_size=a.batch_size,
                    **grid,
                )
                crits["greedy"] = {
                    "scores": [float(g.order.index(i)) for i in range(n)],
                    "order": g.order,
                    "chosen": g.chosen,
                    "seconds": time.perf_counter() - t,
                    "calibration_passes": g.calibration_passes,
                    "heldout_passes": g.heldout_passes,
                    "calibration_tokens": int(g_tokens.numel()),
                    "base": a.greedy_base,
                    "heldout_tokens": int(direct_ids[: a.greedy_heldout_samples].numel()),
                }
                (self.work / name).mkdir(parents=True, exist_ok=True)
                save_file(
                    {
                        f"{i}.{piece}": getattr(lc, piece).contiguous()
                        for i, lc in g.maps.items()
                        for piece in ("weight", "bias")
                    },
                    self.work / name / "greedy_maps.safetensors",
                )
                self.save()
                log(f"greedy in {crits['greedy']['seconds']:.0f} s: {g.chosen}")
                del g  # its maps and statistics: the ppl part reads the saved maps (on Gemma 3 the ppl part
                # alone peaks at about 7.8 GB)
                self.spearmans(rec)

            if part == "ppl":
                self.ppl(name, rec, model, tok, result, bos)
            if part == "overfit":
                self.overfit(name, rec, model, tok, calib_docs, bos, result)
            if part == "accuracy":
                self.accuracy(name, rec, model, tok, result)
            if part == "speed" and "speed" not in rec:
                self.speed(rec, model, full_tokens, result, secs)

    def spearmans(self, rec):
        """Each criterion's Spearman correlation with the ground truth (when both are there)."""
        if "truth" in rec:
            for crit, c in rec.get("criteria", {}).items():
                c["spearman"] = spearman(signed(crit, c["scores"]), rec["truth"]["delta"])
            self.save()

    # --- variants ------------------------------------------------------------------------------
    def variant(self, name, rec, model, result, crit, k):
        """The model with k layers chosen by ``crit`` linearized (DROP: chosen by cosine, removed)."""
        if crit == "drop":
            return nbl_ext.linearize(copy.deepcopy(model), result, result.select(k, "cosine"), replacement="remove")
        if crit == "greedy":
            c = rec["criteria"]["greedy"]
            if k > len(c["chosen"]):
                raise SystemExit(f"greedy ran {len(c['chosen'])} steps; k = {k} needs more (--greedy-steps)")
            layers = sorted(c["chosen"][:k])
            maps = load_file(self.work / name / "greedy_maps.safetensors")
            res = copy.deepcopy(result)
            for i in layers:  # the maps greedy re-fitted on the partially linearized model
                res.layers[i].weight, res.layers[i].bias = maps[f"{i}.weight"], maps[f"{i}.bias"]
            return nbl_ext.linearize(copy.deepcopy(model), res, layers)
        scores = rec["criteria"][crit]["scores"] if crit in rec.get("criteria", {}) else None
        if scores is not None and crit not in result.layers[0].scores:
            result.set_scores(crit, scores)
        return nbl_ext.linearize(copy.deepcopy(model), result, result.select(k, crit))

    def ppl(self, name, rec, model, tok, result, bos):
        a = self.args
        pts = rec.setdefault(CONFIRM if a.confirm else "ppl", {})
        if a.confirm:  # a re-measure on more tokens, beside the table: its own windows, the table's layers
            rec.setdefault(CONFIRM_SETUP, {}).update(tokens=a.ppl_tokens, context=a.context, why=a.confirm)
        corpora = {"wikitext2": wikitext2_ids(tok, EVAL, a.ppl_tokens), "c4": c4_heldout_ids(tok, C4, a.ppl_tokens)[0]}

        def measure(m):
            out = {}
            for corpus, ids in corpora.items():
                s = perplexity_stats(m, ids, context=a.context, bos_id=bos, batch_size=a.batch_size)
                out[corpus] = {key: s[key] for key in ("ppl", "ppl_stderr", "nll", "tokens", "window_nll")}
            return out

        for corpus, ids in corpora.items():  # every point of the table is paired window by window
            have = pts.get("original", {}).get(corpus, {}).get("window_nll")
            body = a.context - (bos is not None)  # perplexity_stats' own windows (a BOS takes one slot)
            want = len(_windows(ids.shape[-1], body, body))
            if have is not None and len(have) != want:
                raise SystemExit(
                    f"[{name}] the JSON's perplexity points were measured on {len(have)} windows of {corpus}, this "
                    f"run would measure {want} (--ppl-tokens {a.ppl_tokens}, --context {a.context}): paired "
                    f"differences need the same windows; pass --ppl-tokens {len(have) * a.context} or use "
                    "another --raw"
                )
        if "original" not in pts:
            pts["original"] = {"k": 0, **measure(model)}
            self.save()
        crit_list = [c for c in a.ppl_criteria.split(",") if c]
        for k in a.ppl_ks or ks(rec["num_layers"]):
            for crit in (*crit_list, "drop"):
                key = f"{crit}/k{k}"
                if key in pts or (crit not in ("drop", *STATISTICS) and crit not in rec.get("criteria", {})):
                    continue
                if crit not in ("drop", "greedy"):  # the same layers with the same maps: the same model
                    layers = sorted(result.select(k, crit)) if crit in result.layers[0].scores else None
                    if layers is None and crit in rec.get("criteria", {}):
                        layers = sorted(get_criterion(crit).order(rec["criteria"][crit]["scores"])[:k])
                    twin = next(
                        (
                            q
                            for q, p in pts.items()
                            if p.get("k") == k
                            and p.get("criterion") not in ("drop", "greedy", None)
                            and p.get("layers") == layers
                            and "same_as" not in p
                        ),
                        None,
                    )
                    if twin is not None:
                        pts[key] = {**copy.deepcopy(pts[twin]), "criterion": crit, "same_as": twin, "seconds": 0.0}
                        self.save()
                        print(f"[{name}] {key}: the layers of {twin}", flush=True)
                        continue
                if crit == "greedy" and k > len(rec["criteria"]["greedy"]["chosen"]):
                    print(
                        f"[{name}] {key}: skipped, greedy ran {len(rec['criteria']['greedy']['chosen'])} steps "
                        "(--greedy-steps)",
                        flush=True,
                    )
                    continue
                t = time.perf_counter()
                m = self.variant(name, rec, model, result, crit, k)
                layers = m.config.nbl["layers"]
                pts[key] = {
                    "k": k,
                    "criterion": crit,
                    "layers": layers,
                    **measure(m),
                    "seconds": time.perf_counter() - t,
                }
                del m
                self.save()
                print(
                    f"[{name}] {key}: c4 {pts[key]['c4']['ppl']:.2f}, wikitext2 {pts[key]['wikitext2']['ppl']:.2f}",
                    flush=True,
                )
            for crit in crit_list:  # NLL(crit) - NLL(DROP) over the same windows, and its paired s.e.
                key = f"{crit}/k{k}"
                if key in pts and f"drop/k{k}" in pts:
                    for corpus in corpora:
                        pts[key][corpus]["vs_drop"] = paired_nll(pts[f"drop/k{k}"], pts[key], corpus)
            self.save()

    def overfit(self, name, rec, model, tok, calib_docs, bos, result):
        a = self.args
        out = rec.setdefault("overfit", {})
        test_c4 = c4_heldout_ids(tok, C4, a.nmse_tokens)[0]
        sizes = {"8k": max(2, 8192 // a.seq_len), "32k": max(2, 32768 // a.seq_len), "all": a.calib_samples}
        if a.smoke:
            sizes = {"8k": 6, "all": a.calib_samples}
        # The full-data validated point first (it is the main calibration: no new pass), then the curve.
        order = [("all", "validated")] + [(lb, r) for lb in sizes for r in ("ridge0", "validated")]
        for label, ridge in dict.fromkeys(order):
            samples = sizes[label]
            key = f"c4/{label}/{ridge}"
            if key in out:
                continue
            tokens = self.calib_tokens(tok, calib_docs, samples)
            if (label, ridge) == ("all", "validated"):
                res, secs = result, rec["calibration"]["seconds"]
            else:
                kwargs = (
                    dict(folds=DEFAULT_FOLDS) if ridge == "ridge0" else dict(folds=DEFAULT_FOLDS, ridges=DEFAULT_RIDGES)
                )
                res, secs = self.calibrate(model, tokens, f"{name}/overfit-{label}-{ridge}", **kwargs)
            held = heldout_nmse(model, nbl_ext.get_adapter(model), res, test_c4, a.context, bos)
            out[key] = _overfit_record(res, tokens, held, secs)
            self.save()
            print(
                f"[{name}] overfit {key}: median NMSE held out {_median(held):.3f}, in sample {_median(res.nmse):.3f}",
                flush=True,
            )
        key = "self/validated"
        if a.self_samples and key not in out:
            t = time.perf_counter()
            tokens = nbl_ext.load_calibration_tokens(
                "self", tok, num_samples=a.self_samples, seq_len=a.seq_len, seed=0, model=model, progress=False
            )
            t_data = time.perf_counter() - t
            res, secs = self.calibrate(
                model, tokens, f"{name}/overfit-self", folds=DEFAULT_FOLDS, ridges=DEFAULT_RIDGES
            )
            held = heldout_nmse(model, nbl_ext.get_adapter(model), res, test_c4, a.context, bos)
            out[key] = _overfit_record(res, tokens, held, secs, sampling_seconds=t_data)
            self.save()

    def best_criterion(self, rec) -> str:
        """The criterion with the highest Spearman with the ground truth (selection tokens only)."""
        crits = {c: v["spearman"] for c, v in rec.get("criteria", {}).items() if "spearman" in v and c != "nmse"}
        if not crits:
            raise SystemExit(
                "accuracy needs the truth and criteria parts first (the best criterion is chosen on the selection set)"
            )
        return max(crits, key=crits.get)

    def accuracy(self, name, rec, model, tok, result):
        a = self.args
        if a.acc_n <= 0:
            return
        acc = rec.setdefault("accuracy", {})
        total = {t: self._total(t) for t in ZERO_SHOT_7}  # each task's documents, read once
        self.data.setdefault("setup", {}).setdefault("accuracy", {})["task_items"] = total  # caps "items needed"
        samples = {t: subset(t, a.acc_n, total[t]) for t in ZERO_SHOT_7}
        # Items per task each point has; a point on fewer is grown with --acc-extend: subset(t, n) is the first n of
        # one sha256 order, so a smaller subset lies inside a larger one and only the difference is measured.
        have = {(key, t): r["n"] for key, point in acc.items() for t, r in point["tasks"].items()}
        off = {n for (_, t), n in have.items() if n != len(samples[t])}
        if off and (not a.acc_extend or any(n > len(samples[t]) for (_, t), n in have.items())):
            raise SystemExit(
                f"[{name}] the JSON's accuracy points used {sorted(set(have.values()))} items per task, this run "
                f"--acc-n {a.acc_n}: paired differences need the same items; pass --acc-n {max(have.values())}, "
                "--acc-extend (with a larger --acc-n: every point gets the items it lacks, the same for all) or "
                "use another --raw"
            )
        best = self.best_criterion(rec)
        n = rec["num_layers"]
        heads = sorted({max(1, round(0.2 * n)), max(1, round(0.4 * n))})
        points = [("original", 0)] + [(c, k) for k in heads for c in dict.fromkeys((best, "cca_bound", "drop"))]
        keys = {"original" if crit == "original" else f"{crit}/k{k}": (crit, k) for crit, k in points}
        if a.acc_points:
            wanted = a.acc_points.split(",")
            if unknown := [p for p in wanted if p not in keys]:
                raise SystemExit(f"[{name}] --acc-points: no headline point {unknown}; they are {', '.join(keys)}")
            keys = {p: keys[p] for p in wanted}
        for key, (crit, k) in keys.items():
            old = acc.get(key, {}).get("tasks", {})
            old_ids = {t: subset(t, old[t]["n"], total[t]) if t in old else [] for t in ZERO_SHOT_7}
            todo = {t: sorted(set(ids) - set(old_ids[t])) for t, ids in samples.items()}
            todo = {t: ids for t, ids in todo.items() if ids}  # an empty list would mean every document to lm-eval
            if not todo:
                continue
            t0 = time.perf_counter()
            m = model if crit == "original" else self.variant(name, rec, model, result, crit, k)
            out = run_tasks(
                m,
                tok,
                list(todo),
                data_dir=EVAL,
                samples=todo,
                batch_size=8,
                max_length=a.context,
                log_samples=True,
            )
            tasks = {}
            for t in ZERO_SHOT_7:
                new = [int(s["acc"]) for s in sorted(out[t]["samples"], key=lambda s: s["doc_id"])] if t in out else []
                correct = merge_items(old_ids[t], old[t]["correct"] if t in old else [], todo.get(t, []), new)
                tasks[t] = {"acc": sum(correct) / len(correct), "n": len(correct), "correct": correct}
            acc[key] = {
                "k": k,
                "criterion": crit,
                "seconds": time.perf_counter() - t0 + acc.get(key, {}).get("seconds", 0.0),
                **({"extended_from": sorted({r["n"] for r in old.values()})} if old else {}),
                "tasks": tasks,
            }
            self.save()
            print(f"[{name}] accuracy {key} in {acc[key]['seconds']:.0f} s", flush=True)

    @staticmethod
    def _total(task: str) -> int:
        return len(OFFLINE_TASKS[task].load(EVAL))

    def speed(self, rec, model, tokens, result, calib_seconds):
        t = time.perf_counter()
        with torch.inference_mode():
            for chunk in tokens.split(self.args.batch_size):
                model(input_ids=chunk, use_cache=False)
        fwd = time.perf_counter() - t
        # A fresh calibration in the same run (the cached one may come from another process or a resume).
        t = time.perf_counter()
        nbl_ext.calibrate(
            model, tokens, batch_size=self.args.batch_size, progress=False, folds=DEFAULT_FOLDS, ridges=DEFAULT_RIDGES
        )
        cal = time.perf_counter() - t
        rec["speed"] = {
            "tokens": int(tokens.numel()),
            "forward_seconds": fwd,
            "calibrate_seconds": cal,
            "ratio": cal / fwd,
            "batch_size": self.args.batch_size,
        }
        self.save()
        print(f"calibration {cal:.0f} s vs forward {fwd:.0f} s: {cal / fwd:.2f}x", flush=True)


def _overfit_record(res, tokens, held, secs, **extra) -> dict:
    """One point of the overfitting curve: per layer in-sample, cross-validated and held-out NMSE, chosen ridge."""
    return {
        "tokens": int(tokens.numel()),
        **extra,
        "seconds": secs,
        "in_sample": res.nmse,
        "cv": [lc.scores["cv_nmse"] for lc in res.layers],
        "heldout": held,
        "ridge": [lc.ridge for lc in res.layers],
    }


def uneven_accuracy(data: dict) -> list[str]:
    """Models whose accuracy points do not all hold the same items per task (the page pairs them item by item)."""
    out = []
    for name, rec in data.get("models", {}).items():
        counts = {
            json.dumps({t: r.get("n") for t, r in sorted(p.get("tasks", {}).items())})
            for p in rec.get("accuracy", {}).values()
        }
        if len(counts) > 1:
            out.append(name)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated (default: %(default)s)")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated (default: %(default)s)")
    ap.add_argument("--raw", default=str(ROOT / "docs" / "results" / "selection_study.json"), help="the raw JSON")
    ap.add_argument("--work", default=str(ROOT / ".selection_work"), help="cached calibrations (default: %(default)s)")
    ap.add_argument("--page", default=str(ROOT / "docs" / "results.md"), help="the rendered page (plots beside it)")
    ap.add_argument(
        "--merge",
        nargs="+",
        default=[],
        metavar="RAW",
        help="merge these raw JSON files (e.g. one per model, run as separate processes) into --raw first",
    )
    ap.add_argument("--render", action="store_true", help="only render the page from the JSON")
    ap.add_argument("--note", action="append", default=[], help="a note on how this run was made (kept in the JSON)")
    ap.add_argument("--fresh", action="store_true", help="ignore the existing JSON")
    ap.add_argument("--smoke", action="store_true", help="tiny budget to check the script; needs --out, no page")
    ap.add_argument("--out", default=None, help="with --smoke: where the JSON, the work files and the page go")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--calib-samples", type=int, default=None, help="calibration sequences (default: all that fit)")
    ap.add_argument("--greedy-samples", type=int, default=None, help="calibration sequences greedy re-fits on")
    ap.add_argument("--greedy-steps", type=int, default=None, help="greedy steps (default: the largest k)")
    ap.add_argument(
        "--greedy-base", default="direct_nll", help="the score greedy ranks candidates by at each step (%(default)s)"
    )
    ap.add_argument(
        "--greedy-heldout-samples",
        type=int,
        default=None,
        help="direct-score sequences greedy's direct_nll steps use (default: all --direct-samples)",
    )
    ap.add_argument(
        "--ppl-criteria",
        default=",".join(DEFAULT_PPL_CRITERIA),
        help="criteria whose layers get the NBL map in the ppl part, DROP beside "
        f"(choose from {', '.join(PPL_CRITERIA)}; default: %(default)s)",
    )
    ap.add_argument(
        "--ppl-ks",
        type=lambda v: [int(x) for x in v.split(",")],
        default=None,
        help="k values of the ppl part (default: 10, 20, 30 and 40%% of the layers)",
    )
    ap.add_argument("--direct-samples", type=int, default=8, help="selection sequences for the direct score")
    ap.add_argument("--truth-samples", type=int, default=16, help="selection sequences for the ground truth")
    ap.add_argument("--self-samples", type=int, default=32, help="self-generated calibration sequences (0: skip)")
    ap.add_argument(
        "--ppl-tokens",
        type=int,
        default=8192,
        help="tokens per perplexity corpus (default 8192, the committed study's)",
    )
    ap.add_argument(
        "--confirm",
        metavar="WHY",
        default=None,
        help="the ppl part re-measures into the JSON's 'ppl_confirm' (beside the table, which stays as it is) "
        "with its own --ppl-tokens; WHY says why (the page prints it: a re-measure made because a target "
        "was missed must say so)",
    )
    ap.add_argument("--nmse-tokens", type=int, default=8192, help="test C4 tokens for the measured held-out NMSE")
    ap.add_argument("--context", type=int, default=512, help="perplexity window and lm-eval max length")
    ap.add_argument("--acc-n", type=int, default=300, help="items per zero-shot task (0: skip accuracy)")
    ap.add_argument(
        "--acc-extend",
        action="store_true",
        help="grow the JSON's accuracy points to --acc-n items per task: each point is measured on the items it "
        "lacks only (the first N of the same sha256 order contain the smaller set) and merged by document",
    )
    ap.add_argument(
        "--acc-points",
        default=None,
        metavar="KEY,KEY",
        help="measure only these accuracy points (e.g. original,drop/k4), to split a long --acc-extend across "
        "processes, each with its own --raw (default: every headline point)",
    )
    ap.add_argument("--data", default=str(SHARED), help="the shared data directory (default: %(default)s)")
    args = ap.parse_args(argv)
    global C4, EVAL
    C4, EVAL = Path(args.data) / "calib" / "c4_demo.json", Path(args.data) / "eval"
    if args.smoke:
        if not args.out:
            sys.exit("--smoke needs --out DIR (a smoke run never writes into docs/)")
        out = Path(args.out)
        args.raw, args.work, args.page = str(out / "raw.json"), str(out / "work"), str(out / "results.md")
        args.seq_len, args.context, args.calib_samples, args.greedy_samples, args.greedy_steps = 64, 64, 12, 6, 1
        args.direct_samples, args.truth_samples, args.self_samples = 2, 4, 6
        args.ppl_tokens, args.nmse_tokens, args.acc_n = 512, 256, 0
    names, parts = args.models.split(","), args.parts.split(",")
    bad_crit = set(args.ppl_criteria.split(",")) - set(PPL_CRITERIA)
    if bad_crit:
        sys.exit(f"unknown --ppl-criteria {sorted(bad_crit)}; choose from {', '.join(PPL_CRITERIA)}")
    for bad, known, what in ((set(names) - set(MODELS), MODELS, "model"), (set(parts) - set(PARTS), PARTS, "part")):
        if bad:
            sys.exit(f"unknown {what} {sorted(bad)}; choose from {', '.join(known)}")
    study = Study(args)
    for path in args.merge:  # one process per model wrote its own file: the models are merged, the setup kept
        other = json.loads(Path(path).read_text())
        study.data["models"].update(other["models"])
        if "setup" not in study.data:
            study.data["setup"] = other["setup"]
        elif other["setup"]["commit"] != study.data["setup"]["commit"]:
            note = f"{', '.join(other['models'])} ran on commit {other['setup']['commit']}"
            study.data["setup"].setdefault("notes", [])
            if note not in study.data["setup"]["notes"]:
                study.data["setup"]["notes"].append(note)
        study.save()
    if not args.render:
        study.setup()
        study.save()
        for name in names:
            study.run_model(name, parts)
    if study.data.get("setup", {}).get("smoke") and not args.smoke:
        sys.exit(f"{study.raw} is from a smoke run; not rendering a page from it")
    uneven = uneven_accuracy(study.data)
    if uneven:
        why = (
            f"not rendering {args.page}: the accuracy points of {', '.join(uneven)} have different item counts "
            "(an --acc-extend run split with --acc-points, partly done); the raw JSON is saved. Pairs need the same "
            "items: extend the remaining points, then render with --render"
        )
        if args.render:  # rendering was all that was asked for: say it failed
            sys.exit(why)
        print(why, flush=True)
        return
    heal = ROOT / "docs" / "results" / "heal_study.json"  # the healing study's section, when it has run
    write_page(study.raw, Path(args.page), nbl_ext.NBLConfig().criterion, heal_raw=None if args.smoke else heal)


if __name__ == "__main__":
    main()
