"""`python -m batchnorm` and the thread-count default (fresh interpreters)."""

import os
import subprocess
import sys

import pytest

import batchnorm as bn

pytestmark = pytest.mark.subprocess


def run(args, extra_env=None):
    env = dict(os.environ)
    if extra_env:
        env.update(extra_env)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, env=env)


def test_main_prints_isa():
    r = run(["-m", "batchnorm"])
    assert r.returncode == 0, r.stderr
    q = run(["-c", "import batchnorm; print(batchnorm.isa())"])
    isa = q.stdout.strip()
    assert isa in ("avx512", "avx2", "neon", "scalar")
    assert isa in r.stdout.split() or isa in r.stdout, r.stdout


def test_main_cmakedir():
    r = run(["-m", "batchnorm", "--cmakedir"])
    assert r.returncode == 0, r.stderr
    path = r.stdout.strip()
    assert os.path.isdir(path), path
    assert os.path.samefile(path, bn.get_cmake_dir())
    names = [f.lower() for f in os.listdir(path)]
    assert "batchnormconfig.cmake" in names or "batchnorm-config.cmake" in names, names


def test_main_includedir():
    r = run(["-m", "batchnorm", "--includedir"])
    assert r.returncode == 0, r.stderr
    path = r.stdout.strip()
    assert os.path.isdir(path), path
    assert os.path.samefile(path, bn.get_include())
    assert os.path.isfile(os.path.join(path, "batchnorm", "batchnorm.hpp"))


def test_main_rejects_unknown_option():
    r = run(["-m", "batchnorm", "--no-such-option"])
    assert r.returncode != 0


@pytest.mark.parametrize("n", ["1", "2", "3"])
def test_default_threads_follow_omp_num_threads(n):
    code = "import batchnorm as bn; print(bn.get_num_threads() if bn._core.openmp_enabled() else 'serial')"
    r = run(["-c", code], {"OMP_NUM_THREADS": n})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() in (n, "serial")  # a serial build (no OpenMP) has no thread setting


def test_main_version():
    r = run(["-m", "batchnorm", "--version"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"batchnorm {bn.__version__}"


def test_bench_numerics_help():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "bench.numerics", "--help"], capture_output=True,
                       text=True, timeout=120, cwd=root)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: python -m bench.numerics")
    assert "| dtype |" not in r.stdout  # help only: the matrix did not run


def test_import_does_not_read_package_metadata():
    """__version__ comes from the generated batchnorm/_version.py, not importlib.metadata
    (which cost tens of milliseconds per import)."""
    r = run(["-c", "import sys, batchnorm; print('importlib.metadata' in sys.modules)"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
