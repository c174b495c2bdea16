"""``nbl heal``: recover the accuracy of a compressed model by LoRA or distillation of its affine maps."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from nbl_ext.cli.common import load_for_eval, positive

EPILOG = """\
what it does:
  1. loads DIR (a checkpoint of `nbl compress`; a model without replaced blocks is an error)
  2. packs --calib text into SAMPLES training and HELDOUT_SAMPLES held-out sequences of SEQ_LEN tokens;
     a document file's held-out 20% (what `nbl eval --c4` scores) is never used, and the held-out
     sequences come from other documents than the training ones
  3. trains, with the held-out loss evaluated before the first step and every --eval-every steps:
       lora     LoRA (peft; rank 32, alpha 64, dropout 0.1, lr 1e-4, batch 16, 3 epochs: the paper's)
                on the affine maps, causal-LM loss; --targets around adds the layers next to the blocks
       distill  only the maps' W and b, to match the original model (--original; KL of the next-token
                distributions or, --loss hidden, the hidden state after each replaced block)
     stops after --patience evaluations without improvement (not in the first epoch, --min-steps) and
     keeps the best weights (never worse on held-out tokens than before); state is saved every
     --save-every steps: rerun to resume
  4. merges the result into W, b and writes OUT: the same self-contained checkpoint format, plus
     nbl_heal.json (losses, steps, tokens, time) and, for lora, adapter/ (peft's format: loads with
     peft.PeftModel.from_pretrained(nbl_ext.load_pretrained(DIR), OUT/adapter))

examples:
  nbl heal nbl-out/smollm2-135m-nbl-k7 --calib ../shared/data/calib/c4_demo.json --out healed-k7/
  nbl heal out/ --method distill --loss hidden --calib docs.json --steps 200 --out out-distilled/
  nbl heal drop8/ --calib docs.json --in-place          # DROP: LoRA on the layers around the dropped blocks
