"""Fixtures for the whole suite and for the code blocks of README.md and docs/*.md, which
pytest runs through pytest-markdown-docs. A block asks for a fixture in its info string
(```python fixture:torch); GitHub shows only the language.

* ``torch``, ``threadpoolctl``, ``mpi4py``: the module, or a clean skip (all are optional).
* Each docs block leaves batchnorm's thread count as it found it (a block may set it).
"""

from __future__ import annotations

import pytest


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


@pytest.fixture
def threadpoolctl():
    return pytest.importorskip("threadpoolctl")


@pytest.fixture
def mpi4py():
    return pytest.importorskip("mpi4py")


@pytest.fixture(autouse=True)
def _docs_block_keeps_threads(request):
    if request.node.get_closest_marker("markdown-docs") is None:
        yield
        return
    import batchnorm as bn

    threads = bn.get_num_threads()
    yield
    bn.set_num_threads(threads)
