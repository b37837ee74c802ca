"""What each rank runs in the SyncBatchNorm tests (imported by tests/test_sync_*.py).

A rank builds the whole batch of every case from a fixed seed (the same on every rank and
in the test process), runs its own slice through a SyncBatchNorm for two training steps
and one eval step, and saves what it got (outputs, gradients, running statistics, counter)
to ``<outdir>/rank<r>.npz``; the test process compares them with one process running the
whole batch. Fault scenarios run after the numerics, in the same processes, and save the
exception each rank saw to ``<outdir>/rank<r>.json``.

Two ways in: ``torch_main`` (a spawned process with a gloo process group) and, as a script
under ``mpirun``, ``python -m mpi4py tests/sync_worker.py <outdir> <case>`` (mpi4py only: this
file imports torch only in ``torch_main``).
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import time
import zlib
from typing import Any, Callable, Dict, List

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from helpers import last_two_swapped, logical_data, rand_params  # noqa: E402

STEPS = 2


class Case:
    """One training scenario: dtype, per-step local batch sizes, layout, data offset."""

    def __init__(self, name: str, dtype: Any, sizes: Callable[[int], List[int]], shape: tuple,
                 channels_last: bool, offset: float = 0.0, momentum: Any = 0.1, transposed: bool = False) -> None:
        self.name, self.dtype, self.sizes, self.shape = name, np.dtype(dtype), sizes, shape
        self.channels_last, self.offset, self.momentum = channels_last, offset, momentum
        # torch steps: the input's last two dimensions swapped in memory, a dense order whose
        # output torch makes contiguous
        self.transposed = transposed

    def split(self, world: int) -> List[int]:
        return self.sizes(world)

    def data(self, world: int, step: int) -> Dict[str, np.ndarray]:
        """The whole batch of a step, logical (N, C, *S), float64 values exact in ``dtype``."""
        rng = np.random.default_rng(zlib.crc32(f"{self.name}/{world}/{step}".encode()))
        n = sum(self.split(world))
        x = logical_data(rng, (n,) + self.shape, self.offset).astype(self.dtype).astype(np.float64)
        g = rng.standard_normal(x.shape).astype(self.dtype).astype(np.float64)
        return {"x": x, "g": g}

    def params(self) -> tuple:
        rng = np.random.default_rng(zlib.crc32(self.name.encode()))
        return rand_params(rng, self.shape[0], self.dtype)

    def local(self, array: np.ndarray, world: int, rank: int) -> np.ndarray:
        sizes = self.split(world)
        start = sum(sizes[:rank])
        return array[start:start + sizes[rank]]

    def arranged(self, logical: np.ndarray) -> np.ndarray:
        """A NumPy input in this case's layout: NCHW, or NHWC with axis=-1."""
        if self.channels_last:
            return np.ascontiguousarray(np.moveaxis(logical, 1, -1).astype(self.dtype))
        return np.ascontiguousarray(logical.astype(self.dtype))

    def logical(self, array: np.ndarray) -> np.ndarray:
        return np.moveaxis(array, -1, 1) if self.channels_last else array

    @property
    def axis(self) -> int:
        return -1 if self.channels_last else 1


def _uneven(world: int) -> List[int]:
    return [rank + 1 for rank in range(world)]


def _with_empty(world: int) -> List[int]:
    return [3, 0] if world == 2 else [2, 0, 3, 0][:world] + [1] * (world - 4)


CASES = [
    Case("uneven_nchw", np.float32, _uneven, (3, 2, 3), channels_last=False),
    Case("uneven_transposed", np.float32, _uneven, (3, 2, 3), channels_last=False, transposed=True),
    Case("empty_rank_cl", np.float32, _with_empty, (3, 2, 3), channels_last=True, momentum=None),
    Case("mean1e6_nchw", np.float32, lambda w: [2] * w, (4, 3, 2), channels_last=False, offset=1e6),
    Case("mean1e6_cl_uneven", np.float32, _uneven, (4, 3, 2), channels_last=True, offset=1e6),
    Case("f64_cl", np.float64, _uneven, (5, 2, 2), channels_last=True),
    Case("f64_2d", np.float64, _with_empty, (5,), channels_last=False),
]


# ---- one rank ---------------------------------------------------------------------------


