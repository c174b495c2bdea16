"""Calibration data: file formats, packing, determinism, hold-out split, 'self' sampling, errors."""

from __future__ import annotations

import hashlib
import json
import sys
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from _tiny import WORDS, tiny_llama, word_tokenizer
from nbl_ext.data import (
    load_calibration_tokens,
    read_documents,
    split_documents,
)

C4_DEMO = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "calib" / "c4_demo.json").resolve()
BOS, EOS, PAD = 1, 2, 3

# Documents of distinct lengths made of known words, so every token is predictable.
DOCS = [" ".join(WORDS[(i + j) % 12] for j in range(3 + i % 5)) + " ." for i in range(12)]


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer(add_bos=True)


@pytest.fixture(scope="module")
def tok_nobos():
    return word_tokenizer(add_bos=False)


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _expected(tokenizer, docs, num_samples, seq_len, seed, bos):
    """The packing scheme exactly as data.py documents it."""
    order = sorted(range(len(docs)), key=lambda i: hashlib.sha256(f"shuffle:{seed}:{i}".encode()).digest())
    stream = [t for i in order for t in _ids(tokenizer, docs[i]) + [EOS]]
    body = seq_len - (1 if bos else 0)
    rows = [stream[k * body : (k + 1) * body] for k in range(num_samples)]
    return torch.tensor([([BOS] if bos else []) + r for r in rows], dtype=torch.long)


def _write(tmp_path: Path, name: str, content: str) -> Path:
    p = tmp_path / name
    p.write_text(content, encoding="utf-8")
    return p


# --- file formats -----------------------------------------------------------------


def test_json_objects_follow_the_documented_packing(tmp_path, tok):
    path = _write(tmp_path, "c.json", json.dumps([{"text": d, "url": "x"} for d in DOCS]))
    out = load_calibration_tokens(path, tok, num_samples=4, seq_len=9, seed=3, progress=False)
    assert out.dtype == torch.long and out.shape == (4, 9)
    assert torch.equal(out, _expected(tok, DOCS, 4, 9, 3, bos=True))
    assert (out[:, 0] == BOS).all() and not (out[:, 1:] == BOS).any()


def test_no_bos_when_the_tokenizer_adds_none(tmp_path, tok_nobos):
    path = _write(tmp_path, "c.json", json.dumps([{"text": d} for d in DOCS]))
    out = load_calibration_tokens(path, tok_nobos, num_samples=4, seq_len=9, seed=3, progress=False)
    assert torch.equal(out, _expected(tok_nobos, DOCS, 4, 9, 3, bos=False))
    assert not (out == BOS).any() and (out == EOS).any()


def test_all_formats_give_the_same_tokens(tmp_path, tok):
    paths = [
        _write(tmp_path, "objs.json", json.dumps([{"text": d} for d in DOCS])),
        _write(tmp_path, "strs.json", json.dumps(DOCS)),
        _write(tmp_path, "lines.jsonl", "\n".join(json.dumps({"text": d}) for d in DOCS) + "\n\n"),
        _write(tmp_path, "docs.txt", "\n\n".join(DOCS) + "\n"),
        _write(tmp_path, "docs_ws.txt", "\n  \n\n".join(DOCS)),  # blank lines may hold spaces
    ]
    ref = load_calibration_tokens(list(DOCS), tok, num_samples=5, seq_len=8, seed=1, progress=False)
    for p in paths:
        assert read_documents(p) == DOCS, p.name
        assert torch.equal(load_calibration_tokens(str(p), tok, num_samples=5, seq_len=8, seed=1), ref), p.name


def test_txt_without_blank_lines_is_one_document(tmp_path, tok):
    p = _write(tmp_path, "one.txt", "the cat sat\non the mat .\nthe dog ran far\n")
    assert read_documents(p) == ["the cat sat\non the mat .\nthe dog ran far"]
    out = load_calibration_tokens(p, tok, num_samples=1, seq_len=13, progress=False)
    assert out[0].tolist() == [BOS] + _ids(tok, "the cat sat on the mat . the dog ran far") + [EOS]


def test_text_field_and_blank_documents(tmp_path, tok):
    p = _write(tmp_path, "c.jsonl", "\n".join(json.dumps({"body": d}) for d in ["  ", *DOCS[:3]]))
    assert read_documents(p, text_field="body") == DOCS[:3]


