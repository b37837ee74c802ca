"""Data-parallel training on the CPU with synchronized batch norm (DDP, gloo, 2 processes).

A small CNN is converted with ``batchnorm.torch.SyncBatchNorm.convert_sync_batchnorm`` and
wrapped in ``DistributedDataParallel``; each of 2 processes trains on its half of every
batch. Because the batch statistics span both halves, the loss curve is that of one process
training the same model on the whole batch with plain ``torch.nn.BatchNorm2d``, which is run
here too, and compared.

    python examples/python/ddp_sync_batchnorm.py
"""

from __future__ import annotations

import datetime
import gc
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import batchnorm.torch as bnt

WORLD, BATCH, STEPS, LR = 2, 16, 12, 0.1


def model() -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights in every process
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3),
    )


def batch(step: int) -> tuple:
    """The whole batch of a step: 16 images 8x8 (offset, so the statistics matter), 3 classes."""
    g = torch.Generator().manual_seed(step)
    y = torch.randint(0, 3, (BATCH,), generator=g)
    x = torch.randn(BATCH, 3, 8, 8, generator=g) * 2.0 + 3.0
    x[torch.arange(BATCH), y] += 2.0  # the class is the brighter channel: learnable
    return x, y


def single_process() -> list:
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        x, y = batch(step)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def worker(rank: int, port: int, results: "mp.SimpleQueue") -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    net = DistributedDataParallel(bnt.SyncBatchNorm.convert_sync_batchnorm(model()))
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    half = BATCH // WORLD
    losses = []
    for step in range(STEPS):
        x, y = batch(step)
        mine = slice(rank * half, (rank + 1) * half)
        loss = F.cross_entropy(net(x[mine]), y[mine])  # this rank's half
        opt.zero_grad()
        loss.backward()  # DDP averages the gradients: those of the whole batch's mean loss
        opt.step()
        whole = loss.detach().clone()
        dist.all_reduce(whole)
        losses.append(whole.item() / WORLD)
    if rank == 0:
        results.put(losses)
    # Tear down in one order on every rank: DDP's reducer holds the group, so it goes first,
    # while every peer is still connected; then a barrier, so that no rank closes its gloo
    # connections under a peer that is still using them (gloo aborts that peer).
    del net, opt
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.spawn(worker, args=(port, results), nprocs=WORLD)
    ddp = results.get()
    single = single_process()
    for step, (a, b) in enumerate(zip(ddp, single)):
        print(f"step {step:2d}  loss: 2 processes {a:.6f}   1 process {b:.6f}")
    worst = max(abs(a - b) for a, b in zip(ddp, single))
    assert worst < 1e-4, worst  # float32 training, 12 steps: rounding only
    assert single[-1] < single[0]  # it does train
    print(f"loss curves match: max |ddp - single| = {worst:.2e}")


if __name__ == "__main__":
    main()
