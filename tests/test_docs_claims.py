"""The figures README.md and docs/ quote are the committed bench results', and the bench
does not overwrite those results on a smoke run."""

from __future__ import annotations

import json
import math
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the bench package lives at the repository root

from bench import report  # noqa: E402
from bench import machine  # noqa: E402
from bench.__main__ import LOCAL_DIR, RESULTS_DIR, parse_args  # noqa: E402

# The results README.md quotes: the Intel Xeon (family 6, model 167) run.
RESULTS = json.loads((ROOT / "bench" / "results" / "intel-xeon-processor-family6-model167" / "latest.json").read_text())


def cells(op, threads=1):
    return [c for c in RESULTS["cells"] if c["op"] == op and c["threads"] == threads]


def ratio(cell, name):
    r = cell["results"][name]
    return r["ratio"]["median"] if r["status"] == "ok" else None


def geomean(values):
    return math.exp(sum(map(math.log, values)) / len(values))


def test_geomean_rows_cover_the_same_cells_for_every_implementation():
    def cell(**ratios):
        return {"results": {n: ({"status": "ok", "ratio": {"median": r}} if r else {"status": "n/a"})
                            for n, r in ratios.items()}}

    rows = report.geomean_rows([cell(a=1.0, b=4.0), cell(a=4.0, b=None), cell(a=2.0, b=2.0)], ["a", "b"])
    assert rows == ["| geomean, all 3 cells | | | 2.00 |  | | |",
                    "| geomean, the 2 cells all ran | | | 1.41 | 2.83 | | |"]


def readme_row(label):
    for line in (ROOT / "README.md").read_text("utf8").splitlines():
        if line.startswith(f"| {label}"):
            return [[None if v == "n/a" else float(v) for v in part.split(" / ")] if part.strip() else []
                    for part in (p.strip() for p in line.strip("|").split("|")[1:])]
    raise AssertionError(f"README has no row {label!r}")


def test_readme_geometric_means_are_each_over_one_set_of_cells():
    ops = ["eval", "train", "backward"]
    names = [["batchnorm", "torch", "onnxruntime"], ["batchnorm", "torch"], ["batchnorm", "torch"]]
    everything = readme_row("geometric mean, all 14 cells")
    for op, row_names, figures in zip(ops, names, everything):
        assert len(cells(op)) == 14
        for name, figure in zip(row_names, figures):
            values = [ratio(c, name) for c in cells(op)]
            expected = None if None in values else geomean(values)
            assert figure == (None if expected is None else pytest.approx(expected, abs=0.005)), (op, name)
    common = [c for c in cells("eval") if None not in (ratio(c, n) for n in names[0])]
    figures = readme_row(f"geometric mean, the {len(common)} channels-first cells ONNX Runtime runs")[0]
    assert all(c["layout"] in ("NCHW", "NC") for c in common)
    assert figures == [pytest.approx(geomean([ratio(c, n) for c in common]), abs=0.005) for n in names[0]]


def test_readme_zen4_geometric_means_are_its_committed_results():
    zen4 = json.loads((ROOT / "bench" / "results" / "amd-epyc-family25-model17" / "latest.json").read_text())
    readme = " ".join((ROOT / "README.md").read_text("utf8").split())
    means = {}
    for op in ("eval", "train", "backward"):
        ops = [c for c in zen4["cells"] if c["op"] == op and c["threads"] == 1]
        assert len(ops) == 14
        means[op] = [geomean([c["results"][n]["ratio"]["median"] for c in ops]) for n in ("batchnorm", "torch")]
    (e, t, b) = (means[op] for op in ("eval", "train", "backward"))
    assert (f"eval {e[0]:.2f} / {e[1]:.2f}, training {t[0]:.2f} / {t[1]:.2f} and backward "
            f"{b[0]:.2f} / {b[1]:.2f} (batchnorm / torch;") in readme