def test_deterministic_for_a_seed_and_seeds_differ(tmp_path, tok):
    p = _write(tmp_path, "c.json", json.dumps(DOCS))
    a = load_calibration_tokens(p, tok, num_samples=3, seq_len=10, seed=7, progress=False)
    b = load_calibration_tokens(p, tok, num_samples=3, seq_len=10, seed=7, progress=False)
    c = load_calibration_tokens(p, tok, num_samples=3, seq_len=10, seed=8, progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)


# --- the shared C4 sample, read by path ---------------------------------------------------


@pytest.mark.skipif(not C4_DEMO.is_file(), reason=f"shared calibration data not found at {C4_DEMO}")
def test_c4_demo_by_path(tok):
    docs = read_documents(C4_DEMO)
    assert len(docs) == 300
    total = sum(len(_ids(tok, d)) + 1 for d in docs)  # + EOS per document
    out = load_calibration_tokens(C4_DEMO, tok, num_samples=16, seq_len=256, seed=0, progress=False)
    assert out.shape == (16, 256) and (out[:, 0] == BOS).all()
    assert torch.equal(out, load_calibration_tokens(str(C4_DEMO), tok, num_samples=16, seq_len=256, seed=0))
    too_many = total // 255 + 1
    with pytest.raises(ValueError, match=rf"has {total} tokens in 300 documents.*at most {too_many - 1} of"):
        load_calibration_tokens(C4_DEMO, tok, num_samples=too_many, seq_len=256, progress=False)
    calib, held = split_documents(C4_DEMO, 0.1, seed=0)
    assert len(held) == 30 and len(calib) == 270
    assert set(calib).isdisjoint(held) and sorted(calib + held) == sorted(docs)
    out = load_calibration_tokens(calib, tok, num_samples=4, seq_len=64, seed=0, progress=False)
    assert out.shape == (4, 64)


# --- hold-out split ------------------------------------------------------------------


def test_split_documents(tmp_path):
    docs = [f"doc {i}" for i in range(20)]
    calib, held = split_documents(docs, 0.25, seed=1)
    assert len(held) == 5 and len(calib) == 15
    assert calib + held != docs and sorted(calib + held) == sorted(docs)
    assert calib == [d for d in docs if d in calib] and held == [d for d in docs if d in held]  # order kept
    assert split_documents(docs, 0.25, seed=1) == (calib, held)
    assert split_documents(docs, 0.25, seed=2)[1] != held
    assert split_documents(docs, 0.0) == (docs, [])
    p = _write(tmp_path, "d.json", json.dumps(docs))
    assert split_documents(p, 0.25, seed=1) == (calib, held)


@pytest.mark.parametrize("frac", [-0.1, 1.0, 1.5, "0.2", True, float("nan")])
def test_split_documents_rejects_bad_fractions(frac):
    with pytest.raises(ValueError, match="holdout_fraction"):
        split_documents(["a", "b"], frac)


def test_split_documents_too_small_fraction():
    with pytest.raises(ValueError, match="holds out none"):
        split_documents(["a", "b", "c"], 0.1)


# --- errors ------------------------------------------------------------------------------


def test_missing_file(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="calibration file not found"):
        load_calibration_tokens(tmp_path / "nope.json", tok, num_samples=1, seq_len=4)
    with pytest.raises(FileNotFoundError, match="not an existing file.*'self'"):
        load_calibration_tokens("no_such_corpus", tok, num_samples=1, seq_len=4)


def test_unknown_extension(tmp_path, tok):
    p = _write(tmp_path, "c.csv", "text\nthe cat\n")
    with pytest.raises(ValueError, match=r"unknown file type '\.csv'.*\.json, \.jsonl, \.txt"):
        load_calibration_tokens(p, tok, num_samples=1, seq_len=4)


@pytest.mark.parametrize(
    "name,content",
    [
        ("e.json", ""),
        ("e.json", "[]"),
        ("e.json", '["", "  "]'),
        ("e.jsonl", "\n\n"),
        ("e.txt", ""),
        ("e.txt", "\n \n\n"),
    ],
)
def test_empty_files(tmp_path, tok, name, content):
    p = _write(tmp_path, name, content)
    with pytest.raises(ValueError, match="contains no text"):
        load_calibration_tokens(p, tok, num_samples=1, seq_len=4)


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("a.json", '{"text": "the cat"}', "expected a JSON array"),
        ("b.json", '[{"text": "the cat"}, {"content": "x"}]', r"item 1 has no 'text' field \(fields: \['content'\]\)"),
        ("c.json", '[{"text": 3}]', "'text' is a int, not a string"),
        ("d.json", "[1, 2]", "item 0 is a int"),
        ("e.json", "[{", "invalid JSON"),
        ("f.jsonl", '{"text": "a"}\n{oops\n', "line 2 is not valid JSON"),
        ("g.jsonl", '{"text": "a"}\n{"txt": "b"}\n', "line 2 has no 'text' field"),
    ],
)
def test_malformed_files(tmp_path, tok, name, content, match):
    p = _write(tmp_path, name, content)
    with pytest.raises(ValueError, match=match):
        load_calibration_tokens(p, tok, num_samples=1, seq_len=4)


