"""nbl_ext.evaluate.perplexity against a direct computation on a tiny model."""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from _tiny import tiny_llama  # noqa: E402
from nbl_ext.evaluate import perplexity  # noqa: E402


def test_perplexity_matches_direct_windows():
    model = tiny_llama(vocab_size=40, seed=1)
    ids = torch.randint(0, 40, (70,), generator=torch.Generator().manual_seed(0))
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in (ids[:32], ids[32:64]):  # the 6 tokens after the last full window are ignored
            logp = torch.log_softmax(model(w[None]).logits[0, :-1].double(), -1)
            nll -= float(logp.gather(1, w[1:, None]).sum())
            n += 31
    assert perplexity(model, ids, 32) == pytest.approx(math.exp(nll / n), rel=1e-12)
    with pytest.raises(ValueError, match="1-D"):
        perplexity(model, ids[None], 32)
    with pytest.raises(ValueError, match="at least one full window"):
        perplexity(model, ids[:10], 32)
