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


def test_main_into_a_closed_pipe_ends_quietly():
    """python -m batchnorm | head -1: the reader closes the pipe before the output is written;
    the exit status says so, and no BrokenPipeError traceback follows."""
    p = subprocess.Popen([sys.executable, "-m", "batchnorm"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    stderr = p.stderr.read().decode()
    assert p.wait(timeout=120) == 1
    assert "BrokenPipeError" not in stderr and "Traceback" not in stderr, stderr


def test_main_help_reads_as_text():
    r = run(["-m", "batchnorm", "--help"])
    assert r.returncode == 0, r.stderr
    assert "python -m batchnorm: version, backend and a short demo" in r.stdout, r.stdout
    assert "``" not in r.stdout, r.stdout


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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench(module, *args):
    """``python -m <module> args`` from the repository root, where the bench package lives."""
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_bench_numerics_help():
    r = bench("bench.numerics", "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: python -m bench.numerics")
    assert "| dtype |" not in r.stdout  # help only: the matrix did not run


def test_import_does_not_read_package_metadata():
    """__version__ comes from the generated batchnorm/_version.py, not importlib.metadata
    (which cost tens of milliseconds per import)."""
    r = run(["-c", "import sys, batchnorm; print('importlib.metadata' in sys.modules)"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


# Values no run can use: argparse's usage error (exit code 2, naming the option) before anything
# is measured, not a traceback nor a run whose cells all fail. (module, option, value)
BAD_BENCH_ARGUMENTS = [
    ("bench", "--threads", "0"),
    ("bench", "--threads", "-1"),
    ("bench", "--rounds", "0"),
    ("bench", "--rounds", "-1"),
    ("bench", "--sample-ms", "0"),
    ("bench", "--sample-ms", "-1"),
    ("bench", "--sample-ms", "nan"),
    ("bench", "--shapes", "0,2"),
    ("bench", "--shapes", "2,-3,4"),
    ("bench", "--shapes", "a,b"),
    ("bench", "--retry-disturbed", "-1"),
    ("bench", "--wait-quiet", "-1"),
    ("bench", "--from-json", os.path.join(ROOT, "no", "such", "results.json")),
    ("bench.torch_overhead", "--threads", "0"),
    ("bench.torch_overhead", "--rounds", "0"),
    ("bench.torch_overhead", "--sample-s", "0"),
    ("bench.model", "--threads", "-1"),
    ("bench.model", "--rounds", "-1"),
    ("bench.model", "--sample-s", "-0.5"),
    ("bench.model", "--batch", "0"),
    ("bench.model", "--size", "0"),
    ("bench.sync", "--worlds", "0"),
    ("bench.sync", "--steps", "0"),
    ("bench.sync", "--rounds", "0"),
]


@pytest.mark.parametrize("module, option, value", BAD_BENCH_ARGUMENTS)
def test_bench_refuses_impossible_arguments(module, option, value, tmp_path):
    # python -m bench: a tiny run around the bad value (later values of an option win), so
    # that a regression costs seconds and writes only into tmp_path
    small = ["--quick", "--ops", "eval", "--impls", "numpy", "--shapes", "1,2", "--no-latency",
             "--out-dir", str(tmp_path / "out")] if module == "bench" else []
    r = bench(module, *small, option, value)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert f"error: argument {option}: " in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stdout == "" and not (tmp_path / "out").exists()  # measured and wrote nothing



@pytest.mark.parametrize("content", ["{", "not json at all", "[1, 2]", '{"cells": []}', "\udcff"])
def test_bench_from_json_refuses_what_is_no_results_file(content, tmp_path):
    """--from-json reads the file while parsing: text that is not JSON, JSON of another shape
    (a list, an object without the report's keys) is argparse's usage error naming the file,
    not a traceback from the report."""
    path = tmp_path / "results.json"
    path.write_bytes(content.encode("utf-8", "surrogateescape"))
    r = bench("bench", "--from-json", str(path), "--out-dir", str(tmp_path / "out"))
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "error: argument --from-json: not a results file" in r.stderr, r.stderr
    assert str(path) in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()

def test_bench_norms_take_half_dtypes():
    """--family norms runs float16 and bfloat16 (once refused): the arguments parse, and every
    implementation gives the reference's output on a small case of each norm or says why not."""
    code = """if True:
        from bench import impls, runner
        from bench.__main__ import parse_args
        from bench.cases import NormCase, make_norm_arrays
        from bench.ops import NORM_OPS
        assert parse_args(["--family", "norms", "--dtype", "bfloat16"]).name == "norms-bfloat16"
        loaded = [i for i in impls.load() if i.unavailable is None]
        try:
            import ml_dtypes  # bfloat16 arrays in NumPy: an optional dependency
            dtypes = ("float16", "bfloat16")
        except ImportError:
            dtypes = ("float16",)
        for dtype in dtypes:
            for case in (NormCase("layer", (4, 8, 64), dtype), NormCase("rms", (2, 256), dtype),
                         NormCase("group", (2, 32, 8, 8), dtype, 4), NormCase("instance", (2, 16, 8, 8), dtype)):
                arrays = make_norm_arrays(case)
                for op in NORM_OPS.values():
                    reference = op.reference(case, arrays)
                    _, status = runner._prepare_all(loaded, op, case, arrays, reference, 1)
                    for name, s in status.items():
                        assert s["status"] in ("ok", "n/a"), (dtype, case.layout, op.name, name, s)
                    assert status["batchnorm"]["status"] == "ok", status
                    print(dtype, case.layout, op.name, sorted(n for n, s in status.items() if s["status"] == "ok"))
    """
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