def test_too_few_tokens_says_what_to_change(tmp_path, tok):
    p = _write(tmp_path, "c.json", json.dumps(DOCS))
    total = sum(len(_ids(tok, d)) + 1 for d in DOCS)
    with pytest.raises(ValueError) as err:
        load_calibration_tokens(p, tok, num_samples=100, seq_len=16, progress=False)
    msg = str(err.value)
    assert f"has {total} tokens in {len(DOCS)} documents" in msg
    assert "needs 1500" in msg and "15 text tokens per sample plus the BOS token" in msg
    assert f"at most {total // 15} of seq_len=16 fit" in msg


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(num_samples=0, seq_len=4), ValueError, "num_samples must be >= 1"),
        (dict(num_samples=1, seq_len=1), ValueError, "seq_len must be >= 2"),
        (dict(num_samples=1.5, seq_len=4), TypeError, "num_samples must be an int"),
        (dict(num_samples=1, seq_len=4, seed=-1), ValueError, "seed must be >= 0"),
    ],
)
def test_bad_arguments(tok, kw, exc, match):
    with pytest.raises(exc, match=match):
        load_calibration_tokens(DOCS, tok, **kw)


def test_bad_sources(tok):
    with pytest.raises(TypeError, match="calibration source must be"):
        load_calibration_tokens(42, tok, num_samples=1, seq_len=4)
    with pytest.raises(TypeError, match="item 1 is a int"):
        load_calibration_tokens(["the cat", 3], tok, num_samples=1, seq_len=4)
    with pytest.raises(ValueError, match="contains no text"):
        load_calibration_tokens([], tok, num_samples=1, seq_len=4)
    with pytest.raises(TypeError, match="tokenizer must be"):
        load_calibration_tokens(DOCS, "gpt2", num_samples=1, seq_len=4)


# --- Hugging Face datasets (no network here: a stand-in `datasets` module) -------------------


def test_hf_without_datasets_package(monkeypatch, tok):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    for source in ("hf:allenai/c4:en:validation", "allenai/c4"):
        with pytest.raises(ImportError, match=r"needs the optional `datasets` package.*c4_demo\.json.*'self'"):
            load_calibration_tokens(source, tok, num_samples=1, seq_len=4)


