"""CovarianceAccumulator.all_reduce with 2 gloo processes on the CPU equals
one process seeing all the data."""

from __future__ import annotations

import os
import socket

import pytest
import safetensors.torch
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import nbl_ext

N, DX, DY = 3001, 10, 6


def _data():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(N, DX, generator=gen, dtype=torch.float64) * 2 + 100.0
    y = x[:, :DY] * 0.3 + torch.randn(N, DY, generator=gen, dtype=torch.float64)
    return x, y


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, y = _data()
        # Uneven shards: rank 0 takes the first 1000 samples, rank 1 the rest.
        sl = slice(0, 1000) if rank == 0 else slice(1000, N)
        acc = nbl_ext.CovarianceAccumulator(DX, DY).update(x[sl], y[sl])
        acc.all_reduce()
        safetensors.torch.save_file(acc.state_dict(), os.path.join(out_dir, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_all_reduce_equals_single_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    x, y = _data()
    single = nbl_ext.CovarianceAccumulator(DX, DY).update(x, y).state_dict()
    states = [safetensors.torch.load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    for st in states:
        assert int(st["count"]) == N
        for key in ("mean_x", "mean_y", "m_xx", "m_yx", "m_yy"):
            assert torch.allclose(st[key], single[key], rtol=1e-12, atol=1e-9), key
    # Every rank ends with the same statistics.
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