def test_dtypes_half_to_float32_table_is_the_committed_results():
    """docs/dtypes.md: per machine, the geometric mean of half time / float32 time (median
    times of the two calls in each 1-thread cell), over all cells and over those past 4 MiB."""
    doc = (ROOT / "docs" / "dtypes.md").read_text("utf8")
    rows = re.findall(r"^\|[^|]*\(`([a-z0-9-]+)`\) \| ([0-9.]+) / ([0-9.]+) \| ([0-9.]+) / ([0-9.]+) \|$", doc, re.M)
    assert len(rows) >= 3
    for folder, *figures in rows:
        expected = []
        for dtype in ("bfloat16", "float16"):
            run = json.loads((ROOT / "bench" / "results" / folder / f"latest-{dtype}.json").read_text())
            every, large = [], []
            for c in run["cells"]:
                r = c["results"]
                if c["threads"] == 1 and r["batchnorm"]["status"] == r["batchnorm f32"]["status"] == "ok":
                    every.append(r["batchnorm"]["median_us"] / r["batchnorm f32"]["median_us"])
                    if c["bytes"] > 4 << 20:
                        large.append(every[-1])
            expected += [geomean(every), geomean(large)]
        assert [float(f) for f in figures] == [pytest.approx(e, abs=0.005) for e in expected], folder


def test_busy_neighbour_figures_are_the_committed_busy_runs():
    """docs/threads.md, per AMD machine: the median over the 56 cells of the 2-thread call's
    median time over the 1-thread call's, with a spinning neighbour, and the range over the 42
    cells without ONNX Runtime in the process (every op but the fused one)."""
    doc = " ".join((ROOT / "docs" / "threads.md").read_text("utf8").split())
    claims = re.findall(r"\(\.\./bench/results/([a-z0-9-]+)/busy\.md\), a median of ([0-9.]+)x over the 56 cells "
                        r"\(the 42 that run beside torch and NumPy only: ([0-9.]+)-([0-9.]+)x", doc)
    assert len(claims) >= 2
    for folder, *figures in claims:
        run = json.loads((ROOT / "bench" / "results" / folder / "busy.json").read_text())
        times = {}
        for c in run["cells"]:
            if c["results"]["batchnorm"]["status"] == "ok":
                times[(c["op"], tuple(c["shape"]), c["layout"], c["threads"])] = c["results"]["batchnorm"]["median_us"]
        ratios = {key[:3]: times[key[:3] + (2,)] / t for key, t in times.items() if key[3] == 1}
        without_ort = [r for key, r in ratios.items() if key[0] != "fused"]
        assert len(ratios) == 56 and len(without_ort) == 42, folder
        expected = [sorted(ratios.values())[27:29], min(without_ort), max(without_ort)]
        assert float(figures[0]) == pytest.approx(sum(expected[0]) / 2, abs=0.005), folder
        assert [float(f) for f in figures[1:]] == [pytest.approx(e, abs=0.005) for e in expected[1:]], folder


def latency_us(impl, call):
    (row,) = [r for r in RESULTS["latency"]["calls"] if r["impl"] == impl and r["call"] == call]
    return row["median_us"]


def test_tiny_call_figures_are_the_committed_latency_table():
    readme = " ".join((ROOT / "README.md").read_text("utf8").split())
    python_md = " ".join((ROOT / "docs" / "python.md").read_text("utf8").split())
    ours = [latency_us("batchnorm", "eval functional"), latency_us("batchnorm", "eval module")]
    torch = [latency_us("torch", "eval functional"), latency_us("torch", "eval module")]
    assert (f"costs {ours[0]:.1f} µs through `bn.batch_norm` and {ours[1]:.1f} µs through a module"
            f" in eval mode (torch: {torch[0]:.1f} and {torch[1]:.1f} µs") in readme
    assert f"({ours[0]:.1f} µs for an eval call on (1, 64, 7, 7), {ours[1]:.1f} µs through a module" in python_md