def _numpy_steps(case: Case, make: Callable[..., Any], world: int, rank: int, out: Dict[str, Any]) -> None:
    """Two training steps and one eval step of the NumPy SyncBatchNorm on this rank's slice."""
    m = make(case.shape[0], momentum=case.momentum, dtype=case.dtype, axis=case.axis)
    m.weight[:], m.bias[:] = case.params()
    for step in range(STEPS):
        batch = case.data(world, step)
        x = case.arranged(case.local(batch["x"], world, rank))
        g = case.arranged(case.local(batch["g"], world, rank))
        y = m(x)
        gx = m.backward(g)
        key = f"{case.name}/{step}"
        out[f"{key}/y"], out[f"{key}/gx"] = case.logical(y), case.logical(gx)
        out[f"{key}/gw"], out[f"{key}/gb"] = m.weight_grad, m.bias_grad
        out[f"{key}/rm"], out[f"{key}/rv"] = m.running_mean.copy(), m.running_var.copy()
        out[f"{key}/count"] = m.num_batches_tracked.copy()
    m.eval()
    batch = case.data(world, 0)
    out[f"{case.name}/eval/y"] = case.logical(m(case.arranged(case.local(batch["x"], world, rank))))


def _torch_steps(case: Case, world: int, rank: int, out: Dict[str, Any]) -> None:
    """The same with ``batchnorm.torch.SyncBatchNorm`` and autograd (channels_last memory)."""
    import torch

    import batchnorm.torch as bnt

    dtype = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}[case.dtype]
    m = bnt.SyncBatchNorm(case.shape[0], momentum=case.momentum, dtype=dtype)
    w, b = case.params()
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(w))
        m.bias.copy_(torch.from_numpy(b))
    fmt = torch.channels_last if case.channels_last and len(case.shape) == 3 else torch.contiguous_format

    def tensor(a: np.ndarray) -> Any:
        t = torch.from_numpy(a.astype(case.dtype))
        return last_two_swapped(t) if case.transposed else t.contiguous(memory_format=fmt)

    for step in range(STEPS):
        batch = case.data(world, step)
        x = tensor(case.local(batch["x"], world, rank)).requires_grad_()
        m.weight.grad = m.bias.grad = None
        y = m(x)
        (y * tensor(case.local(batch["g"], world, rank))).sum().backward()
        key = f"{case.name}/{step}"
        out[f"{key}/y"], out[f"{key}/gx"] = y.detach().numpy(), x.grad.numpy()
        out[f"{key}/layout_kept"] = np.array(y.is_contiguous(memory_format=fmt))  # torch's format
        out[f"{key}/gw"], out[f"{key}/gb"] = m.weight.grad.numpy(), m.bias.grad.numpy()
        out[f"{key}/rm"], out[f"{key}/rv"] = m.running_mean.numpy().copy(), m.running_var.numpy().copy()
        out[f"{key}/count"] = m.num_batches_tracked.numpy().copy()
    m.eval()
    batch = case.data(world, 0)
    with torch.no_grad():
        out[f"{case.name}/eval/y"] = m(tensor(case.local(batch["x"], world, rank))).numpy()


def _outcome(call: Callable[[], Any]) -> Dict[str, Any]:
    """What a call did: its result (a small JSON value) or the exception it raised."""
    started = time.monotonic()
    try:
        value = call()
    except Exception as error:  # recorded for the test process to judge
        return {"raised": type(error).__name__, "message": str(error),
                "seconds": time.monotonic() - started}
    return {"raised": None, "value": value, "seconds": time.monotonic() - started}


