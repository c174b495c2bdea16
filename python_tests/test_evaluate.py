"""nbl_ext.evaluate.perplexity against a direct computation on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from _tiny import tiny_llama
from nbl_ext.evaluate import perplexity, perplexity_stats


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


def _direct_nll(model, seq: list[int], targets: range) -> float:
    """Sum of -log p(seq[t] | seq[:t]) over positions t in targets, by one forward of seq (float64)."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor(seq)[None]).logits[0].double(), -1)
    return -sum(float(logp[t - 1, seq[t]]) for t in targets)


@pytest.mark.parametrize("stride", [32, 20, 7])
def test_sliding_windows_score_each_token_once_with_its_context(stride):
    model = tiny_llama(vocab_size=40, seed=1)
    ids = torch.randint(0, 40, (75,), generator=torch.Generator().manual_seed(2))
    got = perplexity_stats(model, ids, context=32, stride=stride)
    nll, n, scored_to = 0.0, 0, 1
    for start in range(0, 75 - 32 + 1, stride):  # the oracle: windows re-scored one by one
        seq = ids[start : start + 32].tolist()
        first = max(scored_to - start, 1)
        nll += _direct_nll(model, seq, range(first, 32))
        n += 32 - first
        scored_to = start + 32
    assert got["tokens"] == n
    assert got["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-10)
    assert sum(s for s, _ in got["window_nll"]) == pytest.approx(nll, rel=1e-10)
    if stride < 32:  # overlapping windows: every token after the first is scored
        assert n == (75 - 32) // stride * stride + 31
    assert got["ppl_stderr"] > 0
    assert perplexity(model, ids, 32, stride) == pytest.approx(got["ppl"], rel=1e-12)


def test_bos_windows_and_batching():
    model = tiny_llama(vocab_size=40, seed=4)
    ids = torch.randint(1, 40, (64,), generator=torch.Generator().manual_seed(3))
    got = perplexity_stats(model, ids, context=17, bos_id=0, batch_size=3)  # windows of BOS + 16 stream tokens
    nll, n = 0.0, 0
    for k, start in enumerate(range(0, 64 - 16 + 1, 16)):
        seq = [0] + ids[start : start + 16].tolist()
        first = 2 if k == 0 else 1  # the stream's first token is not scored; later windows score theirs given BOS
        nll += _direct_nll(model, seq, range(first, 17))
        n += 17 - first
    assert got["windows"] == 4 and got["tokens"] == n and got["bos"] is True
    assert got["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-9)
    unbatched = perplexity_stats(model, ids, context=17, bos_id=0, batch_size=1)
    assert unbatched["ppl"] == pytest.approx(got["ppl"], rel=1e-6)


def test_bad_windows_are_rejected():
    model = tiny_llama(vocab_size=40, seed=1)
    ids = torch.randint(0, 40, (40,), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="stride"):
        perplexity_stats(model, ids, context=16, stride=17)
    with pytest.raises(ValueError, match="one slot is the BOS"):
        perplexity_stats(model, ids, context=16, stride=16, bos_id=0)
    with pytest.raises(ValueError, match="at least one full window"):
        perplexity_stats(model, ids, context=64)
    assert perplexity_stats(model, ids[:16], context=16)["ppl_stderr"] is None  # one window: no spread


def test_c4_heldout_documents_are_not_calibration_documents(tmp_path):
    import json

    from _tiny import WORDS, word_tokenizer
    from nbl_ext.data import HOLDOUT_FRACTION, HOLDOUT_SEED, split_documents
    from nbl_ext.evaluate import c4_heldout_ids

    docs = [f"{WORDS[i % len(WORDS)]} {WORDS[i // len(WORDS)]} {WORDS[(3 * i) % len(WORDS)]}" for i in range(30)]
    assert len(set(docs)) == 30
    path = tmp_path / "c4.json"
    path.write_text(json.dumps([{"text": d} for d in docs]))
    tok = word_tokenizer()
    ids, n_docs = c4_heldout_ids(tok, path)
    calib, held = split_documents(path, HOLDOUT_FRACTION, seed=HOLDOUT_SEED)
    assert n_docs == len(held) == 6 and set(held).isdisjoint(calib)
    want = []
    for d in held:
        want += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids.tolist() == want
    assert c4_heldout_ids(tok, path, max_tokens=5)[0].tolist() == want[:5]


def test_hub_tasks_offline_say_to_use_data_dir():
    """Without --data-dir the hub tasks are used; offline that is a clear error, not a datasets traceback."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("lm_eval")
    code = (
        "from _tiny import tiny_llama, word_tokenizer\n"
        "from nbl_ext.evaluate import run_tasks\n"
        "tok = word_tokenizer()\n"
        "try:\n    run_tasks(tiny_llama(len(tok)), tok, ['arc_easy'], limit=2)\n"
        "except RuntimeError as exc:\n    print('ERR', exc)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).parent, env=env, capture_output=True, text=True, timeout=300
    )
    assert "ERR could not fetch the hub tasks" in out.stdout and "--data-dir" in out.stdout, out.stderr[-2000:]


def test_logits_to_keep_covers_every_scored_position():
    from nbl_ext.evaluate import logits_to_keep

    # rows of true length 7, 5 and 3 with continuations of 2, 1 and 2 tokens, right-padded with zeros to 7
    rows = {(5, 6, 7, 8, 9, 1, 2): 2, (3, 4, 5, 6, 7): 1, (1, 2, 3): 2}
    inps = torch.tensor([[5, 6, 7, 8, 9, 1, 2], [3, 4, 5, 6, 7, 0, 0], [1, 2, 3, 0, 0, 0, 0]])
    assert logits_to_keep(inps, rows) == 7 - (3 - 2)
    assert logits_to_keep(inps[:2], rows) == 7 - (5 - 1)  # the earliest scored position over the rows
    assert logits_to_keep(inps[:2], {**rows, (3, 4, 5, 6, 7): 4}) == 7 - (5 - 4)
    # a real trailing token 0 is not padding: the row is found at its true length
    assert (
        logits_to_keep(torch.tensor([[5, 6, 7, 8, 0], [5, 6, 7, 8, 9]]), {(5, 6, 7, 8, 0): 1, (5, 6, 7, 8, 9): 1}) == 1
    )
    # two readings of one row (with and without its trailing 0): the one scoring earlier positions wins
    both = {(5, 6, 7, 0): 1, (5, 6, 7): 3, (5, 6, 7, 8, 9): 1}
    assert logits_to_keep(torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]]), both) == 5
    assert logits_to_keep(torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]]), {**both, (5, 6, 7): 1}) == 5 - 2
    # a row that is not a known request, or a continuation longer than its row: every position
    assert logits_to_keep(inps, {(5, 6, 7, 8, 9, 1, 2): 1}) == 7
    assert logits_to_keep(inps[:1], {(5, 6, 7, 8, 9, 1, 2): 9}) == 7


def test_continuation_lm_scores_like_stock_hflm_with_fewer_head_positions():
    """The LM head on the trailing positions only gives lm-eval's stock log-likelihoods and greedy flags."""
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    from _tiny import tiny_llama, word_tokenizer
    from nbl_ext.evaluate import continuation_lm

    tok = word_tokenizer()
    model = tiny_llama(len(tok), seed=3).eval()
    g = torch.Generator().manual_seed(0)
    requests = []
    for i in range(11):  # varied lengths in one batch; token 0 inside and at the ends of both parts
        ctx = torch.randint(0, len(tok), (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()
        cont = torch.randint(0, len(tok), (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        if i % 3 == 0:
            ctx[-1] = 0
        if i % 4 == 0:
            cont = [0, *cont] if i % 8 else [*cont, 0]
        requests.append((("", ""), ctx, cont))
    requests.append((("", ""), [4], [5, 6, 7, 8, 9, 10]))  # continuation longer than its context

    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[1]))
    stock = HFLM(pretrained=model, tokenizer=tok, batch_size=4)._loglikelihood_tokens(requests, disable_tqdm=True)
    stock_positions, seen[:] = sum(seen), []
    ours = continuation_lm(HFLM)(pretrained=model, tokenizer=tok, batch_size=4)._loglikelihood_tokens(
        requests, disable_tqdm=True
    )
    hook.remove()
    assert [g for _, g in ours] == [g for _, g in stock]
    assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in stock], abs=1e-4)
    assert sum(seen) < stock_positions  # the head really ran on fewer positions
