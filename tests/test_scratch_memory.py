"""Scratch memory of wide channels-last training is bounded (issue 10.13).

Rows are processed in blocks of columns, so the per-thread scratch (about 60 bytes per column)
no longer grows with the row width: a (3, 1e6, 2) float32 training step (23 MiB) used to peak
at +355 MiB beyond its outputs. C++ allocations are invisible to tracemalloc, so a fresh
interpreter reads its own peak resident size (VmHWM) before and after.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = r"""
import numpy as np
from batchnorm import _core

def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

x = np.random.default_rng(0).standard_normal((3, 1_000_000, 2), dtype=np.float32)
rm, rv = np.zeros(1_000_000, np.float32), np.ones(1_000_000, np.float32)
_core.set_num_threads(2)
before = peak()
y, m, s = _core.forward_train(x, None, None, rm, rv, 0.1, 1e-5, 1)
gx, gw, gb = _core.backward(x, x, m, s, None, 1)
y2, m2, s2 = _core.group_norm(np.moveaxis(x, 1, 2), 1000, None, None, 1e-5, -1)
print((peak() - before - sum(a.nbytes for a in (y, m, s, gx, gw, gb, y2, m2, s2))) / 2**20)
"""


@pytest.mark.subprocess
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_wide_channels_last_training_scratch_is_bounded():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    extra_mib = float(result.stdout.strip())
    # The input is 23 MiB; what a call may add beyond its outputs stays a fraction of that.
    assert extra_mib < 24, f"peak resident size grew by {extra_mib:.1f} MiB beyond the outputs"