def test_quick_and_partial_runs_do_not_replace_the_committed_results():
    assert parse_args([]).out_dir == RESULTS_DIR / machine.cpu_dir()
    assert parse_args(["--quick"]).out_dir == LOCAL_DIR
    assert parse_args(["--quick", "--save"]).out_dir == RESULTS_DIR / machine.cpu_dir()
    assert parse_args(["--quick", "--out-dir", "x"]).out_dir == pathlib.Path("x")
    # so do runs of a subset (they once overwrote bench/results/<cpu>/latest.*)
    for partial in (["--shapes", "1,64,7,7"], ["--ops", "eval"], ["--impls", "batchnorm"], ["--threads", "1"],
                    ["--rounds", "5"], ["--sample-ms", "2"]):
        assert parse_args(partial).out_dir == LOCAL_DIR, partial
        assert parse_args([*partial, "--save"]).out_dir == RESULTS_DIR / machine.cpu_dir(), partial
    for whole in (["--family", "norms"], ["--dtype", "bfloat16"], ["--busy-neighbour", "--threads", "1", "2"],
                  ["--retry-disturbed", "2"]):
        assert parse_args(whole).out_dir == RESULTS_DIR / machine.cpu_dir(), whole
    # another dtype's run goes beside the float32 results, not over them
    assert parse_args([]).name == "latest"
    assert parse_args(["--dtype", "float64"]).name == "latest-float64"
    assert parse_args(["--dtype", "bfloat16", "--busy-neighbour"]).name == "busy-bfloat16"
    assert parse_args(["--family", "norms", "--dtype", "float64"]).name == "norms-float64"
    assert parse_args(["--dtype", "float64", "--name", "x"]).name == "x"
    if shutil.which("git") and (ROOT / ".git").exists():
        ignored = subprocess.run(["git", "check-ignore", "-q", str(LOCAL_DIR / "latest.json")], cwd=ROOT)
        assert ignored.returncode == 0, "bench/results/local/ must be ignored by git"


def test_results_folders_are_named_for_their_cpu():
    assert machine.cpu_dir("Intel(R) Xeon(R) Processor") == "intel-xeon-processor"
    assert machine.cpu_dir("AMD EPYC 9R45 96-Core Processor") == "amd-epyc-9r45-96-core-processor"
    # a VM's one name for two generations: the family and model numbers keep them apart
    assert machine.cpu_dir("AMD EPYC", "25", "1") == "amd-epyc-family25-model1"
    assert machine.cpu_dir("AMD EPYC", "26", "2") == "amd-epyc-family26-model2"
    # Every committed results folder; not results/local/, a smoke run's (ignored by git).
    folders = [d for d in (ROOT / "bench" / "results").iterdir()
               if (d / "latest.json").is_file() and d != LOCAL_DIR]
    assert len(folders) >= 2
    for folder in folders:
        m = json.loads((folder / "latest.json").read_text())["machine"]
        assert machine.cpu_dir(m["cpu"], m.get("cpu_family"), m.get("cpu_model")) == folder.name


def test_docs_cite_no_missing_design_doc():
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]:
        for target in re.findall(r"\b[\w./-]*DESIGN\.md", path.read_text("utf8")):
            assert (path.parent / target).exists(), f"{path.name} cites {target}, which is not in the repository"


def test_python_md_error_examples_are_the_messages_raised():
    """The example messages of docs/python.md's error table are what the calls raise."""
    import numpy as np

    import batchnorm as bn
    table = (ROOT / "docs" / "python.md").read_text("utf8")
    x, rm, rv = np.ones((2, 3), np.float32), np.zeros(3, np.float32), np.ones(3, np.float32)
    calls = [
        (TypeError, lambda: bn.batch_norm(x, rm, rv, np.ones(3))),
        (ValueError, lambda: bn.BatchNorm2d(3)(np.ones((2, 4, 4, 4), np.float32))),
        (ValueError, lambda: bn.BatchNorm2d(3)(np.ones((1, 3, 1, 1), np.float32))),
        (RuntimeError, lambda: bn.BatchNorm2d(3).backward(np.ones((2, 3, 4, 4), np.float32))),
    ]
    for error, call in calls:
        with pytest.raises(error) as raised:
            call()
        assert f"`{raised.value}`" in table, str(raised.value)
