"""The loop over cases x operations x thread counts; one cell = one interleaved timing.

A cell holds the copy floor and every implementation on the same arrays. Before timing,
each implementation's output is checked against a float64 NumPy reference, so a fast but
wrong kernel is flagged in the report instead of being celebrated.
"""
from __future__ import annotations

import dataclasses
import sys

import numpy as np

from . import machine, timing
from .cases import Arrays, Case, make_arrays
from .impls import Impl, NotApplicable, Prepared
from .ops import OPS, Op

FLOOR = "copy floor"


@dataclasses.dataclass(frozen=True)
class Settings:
    rounds: int
    target_s: float  # duration of one sample
    settle_s: float  # pause before each sample (thread pools stop spinning)
    l2_bytes: int
    retries: int = 0  # re-measurements of a cell that other processes disturbed
    wait_quiet_s: float = 0.0  # how long each re-measurement waits for idle CPUs

    def __post_init__(self) -> None:
        # the command lines refuse these (bench.arguments); a caller in Python gets the same word
        if self.rounds < 1 or not self.target_s > 0 or self.retries < 0 or self.wait_quiet_s < 0:
            raise ValueError(f"rounds >= 1, target_s > 0, retries >= 0 and wait_quiet_s >= 0, got {self}")


def _tolerance(dtype: str) -> float:
    # a few roundings of the output type (half types: float32 math, one rounding on store)
    return {"float32": 2e-3, "float16": 4e-3, "bfloat16": 3e-2}.get(dtype, 1e-9)


def _check(prepared: Prepared, case: Case, reference: np.ndarray) -> str | None:
    """Run once; None if the output matches the reference, else what is wrong."""
    output = np.asarray(prepared.output(prepared.run()), dtype=np.float64)
    if output.shape != reference.shape:
        return f"wrong output shape {output.shape}, expected {reference.shape}"
    error = np.abs(output - reference) / (1.0 + np.abs(reference))
    worst = float(np.nanmax(error)) if error.size else 0.0
    if not np.isfinite(worst) or worst > _tolerance(case.dtype):
        return f"output differs from reference (max rel. error {worst:.2e})"
    return None


def _prepare_all(impls, op: Op, case: Case, arrays: Arrays, reference, threads: int):
    """Prepared runs of the applicable implementations, and a status for every one."""
    runs, status = {}, {}
    for impl in impls:
        try:
            impl.set_threads(threads)
            prepared = impl.prepare_case(op.name, case, arrays)
            problem = _check(prepared, case, reference)
        except NotApplicable as reason:
            status[impl.name] = {"status": "n/a", "note": str(reason)}
            continue
        except Exception as error:  # a broken adapter or library costs one cell, not the run
            status[impl.name] = {"status": "error", "note": f"{type(error).__name__}: {error}"}
            continue
        runs[impl.name] = prepared.run
        status[impl.name] = {"status": "ok"} if problem is None else {"status": "wrong",
                                                                       "note": problem}
    return runs, status


def run_cell(impls: list[Impl], op: Op, case: Case, arrays: Arrays, reference, threads: int,
             settings: Settings) -> dict:
    others = machine.OthersMeter()
    runs, results = _prepare_all(impls, op, case, arrays, reference, threads)
    samples = timing.interleaved({FLOOR: op.make_floor(arrays), **runs}, settings.rounds,
                                 settings.target_s, settings.settle_s)
    floor = samples.pop(FLOOR)
    for name, values in samples.items():
        results[name].update(timing.Spread.of(values).microseconds())
        ratio = timing.paired_ratio(values, floor)
        results[name]["ratio"] = dataclasses.asdict(ratio)
    return {
        "op": op.name,
        "threads": threads,
        "shape": list(case.shape),
        "layout": case.layout,
        "dtype": case.dtype,
        "label": case.label,
        "bytes": case.nbytes,
        "target": op.target(case, settings.l2_bytes),
        "floor": timing.Spread.of(floor).microseconds(),
        "results": results,
        "others_cpu": others.share(),  # CPU share other processes took during the cell
    }


def _progress(cell: dict) -> None:
    ratios = "  ".join(
        f"{name} {r['ratio']['median']:.2f}" if "ratio" in r else f"{name} {r['status']}"
        for name, r in cell["results"].items()
    )
    busy = cell["others_cpu"]
    noise = f"  [others used {busy:.0%} CPU]" if busy and busy > machine.QUIET_BUSY else ""
    print(f"{cell['op']:8} t={cell['threads']} {cell['label']:>14} {cell['layout']:4} "
          f"floor {cell['floor']['median_us']:9.1f} us | {ratios}{noise}", file=sys.stderr,
          flush=True)


def run_suite(impls: list[Impl], cases: list, op_names, thread_counts,
              settings: Settings, ops: dict[str, Op] = OPS, make=make_arrays) -> list[dict]:
    """Every (case, op, threads) cell; ``ops`` and ``make`` (the arrays of a case) are
    batch norm's by default, the other norms' with ``NORM_OPS`` and ``make_norm_arrays``."""
    usable = [impl for impl in impls if impl.unavailable is None]
    cells = []
    for case in cases:  # arrays are made once per case: the largest dominate set-up time
        arrays = make(case)
        for op_name in op_names:
            op = ops[op_name]
            arrays.fresh_running_stats()
            reference = op.reference(case, arrays)
            for threads in thread_counts:
                cells.append(_least_disturbed_cell(usable, op, case, arrays, reference,
                                                   threads, settings))
    return cells


def _least_disturbed_cell(impls, op, case, arrays, reference, threads, settings) -> dict:
    """run_cell, repeated while other processes took the CPUs; the quietest attempt wins.

    A 2-thread cell sharing its cores with a build measures the build, not the kernel
    (spin-waiting OpenMP teams lose whole scheduler slices), so waiting pays off.
    """
    best = None
    for attempt in range(settings.retries + 1):
        if attempt:
            machine.wait_until_quiet(settings.wait_quiet_s)
        cell = run_cell(impls, op, case, arrays, reference, threads, settings)
        cell["attempt"] = attempt + 1  # which attempt this is, kept or not
        _progress(cell)
        if best is None or (cell["others_cpu"] or 0) < (best["others_cpu"] or 0):
            best = cell
        if not machine.disturbed({"cpu_busy": best["others_cpu"]}):
            break
    best["attempts_made"] = attempt + 1
    return best
