"""Fixtures for the whole suite and for the code blocks of README.md and docs/*.md, which
pytest runs through pytest-markdown-docs. A block asks for a fixture in its info string
(```python fixture:torch); GitHub shows only the language.

* ``torch``, ``threadpoolctl``, ``mpi4py``: the module, or a clean skip (all are optional).
* Each docs block leaves batchnorm's thread count as it found it (a block may set it).
* ``runner:FreshInterpreter`` runs a block as a script in a new interpreter, as a user who
  pastes it into a file would, under a deadline. Blocks that start a process group (gloo,
  MPI_Init) use it: that state, and its teardown at exit, stays out of the test process,
  and a hang fails the block instead of stalling the suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest
# The plugin's runner API (pytest-markdown-docs 0.9): a class registered under its name.
from pytest_markdown_docs._runners import DefaultRunner, register_runner

FRESH_INTERPRETER_DEADLINE_S = 180


@register_runner()
class FreshInterpreter(DefaultRunner):
    def runtest(self, test, args, **_):
        with tempfile.TemporaryDirectory() as tmp:
            script = os.path.join(tmp, "block.py")
            with open(script, "w", encoding="utf8") as f:
                f.write(test.source)  # blank lines first: line numbers are those of the .md file
            try:
                done = subprocess.run([sys.executable, script], cwd=tmp, capture_output=True, text=True,
                                      timeout=FRESH_INTERPRETER_DEADLINE_S)
            except subprocess.TimeoutExpired as hung:
                raise BlockFailed(f"still ran after {FRESH_INTERPRETER_DEADLINE_S} s: a hang\n"
                                  f"{hung.stdout or ''}{hung.stderr or ''}") from None
        if done.returncode != 0:
            raise BlockFailed(f"exited with {done.returncode}\n{done.stdout}{done.stderr}")

    def repr_failure(self, test, excinfo, style=None):
        if excinfo.errisinstance(BlockFailed):
            return f"{test.source_path}:{test.start_line + 1}: the block, run as a script, {excinfo.value}"
        return super().repr_failure(test, excinfo, style)


class BlockFailed(AssertionError):
    pass


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
