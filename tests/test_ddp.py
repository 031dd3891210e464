"""DistributedDataParallel with 2 gloo processes on the CPU: the gradients equal a
single-process run on the concatenated batch, within the table, for a few training steps
(in float64, where the table's bound is tight and all-reduce order cannot hide behind it)."""
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port
from example import MHCModel

STEPS, BATCH, SEQ, D, LAYERS = 3, 2, 5, 24, 3


def _data(step):
    g = torch.Generator().manual_seed(1000 + step)
    return (torch.randn(2 * BATCH, SEQ, D, generator=g, dtype=torch.float64),
            torch.randn(2 * BATCH, SEQ, D, generator=g, dtype=torch.float64))


def _train(model, rank=None):
    """A few SGD steps; returns the gradients of every step (rank's half of the batch if DDP)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = []
    for step in range(STEPS):
        h, target = _data(step)
        if rank is not None:
            h, target = h[rank * BATCH:(rank + 1) * BATCH], target[rank * BATCH:(rank + 1) * BATCH]
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(h), target).backward()
        grads.append({k: p.grad.detach().clone() for k, p in model.named_parameters()})
        opt.step()
    return grads


def _worker(rank, port, seed, out_dir, recompute):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(seed)
    model = torch.nn.parallel.DistributedDataParallel(
        MHCModel(24, 4, LAYERS, recompute=recompute).double())
    grads = _train(model, rank)
    torch.save(grads, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("recompute", [None, LAYERS], ids=["keep", "recompute"])
def test_ddp_gradients_equal_single_process(recompute, tmp_path, seed):
    """recompute: the DDP ranks replay the streams in the backward; the single process keeps them."""
    mp.spawn(_worker, args=(free_port(), seed, str(tmp_path), recompute), nprocs=2, join=True)
    torch.manual_seed(seed)
    single = _train(MHCModel(24, 4, LAYERS).double())
    from conftest import assert_close
    for rank in range(2):
        ddp = torch.load(tmp_path / f"rank{rank}.pt")
        for step in range(STEPS):
            for k, g in single[step].items():
                name = k.rsplit(".", 1)[-1]
                out = "d" + name if name in ("phi", "alpha", "bias", "gamma") else "dphi"
                assert_close(ddp[step]["module." + k].numpy(), g.numpy(), out, "fp64",
                             where=f"seed={seed} rank={rank} step={step} {k}")
