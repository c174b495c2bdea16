"""Load time and peak host memory of a linearized checkpoint: via transformers, against plain transformers and the
old loader.

Not a test (pytest does not collect it): a measurement, each load in a fresh process::

    python bench/load_bench.py                       # Llama-3.2-1B shape, bf16, 4 of 16 layers linearized
    python bench/load_bench.py --num-layers 2 --repeats 1 --work /tmp/lb   # a quick check that it runs

It writes two random-weight checkpoints of the same shape under ``--work`` (kept for reruns):
``plain/`` (transformers' save_pretrained of the unmodified model) and ``nbl/`` (nbl_ext.save_pretrained
after ``synthetic_linearize``, random maps: load cost does not depend on the values). Then, round
by round (variants interleaved, so a slow spell on a shared machine hits all alike), it runs in a
new interpreter each of:

* ``transformers``        AutoModelForCausalLM.from_pretrained(plain/) -- the reference
* ``nbl_from_pretrained``  import nbl_ext; AutoModelForCausalLM.from_pretrained(nbl/)
* ``nbl_load_pretrained``  nbl_ext.load_pretrained(nbl/) (checks the directory first)
* ``old_load_pretrained``  what load_pretrained did before issue 13: from_config (random init of the
                           full model in host memory), linearize with placeholder maps, then
                           safetensors.torch.load_model

and records, per run, the load time (after imports, Llama's modeling module included), the process's
peak RSS (VmHWM) after loading, and the time and peak after reading every weight once (the
safetensors files are memory-mapped, so loading alone reads lazily). The
JSON (``--out``, default bench/results/load/load_<device>_<UTC>_<commit>.json: a folder of its own, since
docs/performance.md reads the pytest-benchmark JSON in bench/results) has the medians and the
ratios to ``transformers`` (target: <= 1.2 in time and peak memory).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Llama-3.2-1B (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192, vocab 128256, tied embeddings).
LLAMA_1B = dict(
    hidden_size=2048,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    intermediate_size=8192,
    vocab_size=128256,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    tie_word_embeddings=True,
    bos_token_id=128000,
    eos_token_id=128001,
)
VARIANTS = ("transformers", "nbl_from_pretrained", "nbl_load_pretrained", "old_load_pretrained")


def _status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process. Not ru_maxrss: Linux carries that over from the parent
    across fork + exec, so every child would report at least the driver's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def _child(variant: str, path: str) -> None:
    """One load in this (fresh) process; prints a JSON line."""
    t0 = time.perf_counter()
    import torch

    # Llama's modeling module is imported before the clock starts for every variant (import nbl_ext imports
    # it, plain transformers would import it inside from_pretrained): load_s is the loading alone.
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM

    if variant != "transformers":
        import nbl_ext  # registers the nbl_* model types
    imported, rss0 = time.perf_counter(), _status_mb("VmRSS")
    if variant in ("transformers", "nbl_from_pretrained"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    elif variant == "nbl_load_pretrained":
        import nbl_ext  # registers the nbl_* model types

        model = nbl_ext.load_pretrained(path)
    else:
        model = _old_load_pretrained(Path(path))
    loaded = time.perf_counter()
    assert model.dtype == torch.bfloat16
    # the nbl variants must have built the linearized model (not the plain one with random attention)
    assert (variant == "transformers") != type(model).__name__.startswith("NBL"), (variant, type(model))
    peak = _status_mb("VmHWM")
    with torch.no_grad():  # read every weight once (safetensors are memory-mapped: loading reads lazily)
        for p in model.parameters():
            if p.device.type != "meta":
                p.sum()
    print(
        json.dumps(
            {
                "variant": variant,
                "import_s": imported - t0,
                "load_s": loaded - imported,
                "rss_after_import_mb": rss0,
                "peak_rss_mb": peak,
                "touch_s": time.perf_counter() - loaded,
                "peak_rss_after_touch_mb": _status_mb("VmHWM"),
            }
        )
    )


def _old_load_pretrained(root: Path):
    """The loader before issue 13 (nbl_ext 0.1.0 serialization.load_pretrained, minus its checks)."""
    import torch
    from safetensors.torch import load_model
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from nbl_ext.adapters import get_adapter
    from nbl_ext.linearize import apply_structure, parse_nbl_section

    raw = json.loads((root / "config.json").read_text())
    nbl = raw.pop("nbl")
    family = raw.pop("model_type").removeprefix("nbl_")
    raw.pop("kv_sharing_modes", None)
    raw.pop("architectures", None)
    config = CONFIG_MAPPING[family].from_dict(raw)
    model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]._from_config(config, dtype=torch.bfloat16)
    adapter = get_adapter(model)
    method, layers, refit = parse_nbl_section(nbl, adapter.num_layers, adapter.hidden_size, "old")
    d = adapter.hidden_size
    placeholder = (torch.zeros(d, d), torch.zeros(d))
    apply_structure(model, adapter, method, layers, dict.fromkeys(layers, placeholder), refit)
    load_model(model, str(root / "model.safetensors"), strict=True)
    return model.eval()


def _prepare(work: Path, num_layers: int, linearized: int) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import nbl_ext
    from nbl_ext.benchmark import last_layers, synthetic_linearize

    shape = dict(LLAMA_1B, num_hidden_layers=num_layers)
    info = {
        "shape": "llama-3.2-1b",
        **shape,
        "linearized_layers": last_layers(num_layers, linearized),
        "dtype": "bfloat16",
        "nbl_ext": nbl_ext.__version__,
        "format": "nbl_<family> model type",
    }
    stamp = work / "prepared.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == info:
        return info
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **shape), dtype=torch.bfloat16).eval()
    model.save_pretrained(work / "plain", max_shard_size="50GB")
    synthetic_linearize(model, info["linearized_layers"])
    nbl_ext.save_pretrained(model, work / "nbl")
    assert json.loads((work / "nbl" / "config.json").read_text())["model_type"] == "nbl_llama", nbl_ext.__file__
    stamp.write_text(json.dumps(info))
    return info


def _commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "nogit"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", nargs=2, metavar=("VARIANT", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, default=Path("/tmp/nbl-load-bench"), help="checkpoints (kept for reruns)")
    ap.add_argument("--num-layers", type=int, default=LLAMA_1B["num_hidden_layers"])
    ap.add_argument("--linearized", type=int, default=4, help="how many (last) layers to linearize")
    ap.add_argument("--repeats", type=int, default=3, help="rounds; each runs every variant once, interleaved")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.child:
        _child(*args.child)
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    if args.prepare_only:
        print(json.dumps(_prepare(args.work, args.num_layers, args.linearized)))
        return 0
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1")
    t = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            __file__,
            "--prepare-only",
            "--work",
            str(args.work),
            "--num-layers",
            str(args.num_layers),
            "--linearized",
            str(args.linearized),
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"load bench: preparing the checkpoints failed (exit {proc.returncode})")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"load bench: checkpoints ready in {time.perf_counter() - t:.0f} s under {args.work}", flush=True)
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(args.repeats):
        for variant in VARIANTS:
            path = args.work / ("plain" if variant == "transformers" else "nbl")
            proc = subprocess.run(
                [sys.executable, __file__, "--child", variant, str(path)],
                env=env,
                cwd=ROOT,
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"load bench: {variant} failed (exit {proc.returncode})")
            runs[variant].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            last = runs[variant][-1]
            print(
                f"  round {r + 1} {variant:22s} load {last['load_s']:7.2f} s   peak RSS {last['peak_rss_mb']:8.0f} MB",
                flush=True,
            )
    med = {
        v: {
            k: statistics.median(run[k] for run in runs[v])
            for k in ("import_s", "load_s", "rss_after_import_mb", "peak_rss_mb", "touch_s", "peak_rss_after_touch_mb")
        }
        for v in VARIANTS
    }
    ref = med["transformers"]
    ratios = {
        v: {k: med[v][k] / ref[k] for k in ("load_s", "peak_rss_mb", "peak_rss_after_touch_mb")} for v in VARIANTS
    }
    import torch
    import transformers

    device = (
        subprocess.run(
            [sys.executable, str(ROOT / "bench" / "device_slug.py")], capture_output=True, text=True
        ).stdout.strip()
        or "unknown"
    )
    now = time.gmtime()
    report = {
        "bench": "load",
        "device": device,
        "commit": _commit(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", now),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_avg": os.getloadavg(),
        "checkpoint": info,
        "repeats": args.repeats,
        "median": med,
        "ratio_to_transformers": ratios,
        "runs": runs,
        "target": "ratio <= 1.2 in load time and peak RSS for nbl_from_pretrained / nbl_load_pretrained",
    }
    stamp = time.strftime("%Y%m%dT%H%M%SZ", now)
    out = args.out or ROOT / "bench" / "results" / "load" / f"load_{device}_{stamp}_{_commit()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("\nvariant                 load s   peak RSS MB   x transformers (time, memory)")
    for v in VARIANTS:
        print(
            f"{v:22s} {med[v]['load_s']:7.2f}   {med[v]['peak_rss_mb']:11.0f}   "
            f"{ratios[v]['load_s']:.2f}, {ratios[v]['peak_rss_mb']:.2f}"
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
