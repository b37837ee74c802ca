"""python -m bench.sync: a synchronized batch-norm step vs a local one, at 2 and 4 processes.

Each rank runs forward + backward of one layer on its local batch, ``--steps`` times between
barriers; the time per step of rank 0 is reported (median of ``--rounds`` rounds) for
* local: ``batchnorm.BatchNorm2d`` (NumPy) or ``batchnorm.torch.BatchNorm2d`` (no exchange),
* sync: ``batchnorm.SyncBatchNorm`` over gloo and over MPI (mpi4py), and
  ``batchnorm.torch.SyncBatchNorm`` (autograd) over gloo,
* exchange: the two collectives alone (all-gather of 2C+2 float64, all-reduce of 2C+1),
and the bytes each rank sends and receives per layer per step. Processes are started with
torch.multiprocessing (gloo on 127.0.0.1) and with ``mpirun`` (Open MPI flags added).
More ranks than cores share the cores: say so when quoting the numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List

import numpy as np

from .arguments import positive_int

C_SHAPES = [(8, 64, 28, 28), (8, 256, 7, 7)]


def exchanged_bytes(channels: int, world: int) -> Dict[str, int]:
    """Bytes one rank sends / receives per layer per step (payloads, not wire protocol)."""
    gather = (2 * channels + 2) * 8
    reduce = (2 * channels + 1) * 8
    return {"forward_send": gather, "forward_recv": gather * world, "backward_allreduce": reduce}


def _time(step: Callable[[], Any], barrier: Callable[[], Any], steps: int, rounds: int) -> float:
    step()  # first use: the peer check and any lazy set-up
    samples = []
    for _ in range(rounds):
        barrier()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        barrier()
        samples.append((time.perf_counter() - start) / steps)
    return statistics.median(samples)


def _numpy_rows(sync_factory: Callable[[int], Any], link: Any, barrier: Callable[[], Any],
                shape: tuple, steps: int, rounds: int) -> Dict[str, float]:
    import batchnorm as bn

    x = np.random.default_rng(link.rank).standard_normal(shape).astype(np.float32)
    g = np.ones_like(x)
    local, sync = bn.BatchNorm2d(shape[1]), sync_factory(shape[1])

    def run(m: Any) -> Callable[[], Any]:
        return lambda: (m(x), m.backward(g))

    c = shape[1]
    send = np.zeros(2 * c + 2)
    reduce = np.zeros(2 * c + 1)

    def exchange() -> None:
        link.allgather(send, "bench")
        link.allreduce(reduce, "bench")

    return {"local": _time(run(local), barrier, steps, rounds),
            "sync": _time(run(sync), barrier, steps, rounds),
            "exchange": _time(exchange, barrier, steps, rounds)}


def _torch_rows(barrier: Callable[[], Any], rank: int, shape: tuple, steps: int, rounds: int) -> Dict[str, float]:
    import torch

    import batchnorm.torch as bnt

    x = torch.randn(shape, generator=torch.Generator().manual_seed(rank)).requires_grad_()

    def run(m: Any) -> Callable[[], Any]:
        return lambda: m(x).sum().backward()

    return {"local": _time(run(bnt.BatchNorm2d(shape[1])), barrier, steps, rounds),
            "sync": _time(run(bnt.SyncBatchNorm(shape[1])), barrier, steps, rounds)}


def gloo_rank(rank: int, world: int, port: int, args: Dict[str, Any], results: Any) -> None:
    import torch
    import torch.distributed as dist

    import batchnorm as bn
    from batchnorm.distributed import transport

    torch.set_num_threads(1)
    bn.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    rows = []
    for shape in args["shapes"]:
        numpy = _numpy_rows(bn.SyncBatchNorm, transport(None), dist.barrier, shape, args["steps"], args["rounds"])
        rows.append({"engine": "gloo", "module": "batchnorm.SyncBatchNorm", "shape": shape, **numpy})
        drop_in = _torch_rows(dist.barrier, rank, shape, args["steps"], args["rounds"])
        rows.append({"engine": "gloo", "module": "batchnorm.torch.SyncBatchNorm", "shape": shape,
                     **drop_in, "exchange": numpy["exchange"]})
    if rank == 0:
        results.put(rows)
    dist.destroy_process_group()


def mpi_rank(args: Dict[str, Any]) -> None:
    from mpi4py import MPI

    import batchnorm as bn
    from batchnorm.distributed import transport

    bn.set_num_threads(1)
    comm = MPI.COMM_WORLD
    rows = []
    for shape in args["shapes"]:
        def sync(c: int) -> Any:
            return bn.SyncBatchNorm(c, comm=comm)

        numpy = _numpy_rows(sync, transport(comm), comm.Barrier, shape, args["steps"], args["rounds"])
        rows.append({"engine": "Open MPI (mpi4py)", "module": "batchnorm.SyncBatchNorm", "shape": shape, **numpy})
    if comm.Get_rank() == 0:
        print("ROWS " + json.dumps(rows))


def run_gloo(world: int, args: Dict[str, Any]) -> List[Dict[str, Any]]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(gloo_rank, args=(world, port, args, results), nprocs=world)
    return results.get()  # type: ignore[no-any-return]


def run_mpi(world: int, args: Dict[str, Any]) -> List[Dict[str, Any]]:
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        print("no mpirun: MPI rows skipped", file=sys.stderr)
        return []
    flags = ["--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([mpirun, *flags, "-np", str(world), sys.executable, "-m", "bench.sync",
                           "--mpi-rank", json.dumps(args)], capture_output=True, text=True, env=env,
                          check=True)
    line = next(line for line in done.stdout.splitlines() if line.startswith("ROWS "))
    return json.loads(line[5:])  # type: ignore[no-any-return]


# ---- cost model (Thakur, Rabenseifner, Gropp 2005): alpha per message, beta per byte ----------

NETWORKS = {"InfiniBand HDR (alpha 2 us, 12.5 GB/s)": (2e-6, 0.08e-9),
            "10 GbE TCP (alpha 30 us, 1.25 GB/s)": (30e-6, 0.8e-9)}


def allgather_ring(p: int, m: float, a: float, b: float) -> float:
    return (p - 1) * (a + m * b)


def allgather_doubling(p: int, m: float, a: float, b: float) -> float:
    return np.log2(p) * a + (p - 1) * m * b  # type: ignore[no-any-return]


def allreduce_ring(p: int, n: float, a: float, b: float) -> float:
    return 2 * (p - 1) * a + 2 * (p - 1) / p * n * b


def allreduce_tree(p: int, n: float, a: float, b: float) -> float:
    return np.log2(p) * (a + n * b)  # type: ignore[no-any-return]  # recursive doubling


def protocols(c: int) -> Dict[str, Dict[str, Any]]:
    """Per layer per step: what is exchanged (bytes per rank) by each protocol."""
    return {
        "batchnorm: all-gather (count, mean, M2) f64 + all-reduce (sum_dy, sum_dy_xmu) f64":
            {"gather": (2 * c + 2) * 8, "reduce": (2 * c + 1) * 8},
        "all-reduce alternative: 3C f64 forward + 2C f64 backward":
            {"reduce_fwd": 3 * c * 8, "reduce": (2 * c + 1) * 8},
        "PyTorch GPU SyncBatchNorm: all-gather (mean, invstd, count) f32 + all-reduce 2C f32":
            {"gather": (2 * c + 1) * 4, "reduce": 2 * c * 4},
    }


def cost_model(channels: List[int], ranks: List[int]) -> str:
    out = []
    for net, (a, b) in NETWORKS.items():
        for c in channels:
            out.append(f"\n{net}, C = {c}: microseconds per layer per step (forward + backward exchange)\n")
            out.append("| protocol | collectives | " + " | ".join(f"P={p}" for p in ranks) + " |")
            out.append("|" + "---|" * (2 + len(ranks)))
            for name, sizes in protocols(c).items():
                for algo in ("ring", "tree"):
                    cells = []
                    for p in ranks:
                        t = 0.0
                        if "gather" in sizes:
                            t += (allgather_ring if algo == "ring" else allgather_doubling)(p, sizes["gather"], a, b)
                        if "reduce_fwd" in sizes:
                            t += (allreduce_ring if algo == "ring" else allreduce_tree)(p, sizes["reduce_fwd"], a, b)
                        t += (allreduce_ring if algo == "ring" else allreduce_tree)(p, sizes["reduce"], a, b)
                        cells.append(f"{t * 1e6:.0f}")
                    out.append(f"| {name} | {algo} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def table(rows: List[Dict[str, Any]]) -> str:
    head = ("| engine | module | ranks | local shape (per rank) | local step | sync step | "
            "overhead | exchange alone | bytes/rank/layer/step: fwd send, fwd recv, bwd all-reduce |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        b = exchanged_bytes(r["shape"][1], r["world"])
        lines.append(
            f"| {r['engine']} | {r['module']} | {r['world']} | {'x'.join(map(str, r['shape']))} | "
            f"{r['local'] * 1e3:.3f} ms | {r['sync'] * 1e3:.3f} ms | {(r['sync'] - r['local']) * 1e3:+.3f} ms | "
            f"{r['exchange'] * 1e3:.3f} ms | {b['forward_send']}, {b['forward_recv']}, {b['backward_allreduce']} |")
    return "\n".join(lines)


def main(argv: List[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.sync", description=__doc__.split("\n")[0])
    p.add_argument("--worlds", type=positive_int, nargs="+", default=[2, 4])
    p.add_argument("--engines", nargs="+", default=["gloo", "mpi"], choices=["gloo", "mpi"])
    p.add_argument("--steps", type=positive_int, default=10)
    p.add_argument("--rounds", type=positive_int, default=7)
    p.add_argument("--model", action="store_true", help="print the cost model for 64-1024 ranks only")
    p.add_argument("--mpi-rank", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.mpi_rank:
        return mpi_rank(json.loads(a.mpi_rank))
    if a.model:
        return print(cost_model([64, 1024], [64, 128, 256, 512, 1024]))
    args = {"shapes": C_SHAPES, "steps": a.steps, "rounds": a.rounds}
    rows = []
    for world in a.worlds:
        for engine in a.engines:
            got = run_gloo(world, args) if engine == "gloo" else run_mpi(world, args)
            rows.extend({**r, "world": world, "shape": tuple(r["shape"])} for r in got)
    print(f"{os.cpu_count()} CPUs; ranks run 1 thread each; float32, forward + backward per step")
    print(table(rows))


if __name__ == "__main__":
    main()
