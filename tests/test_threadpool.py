"""batchnorm's thread count next to threadpoolctl and torch.

The count is batchnorm's own process-wide setting, not the OpenMP runtime's, so:
- torch.set_num_threads (omp_set_num_threads on the libgomp that torch and batchnorm share)
  does not change it, nor does bn.set_num_threads change torch's;
- batchnorm registers its own threadpoolctl controller (user_api "openmp", internal_api
  "batchnorm"): threadpool_info() lists it and threadpool_limits (every API, or "openmp")
  limits it and restores it, as it does any OpenMP pool.
The discovery and torch tests run in fresh interpreters, so that the order in which torch and
batchnorm load is the one under test.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import batchnorm as bn

threadpoolctl = pytest.importorskip("threadpoolctl")

needs_openmp = pytest.mark.skipif(not bn._core.openmp_enabled(),
                                  reason="batchnorm was built without OpenMP: it is serial, nothing to limit")


def run_fresh(code):
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_openmp
@pytest.mark.subprocess
def test_threadpool_info_lists_batchnorm_and_limits_it():
    out = run_fresh("""
        import json, threadpoolctl
        import batchnorm as bn
        def ours():
            return [i for i in threadpoolctl.threadpool_info() if i["internal_api"] == "batchnorm"]
        bn.set_num_threads(3)
        out = {"listed": ours()}
        with threadpoolctl.threadpool_limits(1):
            out["inside"] = bn.get_num_threads()
        out["after"] = bn.get_num_threads()
        with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
            out["inside_openmp_only"] = bn.get_num_threads()
        with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
            out["inside_blas_only"] = bn.get_num_threads()
        print(json.dumps(out))
    """)
    (lib,) = out["listed"]  # exactly one entry: batchnorm's extension module
    assert lib["user_api"] == "openmp"
    assert lib["num_threads"] == 3
    assert lib["version"] == bn.__version__
    assert "_core" in lib["filepath"]
    assert out["inside"] == 1 and out["inside_openmp_only"] == 1
    assert out["inside_blas_only"] == 3  # BLAS only: not us
    assert out["after"] == 3


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
    finally:
        bn.set_num_threads(old)


TORCH_AND_BN = """
    import json
    {first}
    {second}
    bn.set_num_threads(2)
    torch.set_num_threads(2)
    out = {{}}
    torch.set_num_threads(1)
    out["bn_after_torch_1"] = bn.get_num_threads()
    torch.set_num_threads(2)
    bn.set_num_threads(1)
    out["torch_after_bn_1"] = torch.get_num_threads()
    bn.set_num_threads(2)
    torch.set_num_threads(2)
    import threadpoolctl
    with threadpoolctl.threadpool_limits(1):
        out["inside"] = [bn.get_num_threads(), torch.get_num_threads()]
    out["after"] = [bn.get_num_threads(), torch.get_num_threads()]
    print(json.dumps(out))
"""


@needs_openmp
@pytest.mark.subprocess
@pytest.mark.parametrize("torch_first", [True, False], ids=["torch-first", "batchnorm-first"])
def test_torch_and_batchnorm_counts_are_independent(torch_first):
    pytest.importorskip("torch")
    imports = ["import torch", "import batchnorm as bn"]
    first, second = imports if torch_first else imports[::-1]
    out = run_fresh(TORCH_AND_BN.format(first=first, second=second))
    assert out["bn_after_torch_1"] == 2  # torch's setting leaves batchnorm's alone
    assert out["torch_after_bn_1"] == 2  # and the other way round
    assert out["inside"] == [1, 1]  # threadpoolctl limits both
    assert out["after"] == [2, 2]
