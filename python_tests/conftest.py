"""Shared fixtures: devices to test on, and seeded generators."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
# The "cuda" case carries the `cuda` marker (pyproject.toml): `pytest -m cuda` selects every test that needs the
# GPU, which is what .ci/gpu runs.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]),
]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(20251123)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved 2-layer random Llama with the word-level tokenizer (python_tests/_tiny.py), for CLI tests."""
    pytest.importorskip("transformers")
    from _tiny import tiny_llama, word_tokenizer

    path = tmp_path_factory.mktemp("tiny-model")
    tok = word_tokenizer()
    tiny_llama(vocab_size=len(tok), seed=3).save_pretrained(path)
    tok.save_pretrained(path)
    return path
