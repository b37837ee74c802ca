"""threadpoolctl controls batchnorm's OpenMP threads.

batchnorm's thread count is its OpenMP runtime's own setting (``get_num_threads`` is
``omp_get_max_threads``), so ``threadpoolctl.threadpool_limits``, which calls
``omp_set_num_threads`` on every loaded OpenMP runtime, limits batchnorm too, and
``threadpool_info()`` lists batchnorm's runtime. ``set_num_threads`` stays the direct control.
The discovery test runs in a fresh interpreter, so that no other library (torch ships its
own libgomp) has loaded an OpenMP runtime before batchnorm.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import batchnorm as bn

threadpoolctl = pytest.importorskip("threadpoolctl")

DISCOVER = textwrap.dedent("""
    import json, numpy, threadpoolctl
    def openmp():
        return {i["filepath"]: i for i in threadpoolctl.threadpool_info() if i["user_api"] == "openmp"}
    before = openmp()
    import batchnorm as bn
    new = [i for path, i in openmp().items() if path not in before]
    out = {"new": new, "threads": bn.get_num_threads()}
    if new:
        bn.set_num_threads(2)
        out["reported_at_2"] = openmp()[new[0]["filepath"]]["num_threads"]
        with threadpoolctl.threadpool_limits(1):
            out["inside"] = bn.get_num_threads()
        out["after"] = bn.get_num_threads()
        with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
            out["inside_openmp_only"] = bn.get_num_threads()
    print(json.dumps(out))
""")


@pytest.mark.subprocess
def test_threadpool_info_lists_batchnorm_openmp_and_limits_it():
    done = subprocess.run([sys.executable, "-c", DISCOVER], capture_output=True, text=True,
                          timeout=120, check=True)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    if not out["new"]:
        pytest.skip("batchnorm was built without OpenMP: it is serial, nothing to limit")
    (lib,) = out["new"]  # importing batchnorm loaded exactly one OpenMP runtime: its own
    assert lib["internal_api"] in ("openmp", "libgomp", "libomp", "libiomp")
    assert lib["num_threads"] == out["threads"]
    assert out["reported_at_2"] == 2  # threadpoolctl reads batchnorm's setting
    assert out["inside"] == 1 and out["inside_openmp_only"] == 1
    assert out["after"] == 2


needs_openmp = pytest.mark.skipif(not bn._core.openmp_enabled(),
                                  reason="batchnorm was built without OpenMP: it is serial, nothing to limit")


@needs_openmp
def test_limits_inside_this_process_and_restored_after():
    old = bn.get_num_threads()
    try:
        bn.set_num_threads(2)
        with threadpoolctl.threadpool_limits(1):
            assert bn.get_num_threads() == 1
            bn.set_num_threads(2)  # the direct control still works inside
            assert bn.get_num_threads() == 2
            bn.set_num_threads(1)
        assert bn.get_num_threads() == 2
        with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):  # BLAS only: not us
            assert bn.get_num_threads() == 2
    finally:
        bn.set_num_threads(old)


@needs_openmp
def test_limits_torch_and_batchnorm_together():
    torch = pytest.importorskip("torch")
    old, old_torch = bn.get_num_threads(), torch.get_num_threads()
    try:
        bn.set_num_threads(2)
        torch.set_num_threads(2)
        with threadpoolctl.threadpool_limits(1):  # both OpenMP runtimes (torch ships its own)
            assert bn.get_num_threads() == 1
            assert torch.get_num_threads() == 1
        assert bn.get_num_threads() == 2 and torch.get_num_threads() == 2
    finally:
        bn.set_num_threads(old)
        torch.set_num_threads(old_torch)