def _numpy_faults(make: Callable[..., Any], world: int, rank: int) -> Dict[str, Any]:
    """Mismatched ranks and bad local input: every rank must raise, and the group must still
    work afterwards (the last scenario is a good step)."""
    import batchnorm as bn

    last = world - 1
    x = np.ones((2, 3, 2, 2), np.float32) * np.arange(4, dtype=np.float32).reshape(1, 1, 2, 2)
    good = make(3)
    faults: Dict[str, Any] = {}
    faults["channels"] = _outcome(lambda: make(3 if rank == 0 else 4)(
        x if rank == 0 else np.ones((2, 4, 2, 2), np.float32)).shape)
    faults["dtype"] = _outcome(lambda: make(3, dtype=np.float64 if rank == 0 else np.float32)(
        x.astype(np.float64) if rank == 0 else x).shape)
    faults["bad_input"] = _outcome(lambda: good(x if rank != last else x[:, :2]).shape)
    faults["bad_dtype_input"] = _outcome(lambda: good(x if rank != last else x.astype(np.float64)).shape)

    def bad_grad() -> Any:
        good(x)
        return good.backward(x if rank != last else x[:1]).shape

    faults["bad_grad"] = _outcome(bad_grad)

    # A bad `out` on one rank: every rank raises, before any rank counts the step or writes.
    before = int(good.num_batches_tracked)
    faults["bad_out"] = _outcome(lambda: good(x, out=np.empty_like(x) if rank != last else np.empty((2, 3), np.float32)).shape)
    faults["bad_out_counted"] = int(good.num_batches_tracked) - before
    # an `out` the kernel refuses after the exchange: its elements at one address, or the
    # module's own weight (forward and backward; a batch of one sample whose plane is 1x1)
    one_address = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), shape=x.shape, strides=(0,) * x.ndim)
    faults["zero_stride_out"] = _outcome(lambda: good(x, out=np.empty_like(x) if rank != last else one_address).shape)
    wide = make(24)
    sample = np.arange(24, dtype=np.float32).reshape(1, 24, 1, 1) * (rank + 1)
    on_weight = wide.weight.reshape(sample.shape)
    faults["out_on_weight"] = _outcome(lambda: wide(sample, out=np.empty_like(sample) if rank != last else on_weight).shape)
    faults["refused_out_counted"] = int(good.num_batches_tracked) - before + int(wide.num_batches_tracked)

    def grad_out_on_weight() -> Any:
        wide(sample)
        return wide.backward(sample, out=np.empty_like(sample) if rank != last else on_weight).shape

    faults["grad_out_on_weight"] = _outcome(grad_out_on_weight)

    def bad_grad_out() -> Any:
        good(x)
        return good.backward(x, out=np.empty_like(x) if rank != last else np.empty_like(x, dtype=np.float64)).shape

    faults["bad_grad_out"] = _outcome(bad_grad_out)
    # Eval without running statistics normalizes with this rank's own batch, as torch's
    # SyncBatchNorm: no exchange (each rank has other data here), the local BatchNorm2d's result.
    mine = x * (rank + 1) + rank
    faults["eval_local"] = _outcome(lambda: float(np.abs(
        make(3, track_running_stats=False).eval()(mine)
        - bn.BatchNorm2d(3, track_running_stats=False).eval()(mine)).max()))

    def all_empty() -> Any:
        before = int(good.num_batches_tracked)
        y = good(np.ones((0, 3, 2, 2), np.float32))
        gx = good.backward(np.ones((0, 3, 2, 2), np.float32))
        return [list(y.shape), list(gx.shape), int(good.num_batches_tracked) - before]

    faults["all_empty"] = _outcome(all_empty)
    faults["one_value"] = _outcome(
        lambda: make(3)(np.ones((1, 3), np.float32) if rank == 0 else np.ones((0, 3), np.float32)).shape)
    faults["after"] = _outcome(lambda: float(np.asarray(good(x)).sum()))
    faults.update(_copies_of_checked_modules(
        make, lambda m: (m(_ramp(m.num_features) * (rank + 1)), float(m.running_mean.sum()))[1], rank))
    return faults


def _ramp(channels: int) -> np.ndarray:
    return np.arange(8 * channels, dtype=np.float32).reshape(2, channels, 2, 2)


def _copies_of_checked_modules(make: Callable[..., Any], step: Callable[[Any], float], rank: int) -> Dict[str, Any]:
    """A module that checked its peers, kept by rank 0 while the others load a pickled copy
    of it (broadcast_object_list, or a checkpoint some ranks restore), or its state_dict into
    a rebuilt module: the next step is the same exchange on every rank, so it gives every
    rank the same running mean (``step`` returns its sum). And in a new job
    (here: this process's tokens forgotten, as a new process starts without them) a loaded
    module checks again: a rank whose module has other channels is every rank's ValueError."""
    from batchnorm import distributed

    trained, other = make(3), make(4)
    step(trained), step(other)  # both checked, on every rank
    kept = trained if rank == 0 else pickle.loads(pickle.dumps(trained))
    faults = {"copied": _outcome(lambda: step(kept))}
    distributed._TOKENS.clear()  # a new job
    loaded = pickle.loads(pickle.dumps(trained if rank == 0 else other))
    faults["new_job"] = _outcome(lambda: step(loaded))
    faults["after_new_job"] = _outcome(lambda: step(kept))
    # the usual checkpoint: its state_dict, restored into a rebuilt module on the ranks but
    # rank 0, which keeps its module: the same exchange on every rank (the rebuilt module
    # checked alone, and gloo aborted the process)
    if rank == 0:
        restored = kept
    else:
        restored = make(3)
        restored.load_state_dict(kept.state_dict())
    faults["restored"] = _outcome(lambda: step(restored))
    return faults


def _torch_faults(world: int, rank: int) -> Dict[str, Any]:
    import torch

    import batchnorm.torch as bnt

    last = world - 1
    x = torch.arange(24, dtype=torch.float32).reshape(2, 3, 2, 2)
    good = bnt.SyncBatchNorm(3)
    faults = {
        "channels": _outcome(lambda: list(bnt.SyncBatchNorm(3 if rank == 0 else 4)(
            x if rank == 0 else torch.ones(2, 4, 2, 2)).shape)),
        "dtype": _outcome(lambda: list(bnt.SyncBatchNorm(3, dtype=torch.float64 if rank == 0 else None)(
            x.double() if rank == 0 else x).shape)),
        "bad_input": _outcome(lambda: list(good(x if rank != last else x[:, :2]).shape)),
        "after": _outcome(lambda: float(good(x).sum())),
    }
    faults.update(_copies_of_checked_modules(
        bnt.SyncBatchNorm,
        lambda m: (m(torch.from_numpy(_ramp(m.num_features) * (rank + 1))), float(m.running_mean.sum()))[1], rank))
    return faults


