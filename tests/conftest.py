"""pytest fixtures for the batchnorm suite.

* ``tests/`` is put on sys.path so every test can ``import reference`` / ``import helpers``
  whatever import mode pytest runs in.
* ``threads``: runs a test at bn.set_num_threads(1) and (2), restoring the previous value.
* ``rng``: a NumPy Generator seeded from the test's node id (reproducible per test).
* ``no_fallback`` / ``fallback_calls``: torch's own batch_norm made unreachable from
  batchnorm.torch / counted (tests of the drop-in and its ops).
* ``torch`` (PyTorch or a clean skip) is in the repository's root conftest.py.
"""

from __future__ import annotations

import os
import sys
import zlib

import numpy as np
import pytest

# Multi-thread tests must run the threads they ask for, however busy the machine is: the
# library's load check (cpu_load.hpp) would otherwise run them on one thread next to a build.
os.environ.setdefault("BATCHNORM_ADAPTIVE_THREADS", "0")

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import reference  # noqa: E402,F401  (re-exported for tests: ``from conftest import ...`` is not used)


def pytest_configure(config):
    config.addinivalue_line("markers", "torch: compares with PyTorch (skipped when torch is absent)")
    config.addinivalue_line("markers", "threads: runs at 1 and 2 threads via the `threads` fixture")
    config.addinivalue_line("markers", "subprocess: starts a fresh Python interpreter")


THREAD_COUNTS = [1, 2]


@pytest.fixture(params=THREAD_COUNTS, ids=lambda n: f"t{n}")
def threads(request):
    import batchnorm as bn

    if request.param > 1 and not bn._core.openmp_enabled():
        pytest.skip("serial build (no OpenMP): every call runs on one thread")
    old = bn.get_num_threads()
    bn.set_num_threads(request.param)
    try:
        assert bn.get_num_threads() == request.param
        yield request.param
    finally:
        bn.set_num_threads(old)


@pytest.fixture
def rng(request):
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def no_fallback(monkeypatch):
    """Makes torch's own batch_norm unreachable from batchnorm.torch: the kernels must run."""
    bnt = pytest.importorskip("batchnorm.torch")

    def refuse(*args, **kwargs):
        raise AssertionError("batchnorm.torch fell back to torch.nn.functional.batch_norm")
    monkeypatch.setattr(bnt, "_torch_batch_norm", refuse)


@pytest.fixture
def fallback_calls(monkeypatch):
    """The argument tuples of every call batchnorm.torch makes to torch's own batch_norm."""
    bnt = pytest.importorskip("batchnorm.torch")
    calls = []
    real = pytest.importorskip("torch").nn.functional.batch_norm

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)
    monkeypatch.setattr(bnt, "_torch_batch_norm", counting)
    return calls


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "torch" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.torch)
        if "threads" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.threads)


@pytest.fixture
def page_end():
    """helpers.PageEnd: arrays ending where an unreadable page begins (Linux only)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("mprotect through libc: Linux")
    from helpers import PageEnd

    pages = PageEnd()
    yield pages
    pages.close()
