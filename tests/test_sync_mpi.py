"""SyncBatchNorm over mpi4py: ``mpirun -np 2`` and ``-np 4`` running tests/sync_worker.py.

Each launch runs every case of sync_worker.CASES with ``comm=MPI.COMM_WORLD`` and with
``comm=None`` (no torch in the ranks: None means COMM_WORLD), then the fault scenarios.
mpirun has a hard timeout: a hang fails the test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install mpi4py)")
MPIRUN = shutil.which("mpirun") or shutil.which("mpiexec")
if MPIRUN is None:
    pytest.skip("no mpirun/mpiexec on PATH (Debian: apt install openmpi-bin)", allow_module_level=True)

import sync_check  # noqa: E402
import sync_worker  # noqa: E402

DEADLINE_S = 60.0


def _open_mpi_flags():
    """Open MPI refuses root and more ranks than cores unless told; MPICH needs neither."""
    version = subprocess.run([MPIRUN, "--version"], capture_output=True, text=True).stdout
    if "Open MPI" not in version and "OpenRTE" not in version:
        return []
    flags = ["--oversubscribe"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        flags.append("--allow-run-as-root")
    return flags


def mpirun(world, scenario, outdir):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [MPIRUN, *_open_mpi_flags(), "-np", str(world), sys.executable, "-m", "mpi4py",
               sync_worker.__file__, str(outdir), scenario]
    started = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=DEADLINE_S, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"mpirun -np {world} {scenario} still ran after {DEADLINE_S} s: a hang")
    return done, time.monotonic() - started


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"np{w}")
def numerics(request, tmp_path_factory):
    world = request.param
    outdir = tmp_path_factory.mktemp(f"sync_mpi_{world}")
    done, _ = mpirun(world, "numerics", outdir)
    assert done.returncode == 0, done.stdout + done.stderr
    arrays, faults = [], []
    for rank in range(world):
        with np.load(outdir / f"rank{rank}.npz") as f:
            arrays.append(dict(f))
        with open(outdir / f"rank{rank}.json") as f:
            faults.append(json.load(f))
    return world, arrays, faults


@pytest.mark.subprocess
@pytest.mark.parametrize("impl", ["mpi_world", "mpi_default"])
@pytest.mark.parametrize("case", sync_worker.CASES, ids=lambda c: c.name)
def test_ranks_equal_one_process_on_the_whole_batch(numerics, impl, case):
    world, arrays, _ = numerics
    sync_check.check_case(arrays, impl, case, world)


@pytest.mark.subprocess
def test_faults_raise_on_every_rank(numerics):
    world, _, faults = numerics
    for rank, f in enumerate(faults):
        assert f["torch_imported"] is False  # comm=None found MPI without importing torch
        last = rank == world - 1
        assert f["mpi/channels"]["raised"] == "ValueError"
        assert "num_features differs" in f["mpi/channels"]["message"]
        assert f["mpi/dtype"]["raised"] == "TypeError"
        assert "rank 0: float64, rank 1: float32" in f["mpi/dtype"]["message"]
        for name in ("bad_input", "bad_dtype_input", "bad_grad", "bad_out", "bad_grad_out", "zero_stride_out",
                     "out_on_weight", "grad_out_on_weight"):
            got = f[f"mpi/{name}"]
            if last:
                assert got["raised"] in ("ValueError", "TypeError"), (name, got)
            else:
                assert got["raised"] == "RuntimeError" and f"rank(s) [{world - 1}]" in got["message"] \
                    or "1 rank(s)" in got["message"], (name, got)
        assert f["mpi/bad_out_counted"] == f["mpi/refused_out_counted"] == 0  # no rank counted a failed step
        assert f["mpi/eval_local"] == {**f["mpi/eval_local"], "raised": None, "value": 0.0}
        assert f["mpi/all_empty"]["value"] == [[0, 3, 2, 2], [0, 3, 2, 2], 0]
        assert "Expected more than 1 value per channel" in f["mpi/one_value"]["message"]
        assert f["mpi/after"]["raised"] is None
    sync_check.check_copies_of_checked_modules([{k[4:]: v for k, v in f.items() if k.startswith("mpi/")} for f in faults])


@pytest.mark.subprocess
def test_a_rank_that_raises_mid_step_ends_the_job(tmp_path):
    """MPI has no timeout: a rank that raises under ``python -m mpi4py`` aborts the job
    (MPI_Abort), so the rank waiting in the exchange ends too, instead of hanging."""
    done, seconds = mpirun(2, "raises", tmp_path)
    assert done.returncode != 0
    assert "rank 1 fails between steps on purpose" in done.stdout + done.stderr
    assert seconds < DEADLINE_S
