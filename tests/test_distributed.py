"""Two gloo processes with uneven shards give the single-process numbers."""
import json
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pyflat

from helpers import make_batch, make_mlp

WEIGHT_DECAY = 0.05


def numbers(op):
    gen = torch.Generator().manual_seed(5)
    V = torch.randn(op.shape[0], 3, generator=gen, dtype=torch.float64)
    top = pyflat.eigsh(op, k=5, seed=1, tol=1e-12)
    trace = pyflat.hutchpp_trace(op, 60, seed=2)
    return {"products": (op @ V).tolist(), "top5": top.eigenvalues.tolist(),
            "trace": trace.value, "loss": op.loss, "samples": op.num_samples}


def worker(rank, world, port, out_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        torch.set_num_threads(1)
        model = make_mlp([6, 10, 4], "tanh", seed=7)
        X, y = make_batch(57, 6, 4, seed=8)
        shard = slice(0, 20) if rank == 0 else slice(20, 57)  # uneven: 20 and 37 samples
        op = pyflat.Hessian(model, (X[shard], y[shard]), batch_size=8,
                            weight_decay=WEIGHT_DECAY, distributed=True)
        result = numbers(op)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_match_one_process(tmp_path):
    out = tmp_path / "rank0.json"
    mp.spawn(worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    got = json.loads(out.read_text())
    model = make_mlp([6, 10, 4], "tanh", seed=7)
    X, y = make_batch(57, 6, 4, seed=8)
    want = numbers(pyflat.Hessian(model, (X, y), weight_decay=WEIGHT_DECAY))
    assert got["samples"] == 57
    assert abs(got["loss"] - want["loss"]) < 1e-12
    products, expected = torch.tensor(got["products"]), torch.tensor(want["products"])
    assert (products - expected).abs().max() <= 1e-10 * expected.abs().max()
    torch.testing.assert_close(torch.tensor(got["top5"]), torch.tensor(want["top5"]),
                               rtol=1e-10, atol=1e-12)
    assert abs(got["trace"] - want["trace"]) <= 1e-10 * abs(want["trace"])


def test_distributed_needs_a_process_group():
    model = make_mlp([6, 10, 4], "tanh")
    with pytest.raises(RuntimeError, match="distributed=True needs an initialized "
                                           "torch.distributed process group"):
        pyflat.GGN(model, make_batch(8, 6, 4), distributed=True)