def _save(outdir: str, rank: int, arrays: Dict[str, Any], faults: Dict[str, Any]) -> None:
    np.savez(os.path.join(outdir, f"rank{rank}.npz"), **{k: np.asarray(v) for k, v in arrays.items()})
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(faults, f)


def torch_main(rank: int, world: int, port: int, outdir: str, scenario: str, timeout_s: float) -> None:
    """A spawned rank: gloo on 127.0.0.1, then ``scenario`` ("numerics" or a fault)."""
    import datetime

    import torch
    import torch.distributed as dist

    import batchnorm as bn

    torch.set_num_threads(1)
    bn.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        if scenario == "numerics":
            group = dist.new_group(list(range(world)))
            arrays: Dict[str, Any] = {}
            for case in CASES:
                part: Dict[str, Any] = {}
                _numpy_steps(case, bn.SyncBatchNorm, world, rank, part)  # comm=None: default group
                arrays.update({f"np_default/{k}": v for k, v in part.items()})
                part = {}
                _numpy_steps(case, lambda *a, **k: bn.SyncBatchNorm(*a, comm=group, **k), world, rank, part)
                arrays.update({f"np_group/{k}": v for k, v in part.items()})
                part = {}
                _torch_steps(case, world, rank, part)
                arrays.update({f"torch/{k}": v for k, v in part.items()})
            faults = {f"np/{k}": v for k, v in _numpy_faults(bn.SyncBatchNorm, world, rank).items()}
            faults.update({f"torch/{k}": v for k, v in _torch_faults(world, rank).items()})
            _save(outdir, rank, arrays, faults)
        else:
            _save(outdir, rank, {}, _dies_mid_step(scenario, rank))
            # torch aborts (std::terminate) while tearing down a gloo group whose peer
            # vanished or timed out; what the step raised is saved, so leave without teardown
            os._exit(0)
    finally:
        if scenario == "numerics":
            if sys.exc_info()[0] is None:  # no rank tears the group down under a peer (gloo aborts)
                dist.barrier()
            dist.destroy_process_group()


def _dies_mid_step(scenario: str, rank: int) -> Dict[str, Any]:
    """Rank 1 leaves in the second step: it skips the exchange ("stops") or exits at once
    ("exits"); rank 0 must raise within the group's timeout."""
    import batchnorm.torch as bnt
    import torch

    m = bnt.SyncBatchNorm(3)
    x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(rank))
    m(x)  # a good first step: the peers are compared and the group works
    if rank == 1:
        if scenario == "exits":
            os._exit(3)
        time.sleep(float(os.environ.get("SYNC_TEST_STALL_S", "20")))  # alive, not calling
        return {}
    return {"step2": _outcome(lambda: list(m(x).shape))}


def mpi_main(outdir: str, scenario: str) -> None:
    """A rank under mpirun: mpi4py's COMM_WORLD (explicitly, and as comm=None)."""
    from mpi4py import MPI

    import batchnorm as bn

    bn.set_num_threads(1)
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    if scenario == "numerics":
        arrays: Dict[str, Any] = {}
        for case in CASES:
            part: Dict[str, Any] = {}
            _numpy_steps(case, lambda *a, **k: bn.SyncBatchNorm(*a, comm=comm, **k), world, rank, part)
            arrays.update({f"mpi_world/{k}": v for k, v in part.items()})
            part = {}
            _numpy_steps(case, bn.SyncBatchNorm, world, rank, part)  # comm=None: COMM_WORLD
            arrays.update({f"mpi_default/{k}": v for k, v in part.items()})
        faults = {f"mpi/{k}": v for k, v in _numpy_faults(bn.SyncBatchNorm, world, rank).items()}
        faults["torch_imported"] = "torch" in sys.modules
        _save(outdir, rank, arrays, faults)
    elif scenario == "raises":
        m = bn.SyncBatchNorm(3, comm=comm)
        x = np.ones((2, 3, 2, 2), np.float32) * rank
        m(x)
        if rank == 1:
            raise RuntimeError("rank 1 fails between steps on purpose")
        m(x)  # rank 0 waits here; mpi4py's -m runner aborts the job for rank 1's exception


if __name__ == "__main__":
    mpi_main(sys.argv[1], sys.argv[2])
