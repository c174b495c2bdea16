"""Quick quality measures of a (linearized) causal LM."""
from __future__ import annotations

import math

import torch


def perplexity(model, token_ids: torch.Tensor, window: int) -> float:
    """Token-level perplexity of ``token_ids`` (1-D) over non-overlapping windows of ``window`` tokens.

    Each window is scored on its own (no context carried across windows, no
    stride overlap); the first token of a window is not predicted. Tokens after
    the last full window are ignored. Log-likelihoods are summed in float64.
    """
    if token_ids.dim() != 1:
        raise ValueError(f"perplexity: token_ids must be 1-D, got shape {tuple(token_ids.shape)}")
    if window < 2 or token_ids.numel() < window:
        raise ValueError(f"perplexity: need window >= 2 and at least one full window; got window={window} "
                         f"and {token_ids.numel()} tokens")
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, token_ids.numel() - window + 1, window):
            chunk = token_ids[start : start + window][None].to(device)
            logits = model(chunk).logits[0, :-1].double()
            nll += float(torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum"))
            count += window - 1
    return math.exp(nll / count)
