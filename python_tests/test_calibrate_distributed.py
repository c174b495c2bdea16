"""Data-parallel calibration: 2 gloo processes on CPU give the single-process result."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import nbl_ext
from hf_tiny import tiny_model, token_data

DATA = dict(num_samples=5, seq_len=40)  # 5 samples over 2 ranks: uneven shards (3 + 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str, kwargs: dict | None = None) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = tiny_model("qwen3", 3, dtype=torch.float64)
        data = token_data(**DATA)
        result = nbl_ext.calibrate(
            model, data, batch_size=2, progress=False, output_dir=f"{out_dir}/run", **(kwargs or {})
        )
        if rank == 0:
            result.save(f"{out_dir}/result")
        # every rank holds the same, all-reduced result
        gathered = [None] * world
        dist.all_gather_object(gathered, result.bounds)
        assert all(g == gathered[0] for g in gathered)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_gloo_ranks_match_one_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    parallel = nbl_ext.CalibrationResult.load(tmp_path / "result")
    single = nbl_ext.calibrate(
        tiny_model("qwen3", 3, dtype=torch.float64), token_data(**DATA), batch_size=2, progress=False
    )
    assert parallel.metadata["world_size"] == 2 and parallel.metadata["tokens"] == single.metadata["tokens"]
    for p, s in zip(parallel.layers, single.layers):
        assert p.tokens == s.tokens == 5 * 40
        torch.testing.assert_close(p.weight, s.weight, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(p.bias, s.bias, rtol=1e-8, atol=1e-10)
        assert p.bound == pytest.approx(s.bound, rel=1e-8)
        assert p.nmse == pytest.approx(s.nmse, rel=1e-8)
        assert p.cosine == pytest.approx(s.cosine, rel=1e-12)
    assert not (tmp_path / "run" / "spill").exists()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_folds_are_by_global_sample_index_across_ranks(tmp_path):
    """Folds of 5 samples over 2 ranks (3 + 2): fold j holds the same samples as in one process."""
    folds = dict(folds=3, ridges=[0.0, 1e-2, 1.0, 10.0])
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), folds), nprocs=2, join=True)
    parallel = nbl_ext.CalibrationResult.load(tmp_path / "result")
    single = nbl_ext.calibrate(
        tiny_model("qwen3", 3, dtype=torch.float64), token_data(**DATA), batch_size=2, progress=False, **folds
    )
    for p, s in zip(parallel.layers, single.layers):
        assert p.ridge == s.ridge and p.cv_curve == pytest.approx(s.cv_curve, rel=1e-8)
        assert p.scores["cv_nmse"] == pytest.approx(s.scores["cv_nmse"], rel=1e-8)
        torch.testing.assert_close(p.weight, s.weight, rtol=1e-8, atol=1e-10)
