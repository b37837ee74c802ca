"""Every examples/python/*.py runs to completion in a fresh interpreter.

The examples check their own results (asserts); here each must exit 0 and print what it
promises. They start together (one process each, one OpenMP thread each) so the suite
waits for the slowest one rather than for their sum. An example that imports an optional
package (torch, threadpoolctl) that is not installed is skipped.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples" / "python").glob("*.py"))
OPTIONAL = ("torch", "threadpoolctl")

# A line each example prints when it got to the end (beyond exiting 0).
EXPECT = {
    "quickstart.py": r"functional eval into out=: max \|out - y\| = ",
    "torch_interop.py": r"stats at mean 1e6",
    "torch_dropin.py": r"converted: \[",
    "inference.py": r"fold: max \|conv'\(x\) - bn\(conv\(x\)\)\| = ",
    "threads.py": r"after set_num_threads\(1\): 1",
    "typed_usage.py": r"isa \w+, \d+ threads",
    "numerics_table.py": r"\| 1e\+06 \| channels_last \| ",
    "norms.py": r"InstanceNorm2d running_mean\[:3\]: \[",
    "ddp_sync_batchnorm.py": r"loss curves match: max \|ddp - single\| = ",
    "gradient_accuracy.py": r"\| 1e\+06 \| ",
}


def importable(name: str) -> bool:
    """Whether `import name` works (a package can be present and still fail to import)."""
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def missing_requirement(path: pathlib.Path) -> str | None:
    text = path.read_text()
    for name in OPTIONAL:
        if re.search(rf"^\s*(import|from) {name}\b", text, re.M) and not importable(name):
            # an example may handle its absence itself (try/except ImportError)
            if not re.search(r"except ImportError", text):
                return name
    return None


@pytest.fixture(scope="module")
def runs():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="error::DeprecationWarning")
    env.pop("BATCHNORM_ISA", None)
    procs = {}
    for path in EXAMPLES:
        if missing_requirement(path) is None:
            procs[path.name] = subprocess.Popen(
                [sys.executable, str(path)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True)
    results = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        results[name] = (proc.returncode, out)
    return results


def test_every_example_is_listed():
    assert {p.name for p in EXAMPLES} == set(EXPECT)


@pytest.mark.subprocess
@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(path, runs):
    needs = missing_requirement(path)
    if needs:
        pytest.skip(f"{path.name} needs {needs}")
    code, out = runs[path.name]
    assert code == 0, f"{path.name} exited with {code}:\n{out}"
    assert re.search(EXPECT[path.name], out), f"{path.name} printed:\n{out}"