def _fake_datasets(monkeypatch, rows=None, error=None):
    calls = []

    def load_dataset(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        if error is not None:
            raise error
        return iter(rows)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_hf_source_streams_and_packs(monkeypatch, tok):
    calls = _fake_datasets(monkeypatch, rows=[{"text": d, "id": i} for i, d in enumerate(DOCS)])
    out = load_calibration_tokens("hf:someone/corpus:en:validation", tok, num_samples=3, seq_len=6, seed=2)
    assert calls == [("someone/corpus", "en", "validation", True)]
    assert out.shape == (3, 6) and (out[:, 0] == BOS).all()
    _fake_datasets(monkeypatch, rows=[{"text": d} for d in DOCS])
    again = load_calibration_tokens("hf:someone/corpus:en:validation", tok, num_samples=3, seq_len=6, seed=2)
    assert torch.equal(out, again)
    calls = _fake_datasets(monkeypatch, rows=[{"text": d} for d in DOCS])
    load_calibration_tokens("someone/corpus", tok, num_samples=1, seq_len=4)
    assert calls == [("someone/corpus", None, "train", True)]


def test_hf_errors(monkeypatch, tok):
    _fake_datasets(monkeypatch, error=ConnectionError("no route to host"))
    monkeypatch.setattr("nbl_ext.models._hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(RuntimeError, match=r"(?s)could not load Hugging Face dataset 'x/y'.*no route to host.*offline"):
        load_calibration_tokens("hf:x/y", tok, num_samples=1, seq_len=4)
    _fake_datasets(monkeypatch, rows=[{"content": "the cat"}])
    with pytest.raises(ValueError, match=r"no 'text' column \(columns: \['content'\]\)"):
        load_calibration_tokens("hf:x/y", tok, num_samples=1, seq_len=4)
    _fake_datasets(monkeypatch, rows=[])
    with pytest.raises(ValueError, match="is empty"):
        load_calibration_tokens("hf:x/y", tok, num_samples=1, seq_len=4)
    _fake_datasets(monkeypatch, rows=[{"text": "the cat"}])
    with pytest.raises(ValueError, match="has 3 tokens in 1 documents"):
        load_calibration_tokens("hf:x/y", tok, num_samples=2, seq_len=4)
    with pytest.raises(ValueError, match="expected 'hf:NAME"):
        load_calibration_tokens("hf:a:b:c:d", tok, num_samples=1, seq_len=4)


# --- 'self': text sampled from the model -----------------------------------------------------


def _reference_sampling(model, tokenizer, num_samples, seq_len, seed, batch_size, temperature, top_k):
    """The documented sampler without a KV cache: every step recomputes the whole prefix."""
    gen = torch.Generator().manual_seed(seed)
    special = sorted(tokenizer.all_special_ids)
    starts = torch.tensor([t for t in range(len(tokenizer)) if t not in special])
    adds_bos = tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id
    rows = []
    for lo in range(0, num_samples, batch_size):
        b = min(batch_size, num_samples - lo)
        seq = torch.full((b, 1), BOS) if adds_bos else starts[torch.randint(len(starts), (b, 1), generator=gen)]
        for _ in range(1, seq_len):
            logits = model(input_ids=seq, use_cache=False).logits[:, -1, : len(tokenizer)].float()
            logits[:, special] = float("-inf")
            values, index = (logits / temperature).topk(top_k, dim=-1)
            pick = torch.multinomial(torch.softmax(values, -1), 1, generator=gen)
            seq = torch.cat([seq, index.gather(1, pick)], dim=1)
        rows.append(seq)
    return torch.cat(rows)


@pytest.mark.parametrize("add_bos", [True, False])
def test_self_matches_a_full_recompute(add_bos):
    tokenizer = word_tokenizer(add_bos=add_bos)
    model = tiny_llama(len(tokenizer), dtype=torch.float64)  # float64: cache vs recompute agree to ~1e-15
    out = load_calibration_tokens(
        "self",
        tokenizer,
        model=model,
        num_samples=5,
        seq_len=12,
        seed=4,
        batch_size=2,
        temperature=0.8,
        top_k=6,
        progress=False,
    )
    with torch.no_grad():
        ref = _reference_sampling(model, tokenizer, 5, 12, 4, 2, 0.8, 6)
    assert torch.equal(out, ref)
    special = set(tokenizer.all_special_ids)
    assert not any(t in special for t in out[:, 1:].flatten().tolist())
    if add_bos:
        assert (out[:, 0] == BOS).all()
    else:
        assert not any(t in special for t in out[:, 0].tolist())


def test_self_is_deterministic_and_restores_train_mode(tok):
    model = tiny_llama(len(tok)).train()
    kw = dict(model=model, num_samples=3, seq_len=16, progress=False)
    a = load_calibration_tokens("self", tok, seed=0, **kw)
    assert model.training
    b = load_calibration_tokens("self", tok, seed=0, **kw)
    c = load_calibration_tokens("self", tok, seed=1, **kw)
    assert a.shape == (3, 16) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.max()) < len(tok)


def test_self_ignores_padded_vocabulary(tok):
    model = tiny_llama(len(tok) + 48)  # embedding rows past the tokenizer, as in padded vocabularies
    out = load_calibration_tokens("self", tok, model=model, num_samples=4, seq_len=32, top_k=None, progress=False)
    assert int(out.max()) < len(tok)


def test_self_errors(tok):
    with pytest.raises(ValueError, match="pass model="):
        load_calibration_tokens("self", tok, num_samples=1, seq_len=4)
    model = tiny_llama(len(tok))
    for kw, match in [
        (dict(temperature=0), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(top_k=0), "top_k must be >= 1"),
        (dict(batch_size=0), "batch_size must be >= 1"),
    ]:
        with pytest.raises(ValueError, match=match):
            load_calibration_tokens("self", tok, model=model, num_samples=1, seq_len=4, **kw)
    with pytest.raises(TypeError, match="model must be a torch causal LM"):
        load_calibration_tokens("self", tok, model=object(), num_samples=1, seq_len=4)
