"""Several Python threads at once: separate modules give the serial results, and kernels run
with the GIL released.

Each worker thread sets batchnorm to one OpenMP thread (the setting is per calling thread),
so its results are deterministic and must equal, bit for bit, the same calls made serially.
"""

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import batchnorm as bn
import reference as ref
from helpers import assert_close

SHAPES = [(16, 8, 24, 24), (4000, 12), (6, 20, 20, 10)]  # NCHW, (N, C), NHWC with axis=-1
AXES = [1, 1, -1]


def steps(shape, axis, seed):
    """Three training steps, a backward, then eval on one module; everything it produced."""
    bn.set_num_threads(1)
    rng = np.random.default_rng(seed)
    cls = bn.BatchNorm2d if len(shape) == 4 else bn.BatchNorm1d
    m = cls(shape[axis], momentum=None, axis=axis)
    outputs = []
    for _ in range(3):
        x = (rng.standard_normal(shape) * 2 + 5).astype(np.float32)
        outputs.append(m(x))
    outputs.append(m.backward(rng.standard_normal(shape).astype(np.float32)))
    outputs.append(m.eval()(x))
    return outputs + [m.running_mean, m.running_var, m.weight_grad, m.bias_grad]


def test_threads_with_their_own_modules_match_serial_runs():
    jobs = [(shape, axis, seed) for seed in range(4) for shape, axis in zip(SHAPES, AXES)]
    serial = [steps(*job) for job in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(lambda job: steps(*job), jobs))
    for job, expected, got in zip(jobs, serial, concurrent):
        for e, g in zip(expected, got):
            np.testing.assert_array_equal(g, e, err_msg=str(job))


def test_concurrent_results_are_right():
    """The concurrent runs are not only consistent but correct (float64 reference)."""
    shape, axis = SHAPES[0], AXES[0]
    rng = np.random.default_rng(7)
    xs = [(rng.standard_normal(shape) * 3 - 1).astype(np.float32) for _ in range(6)]

    def normalize(x):
        bn.set_num_threads(1)
        return bn.batch_norm(x, None, None, training=True, axis=axis)

    with ThreadPoolExecutor(max_workers=3) as pool:
        ys = list(pool.map(normalize, xs))
    for x, y in zip(xs, ys):
        assert_close(y, ref.forward_train(x, axis=axis)[0], np.float32)


def usable_cpus():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@pytest.mark.skipif(usable_cpus() < 2, reason="needs a second CPU for the Python thread")
def test_kernels_release_the_gil():
    """While another thread is inside one long kernel call, this thread keeps running Python.

    The main thread timestamps a busy Python loop while a worker runs one training forward of
    128 MiB (tens of milliseconds on one OpenMP thread). With the GIL released, the loop's
    longest pause is an OS time slice at most; with the GIL held, it is the whole call."""
    x = np.random.default_rng(0).standard_normal((32, 64, 128, 128)).astype(np.float32)
    y = np.empty_like(x)

    def call():
        bn.set_num_threads(1)
        bn.batch_norm(x, None, None, training=True, out=y)

    call()  # touch the pages once
    start = time.perf_counter()
    call()
    duration = time.perf_counter() - start

    worker = threading.Thread(target=call)
    stamps = [time.perf_counter()]
    worker.start()
    while worker.is_alive():
        stamps.append(time.perf_counter())
    worker.join()
    longest_pause = float(np.max(np.diff(stamps))) if len(stamps) > 1 else float("inf")
    assert longest_pause < duration / 2, (
        f"Python paused {longest_pause * 1e3:.1f} ms during a {duration * 1e3:.1f} ms kernel call: "
        "is the GIL held?")
