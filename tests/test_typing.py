"""Typing: ``mypy --strict`` on the Python package and on examples/python/typed_usage.py, and
the ``_core`` stubs (batchnorm/_core.pyi) that nanobind's stubgen writes at build time.

mypy is optional (skipped without it), and so is torch: the package's torch modules subclass
torch's and are only typed against it, so without torch the mypy runs skip too. Its cache lives in the repository's .mypy_cache
(git-ignored): the first run analyses torch's sources (~30 s), later runs take seconds.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

import batchnorm

pytest.importorskip("mypy")

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "python" / "typed_usage.py"
INSTALLED = pathlib.Path(batchnorm.__file__).parent
STUB = INSTALLED / "_core.pyi"
ARRAY_FUNCTIONS = ("stats", "forward_train", "forward_eval", "backward")


def mypy(*targets: os.PathLike[str] | str, cwd: pathlib.Path = ROOT) -> None:
    cmd = [sys.executable, "-m", "mypy", "--strict", "--no-color-output",
           "--config-file", str(ROOT / "pyproject.toml"),
           "--cache-dir", str(ROOT / ".mypy_cache"), *map(str, targets)]
    env = dict(os.environ, MYPYPATH="")
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}{done.stderr}"


pytestmark = pytest.mark.subprocess


def test_stub_is_installed_with_precise_signatures():
    assert STUB.is_file(), f"{STUB} is missing: the build should generate it (nanobind_add_stub)"
    text = STUB.read_text()
    assert (INSTALLED / "py.typed").is_file()
    for name in ARRAY_FUNCTIONS:
        line = next(ln for ln in text.splitlines() if ln.startswith(f"def {name}("))
        assert "-> object" not in line, line  # nb::sig gives the real return types
        assert "axis: int = 1" in line, line
    assert "import numpy.typing" in text
    # the stub and the module agree on every public name
    import batchnorm._core as core
    names = {n for n in dir(core) if not n.startswith("_")}
    stubbed = {ln[4:ln.index("(")] for ln in text.splitlines() if ln.startswith("def ")}
    assert stubbed == names


def test_mypy_strict_on_package_and_example():
    """The source tree as a developer checks it (``_core`` unresolved there: Any)."""
    pytest.importorskip("torch")
    mypy("python/batchnorm", EXAMPLE)


def test_mypy_strict_against_the_generated_stub(tmp_path):
    """The package's Python files beside the installed ``_core.pyi``: the layer must agree
    with the real extension's signatures (what users of the installed wheel get)."""
    pytest.importorskip("torch")
    if not STUB.is_file():
        pytest.fail(f"{STUB} is missing")
    package = tmp_path / "batchnorm"
    shutil.copytree(ROOT / "python" / "batchnorm", package,
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copy(STUB, package / "_core.pyi")
    example = tmp_path / "typed_usage.py"
    shutil.copy(EXAMPLE, example)
    mypy(package, example, cwd=tmp_path)
