"""The model card (README.md) that save_pretrained writes into a checkpoint, so it can go to the Hub as it is.

Built from what the checkpoint itself records: config.json (family, ``nbl`` section, ``nbl_source``),
the calibration summary (per-layer scores, calibration data size and fingerprint) and, when the caller
measured it, quality numbers. Nothing is invented: a field that is not known says so.
"""

from __future__ import annotations

import json
from typing import Any

from nbl_ext.criteria import get_criterion

#: How each method chooses and replaces its layers (the criterion NBL and DROP use).
_HOW = {
    "nbl": (
        "the attention branch is replaced by an affine map fitted in closed form (LMMSE): "
        "`out = mlp_half(h + h @ W.T + b)`; no KV cache for the layer",
        "lowest CCA bound sum(1 - rho_i^2) between the layer's input X and X + attention(X) "
        "(Neural Block Linearization, Erdogan et al., NeurIPS 2025)",
    ),
    "drop": (
        "the attention branch is removed: `out = mlp_half(h)`; no KV cache for the layer",
        "highest cosine similarity between X and X + attention(X) (DROP, He et al.)",
    ),
}


def _base_model(config: dict[str, Any]) -> str | None:
    source = config.get("nbl_source")
    if isinstance(source, dict):
        for key in ("name", "repo_id", "path", "description"):
            if source.get(key):
                return str(source[key])
    name = config.get("_name_or_path")
    return str(name) if name else None


def _layer_rows(summary: dict[str, Any] | None, chosen: set[int]) -> list[str]:
    rows = (summary or {}).get("calibration", {}).get("layers") if isinstance(summary, dict) else None
    if not isinstance(rows, list) or not rows:
        return []
    out = ["| layer | replaced | CCA bound | NMSE of the map | cosine(X, X + A) |", "|---|---|---|---|---|"]
    for r in rows:
        if not isinstance(r, dict):
            continue
        cells = [f"{r[k]:.4g}" if isinstance(r.get(k), (int, float)) else "-" for k in ("bound", "nmse", "cosine")]
        out.append(f"| {r.get('layer')} | {'yes' if r.get('layer') in chosen else ''} | " + " | ".join(cells) + " |")
    return out


def model_card(
    config: dict[str, Any],
    summary: dict[str, Any] | None,
    *,
    quality: dict[str, Any] | None = None,
    remote_code: bool = False,
) -> str:
    """The README.md text of a checkpoint whose config.json is ``config`` (a dict)."""
    nbl = config.get("nbl") if isinstance(config.get("nbl"), dict) else None
    base = _base_model(config)
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    n_layers = text.get("num_hidden_layers")
    front = ["---", "library_name: transformers", "tags:", "- nbl-ext", "- neural-block-linearization"]
    if base and "/" in base and not base.startswith(("/", ".")):
        front.append(f"base_model: {base}")
    front.append("---")
    lines = [
        *front,
        "",
        f"# {base.rsplit('/', 1)[-1] if base else 'Model'}"
        f"{' with linearized attention (nbl-ext)' if nbl else ' (saved by nbl-ext)'}",
        "",
    ]
    lines += [
        f"- Base model: {base or 'not recorded'}",
        f"- Architecture: {config.get('model_type')} "
        f"({', '.join(config.get('architectures') or [])}), {n_layers} decoder layers, "
        f"hidden size {text.get('hidden_size')}, dtype {config.get('dtype')}",
    ]
    chosen: set[int] = set()
    if nbl:
        method = nbl.get("method")
        how, criterion = _HOW.get(method, (str(nbl.get("replacement")), "not recorded"))
        run = nbl.get("config") if isinstance(nbl.get("config"), dict) else {}
        if run.get("criterion"):  # recorded by nbl_ext.compress (NBLConfig)
            try:
                crit = get_criterion(run["criterion"])
                criterion = f"criterion `{crit.name}`, {crit.direction} first: {crit.description}"
            except (KeyError, ValueError):
                criterion = f"criterion `{run['criterion']}` (not registered in this nbl_ext)"
        chosen = set(nbl.get("layers") or [])
        lines += [
            f"- Replaced: the attention of {len(chosen)} of {n_layers} decoder layers, "
            f"{sorted(chosen)} (method `{method}`{', sequential refit' if nbl.get('refit') else ''})",
            f"- How: {how}",
            f"- Chosen by: {criterion}",
        ]
    meta = (summary or {}).get("calibration", {}).get("metadata") if isinstance(summary, dict) else None
    if isinstance(meta, dict):
        lines.append(
            f"- Calibration data: {meta.get('num_samples')} sequences x {meta.get('seq_len')} tokens "
            f"({meta.get('tokens')} tokens; sha256 of the token ids {str(meta.get('data_sha256'))[:16]}...), "
            f"statistics in float64, ridge {meta.get('ridge')}"
        )
    else:
        lines.append("- Calibration data: not recorded")
    if quality:
        lines += ["- Measured quality: " + ", ".join(f"{k} = {v}" for k, v in quality.items())]
    else:
        lines.append("- Measured quality: not measured when this checkpoint was saved")
    rows = _layer_rows(summary, chosen)
    if rows:
        lines += ["", "## Per-layer scores (calibration)", "", *rows]
    lines += [
        "",
        "## How to load",
        "",
        "This checkpoint needs nbl-ext (`pip install nbl-ext`): plain transformers "
        f"does not know the model type `{config.get('model_type')}` and refuses to load it (it would "
        "otherwise build the removed attention with random weights).",
        "",
        "```python",
        "import nbl_ext  # registers the nbl_* model types with transformers",
        "from transformers import AutoModelForCausalLM",
        "",
        'model = AutoModelForCausalLM.from_pretrained("PATH", dtype="auto", device_map="auto")',
        '# or, with the checks of the directory first: model = nbl_ext.load_pretrained("PATH")',
        "```",
    ]
    if remote_code:
        lines += [
            "",
            "Without nbl-ext, the pure-PyTorch classes in `modeling_nbl.py` load it:",
            '`AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)`.',
        ]
    if nbl:
        lines += [
            "",
            "## The `nbl` section of config.json",
            "",
            "```json",
            json.dumps(nbl, indent=2, sort_keys=True),
            "```",
        ]
    return "\n".join(lines) + "\n"