"""


def add_parser(sub) -> None:
    """The ``heal`` subcommand and its options."""

    h = sub.add_parser(
        "heal",
        help="recover accuracy of a compressed model: LoRA or distillation of the maps",
        description="Heal DIR (an `nbl compress` output): train LoRA on its affine maps (causal-LM "
        "loss) or distill its maps from the original model, with held-out early stopping; write "
        "the merged model as a new checkpoint.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    h.add_argument("dir", metavar="DIR", help="a checkpoint written by `nbl compress` / nbl_ext.save_pretrained")
    h.add_argument(
        "--method",
        choices=["lora", "distill"],
        default="lora",
        help="lora: LoRA (peft) on the maps, causal-LM loss (default); distill: train W, b to match the original model",
    )
    h.add_argument(
        "--calib",
        required=True,
        metavar="PATH|hf:NAME",
        help="training text: a .json/.jsonl/.txt document file (its fixed held-out 20%% that `nbl eval "
        "--c4` scores is left out, as in `nbl compress`) or hf:NAME",
    )
    h.add_argument("--out", default=None, metavar="OUT", help="output checkpoint directory")
    h.add_argument("--in-place", action="store_true", help="replace DIR itself (atomically) instead of --out")
    h.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    h.add_argument(
        "--original",
        default=None,
        metavar="MODEL",
        help="distill: the original model (default: the `model` recorded in DIR/nbl_run.json)",
    )
    h.add_argument(
        "--loss",
        choices=["kl", "hidden"],
        default="kl",
        help="distill: kl (next-token distributions, default) or hidden (hidden-state error after "
        "each replaced block; cheaper)",
    )
    h.add_argument("--samples", type=positive(int), default=64, metavar="N", help="training sequences (default 64)")
    h.add_argument(
        "--heldout-samples",
        type=positive(int),
        default=8,
        metavar="N",
        help="held-out sequences for early stopping, from documents never trained on (default 8)",
    )
    h.add_argument("--seq-len", type=positive(int), default=512, metavar="L", help="tokens per sequence (default 512)")
    h.add_argument("--epochs", type=positive(float), default=3.0, metavar="E", help="passes over the data (default 3)")
    h.add_argument(
        "--steps", type=positive(int), default=None, metavar="S", help="optimizer steps (overrides --epochs)"
    )
    h.add_argument(
        "--lr",
        type=positive(float),
        default=1e-4,
        help="peak learning rate (default 1e-4, the paper's for ~1,000 steps; on a budget of tens of steps 1e-3 "
        "recovered more: docs/results.md, healing)",
    )
    h.add_argument(
        "--batch-size", type=positive(int), default=16, metavar="B", help="sequences per optimizer step (default 16)"
    )
    h.add_argument(
        "--micro-batch-size",
        type=positive(int),
        default=None,
        metavar="M",
        help="sequences per forward (gradient accumulation; default: the batch size)",
    )
    h.add_argument("--rank", type=positive(int), default=32, help="LoRA rank (default 32)")
    h.add_argument("--alpha", type=positive(float), default=64.0, help="LoRA alpha (default 64)")
    h.add_argument("--dropout", type=float, default=0.1, help="LoRA dropout (default 0.1)")
    h.add_argument(
        "--targets",
        choices=["auto", "maps", "around"],
        default="auto",
        help="LoRA targets: maps (the affine maps), around (maps + o_proj/down_proj of the layers next "
        "to replaced blocks), auto (maps for nbl, around for drop; default)",
    )
    h.add_argument(
        "--around-lr",
        type=positive(float),
        default=None,
        metavar="LR",
        help="with --targets around: peak learning rate of the LoRA on the layers next to the blocks (default: "
        "--lr). With --input-scaling rms the maps take rates (5e-3) that plain LoRA on those layers does not",
    )
    h.add_argument(
        "--input-scaling",
        choices=["none", "rms"],
        default="none",
        help="rms: train LoRA's A (lora) or W (distill) of each map on its inputs divided by their per-channel RMS, "
        "so that massive-activation channels of the residual stream (Gemma 3) do not set the step size for all; "
        "the layers of --targets around train on plain inputs; the result merges into W, b as usual (default: none)",
    )
    h.add_argument(
        "--patience",
        type=int,
        default=3,
        metavar="P",
        help="stop after P held-out evaluations without improvement (0: never; default 3), not before --min-steps",
    )
    h.add_argument(
        "--min-steps",
        type=int,
        default=None,
        metavar="S",
        help="early stopping never ends the run before step S (default: one epoch; the held-out loss of the "
        "first steps is mostly AdamW noise)",
    )
    h.add_argument(
        "--eval-every",
        type=positive(int),
        default=None,
        metavar="S",
        help="steps between held-out evaluations (default: about 10 per run)",
    )
    h.add_argument(
        "--save-every",
        type=positive(int),
        default=None,
        metavar="S",
        help="steps between resumable saves (default: each evaluation)",
    )
    h.add_argument(
        "--state-dir",
        default=None,
        metavar="DIR",
        help="resume state (default: OUT.heal-state; a rerun of the same command continues there; "
        "removed after success)",
    )
    h.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available, else cpu)")
    h.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16", "auto"],
        help="model dtype (default: the checkpoint's)",
    )
    h.add_argument("--seed", type=int, default=0, help="seed for data packing, LoRA init, dropout, order (default 0)")
    h.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    import gc
    import shutil
    import tempfile

    import torch

    import nbl_ext
    from nbl_ext._io import atomic_directory, atomic_write_json, read_json
    from nbl_ext.data import HOLDOUT_FRACTION, HOLDOUT_SEED, load_calibration_tokens, split_documents
    from nbl_ext.heal import HealConfig, OriginalBranches, heal
    from nbl_ext.serialization import CONFIG, RUN

    src = Path(args.dir)
    if args.in_place == (args.out is not None):
        raise ValueError("give exactly one of --out OUT (write a new checkpoint) and --in-place (replace DIR)")
    out = src if args.in_place else Path(args.out)
    if not args.in_place:
        if out.resolve() == src.resolve():
            raise ValueError(f"--out {out} is DIR itself; pass --in-place to replace it")
        if out.exists() and not args.overwrite:
            raise FileExistsError(f"{out} exists; choose another --out or pass --overwrite to replace it")
    if not (src / CONFIG).is_file():
        raise FileNotFoundError(
            f"{src} is not a checkpoint directory (no {CONFIG}); pass the --out directory of `nbl compress`"
        )
    raw = read_json(src / CONFIG, "nbl heal")
    if not isinstance(raw, dict) or "nbl" not in raw:
        raise ValueError(
            f"{src} is not an nbl-ext checkpoint (its config.json has no nbl section): nothing was "
            f"linearized; compress it first (nbl compress {src} --out DIR) and heal DIR"
        )
    if args.calib == "self":
        raise ValueError("nbl heal trains on natural text: give --calib FILE (.json/.jsonl/.txt) or hf:NAME")
    cfg = HealConfig(
        method=args.method,
        epochs=args.epochs,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size,
        lora_rank=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        lora_targets=args.targets,
        lora_around_lr=args.around_lr,
        distill_loss=args.loss,
        input_scaling=args.input_scaling,
        patience=args.patience,
        min_steps=args.min_steps,
        eval_every=args.eval_every,
        save_every=args.save_every,
        seed=args.seed,
    )
    run_file = src / RUN
    run = read_json(run_file, "nbl heal") if run_file.is_file() else {}
    progress = not args.no_progress
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or raw.get("dtype") or "float32"
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    teacher = None
    if args.method == "distill":  # the original first: only its replaced layers' branches are kept
        original = args.original or run.get("model")
        if not original:
            raise ValueError(
                f"--method distill needs the original model: pass --original MODEL ({run_file} does not name it)"
            )
        print(
            f"nbl heal: loading the original {original} (teacher: its {len(raw['nbl'].get('layers', []))} "
            "replaced attention branches)",
            file=sys.stderr,
        )
        full, _ = nbl_ext.load_model(original, dtype=dtype, device=device, progress=progress)
        teacher = OriginalBranches(full, list(raw["nbl"].get("layers", [])))
        del full
        gc.collect()
    model, tokenizer, _ = load_for_eval(str(src), args.dtype, device, progress)
    path = Path(args.calib)
    if not args.calib.startswith("hf:") and path.is_file():  # document-level splits: eval, early stopping, training
        docs = split_documents(path, HOLDOUT_FRACTION, seed=HOLDOUT_SEED)[0]
        train_docs, held_docs = split_documents(docs, cfg.heldout_fraction, seed=HOLDOUT_SEED + 1)
        tokens = load_calibration_tokens(
            train_docs, tokenizer, num_samples=args.samples, seq_len=args.seq_len, seed=args.seed, progress=progress
        )
        heldout = load_calibration_tokens(
            held_docs,
            tokenizer,
            num_samples=args.heldout_samples,
            seq_len=args.seq_len,
            seed=args.seed,
            progress=progress,
        )
        data_note = f"{args.calib} minus {HOLDOUT_FRACTION:.0%} held out for evaluation"
    else:
        both = load_calibration_tokens(
            args.calib,
            tokenizer,
            num_samples=args.samples + args.heldout_samples,
            seq_len=args.seq_len,
            seed=args.seed,
            progress=progress,
        )
        tokens, heldout = both[: args.samples], both[args.samples :]
        data_note = str(args.calib)
    cfg.state_dir = str(Path(args.state_dir) if args.state_dir else out.with_name(out.name + ".heal-state"))
    print(
        f"nbl heal: {args.method} on {src} ({raw['nbl'].get('method')}, layers {raw['nbl'].get('layers')}); "
        f"{data_note}: {args.samples} + {args.heldout_samples} held-out x {args.seq_len} tokens; "
        f"state in {cfg.state_dir}",
        file=sys.stderr,
    )
    with tempfile.TemporaryDirectory(prefix="nbl-heal-") as scratch:
        adapter_dir = Path(scratch) / "adapter" if args.method == "lora" else None
        result = heal(model, tokens, cfg, heldout=heldout, teacher=teacher, adapter_dir=adapter_dir, progress=progress)
        with atomic_directory(out) as tmp:
            nbl_ext.save_pretrained(model, tmp, tokenizer)
            if adapter_dir is not None:
                shutil.copytree(adapter_dir, tmp / "adapter")
            if run:
                atomic_write_json(tmp / RUN, run)
            atomic_write_json(
                tmp / "nbl_heal.json",
                {
                    **result.summary(),
                    "source": str(src),
                    "calib": str(args.calib),
                    "samples": args.samples,
                    "heldout_samples": args.heldout_samples,
                    "seq_len": args.seq_len,
                    "device": device,
                    "dtype": str(next(model.parameters()).dtype),
                    "original": args.original or run.get("model"),
                    "total_seconds": round(time.perf_counter() - t0, 2),
                    "nbl_ext": nbl_ext.__version__,
                    "torch": torch.__version__,
                },
            )
    shutil.rmtree(cfg.state_dir, ignore_errors=True)
    print(
        f"nbl heal: held-out loss {result.heldout_loss_before:.4f} -> {result.heldout_loss_after:.4f} "
        f"(best at step {result.best_step} of {result.steps}{', stopped early' if result.stopped_early else ''}; "
        f"{result.train_tokens} training tokens, {result.seconds:.1f} s); saved to {out}\n"
        f"  reload with: nbl_ext.load_pretrained({str(out)!r})"
    )
    return 0
