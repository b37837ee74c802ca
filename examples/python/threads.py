"""Threads: batchnorm.set_num_threads, and threadpoolctl limiting every OpenMP pool at once.

batchnorm's thread count is one process-wide setting of its own; batchnorm registers it with
threadpoolctl, which sees and limits it (next to NumPy's BLAS and torch's OpenMP). Run: ``python examples/python/threads.py``.
"""

import numpy as np

import batchnorm as bn

x = np.random.default_rng(0).standard_normal((16, 64, 32, 32)).astype(np.float32)
m = bn.BatchNorm2d(64)

print(f"default: {bn.get_num_threads()} threads (OMP_NUM_THREADS or the cores)")
bn.set_num_threads(1)  # the direct control
print(f"after set_num_threads(1): {bn.get_num_threads()}")
bn.set_num_threads(2)

try:
    from threadpoolctl import threadpool_info, threadpool_limits
except ImportError:
    print("threadpoolctl is not installed: pip install threadpoolctl")
else:
    openmp = [(i["internal_api"], i["filepath"]) for i in threadpool_info() if i["user_api"] == "openmp"]
    print(f"OpenMP pools threadpoolctl sees (batchnorm's own among them): {openmp}")
    with threadpool_limits(1):  # e.g. inside a process pool, to avoid oversubscription
        print(f"inside threadpool_limits(1): {bn.get_num_threads()} thread")
        m(x)
    print(f"after: {bn.get_num_threads()} threads")
