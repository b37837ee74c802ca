"""Several Python threads at once: separate modules give the serial results, and kernels run
with the GIL released.

batchnorm runs on one thread here (the count is process-wide: set once, for every Python
thread), so results are deterministic and must equal, bit for bit, the same calls made serially.
"""

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import batchnorm as bn
import reference as ref
from helpers import assert_close

SHAPES = [(16, 8, 24, 24), (4000, 12), (6, 20, 20, 10)]  # NCHW, (N, C), NHWC with axis=-1
AXES = [1, 1, -1]


@pytest.fixture(autouse=True)
def one_thread():
    old = bn.get_num_threads()
    bn.set_num_threads(1)
    yield
    bn.set_num_threads(old)


def steps(shape, axis, seed):
    """Three training steps, a backward, then eval on one module; everything it produced."""
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
        return bn.batch_norm(x, None, None, training=True, axis=axis)

    with ThreadPoolExecutor(max_workers=3) as pool:
        ys = list(pool.map(normalize, xs))
    for x, y in zip(xs, ys):
        assert_close(y, ref.forward_train(x, axis=axis)[0], np.float32)


def test_kernels_release_the_gil():
    """While another thread is inside one kernel call, this thread runs Python.

    Measured, not timed: the output starts as NaN, and one thread runs a training forward
    that writes it front to back while this thread reads its first and last values. Seeing
    the first written and the last not yet written means this thread ran Python in the
    middle of the call, which a call holding the GIL makes impossible. A busy machine can
    deschedule this thread for a whole call, so it gets several calls to see one."""
    x = np.random.default_rng(0).standard_normal((16, 64, 128, 128)).astype(np.float32)
    y = np.empty_like(x)
    first, last = (0, 0, 0, 0), (-1, -1, -1, -1)
    for attempt in range(50):
        y.fill(np.nan)
        worker = threading.Thread(target=bn.batch_norm, args=(x, None, None),
                                  kwargs=dict(training=True, out=y))
        worker.start()
        seen_inside = False
        while worker.is_alive() and not seen_inside:
            seen_inside = not np.isnan(y[first]) and np.isnan(y[last])
        worker.join()
        assert not np.isnan(y).any()  # the call finished and wrote everything
        if seen_inside:
            return
    pytest.fail("no Python ran during 50 kernel calls: is the GIL held?")
