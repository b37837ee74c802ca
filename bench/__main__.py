"""python -m bench [--family norms] [--quick] [--dtype float64] [--threads 1 2] [--ops eval train] ...

Writes <out-dir>/<name>.json, .md and .png: bench/results/<cpu>/latest.* for a full run (one
folder per CPU model, e.g. bench/results/amd-epyc-family25-model1/); a partial run (--quick,
or a subset of the shapes, ops, implementations or thread counts, or other rounds or sample
lengths) goes to bench/results/local/ (ignored by git) unless --save, so it never replaces the
committed results.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import sys
import time

from . import chart, impls, latency, machine, report, runner
from .arguments import (add_threads, non_negative_float, non_negative_int, positive_float,
                        positive_int, results_file, shape)
from .cases import DEFAULT_SHAPES, iter_cases, iter_norm_cases, make_arrays, make_norm_arrays
from .ops import NORM_OPS, OPS

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
LOCAL_DIR = RESULTS_DIR / "local"


def results_dir() -> pathlib.Path:
    """Where a full run's results go: one folder per CPU model (bench/results/<cpu>/), so
    the committed results of every CPU the bench has seen stay side by side."""
    return RESULTS_DIR / machine.cpu_dir()
# (rounds, sample length): the default keeps a full run well under 10 minutes on 2 cores.
FULL = (15, 0.008)
QUICK = (3, 0.001)
# Pause before each sample: long enough for the previous library's spinning pool threads
# (libgomp, ONNX Runtime) to go to sleep; shorter pauses let them slow the next library.
SETTLE_S = 0.005


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="3 rounds of ~1 ms samples")
    p.add_argument("--dtype", choices=("float32", "float64", "float16", "bfloat16"), default="float32",
                   help="float16/bfloat16 (either family): data in the half type, per-channel arrays "
                        "float32; the 'batchnorm f32' column is the float32 call on the same shape")
    add_threads(p)
    p.add_argument("--family", choices=("batch", "norms"), default="batch",
                   help="batch norm (default) or LayerNorm/RMSNorm/GroupNorm/InstanceNorm "
                        "on the issue's fixed shapes (--shapes and the latency do not apply)")
    p.add_argument("--ops", nargs="+", choices=[*OPS, *NORM_OPS],
                   help="default: every op of the family")
    p.add_argument("--impls", nargs="+", choices=impls.NAMES, default=list(impls.NAMES))
    p.add_argument("--shapes", nargs="+", type=shape, default=list(DEFAULT_SHAPES),
                   metavar="N,C,...", help="logical shapes, channels second, every dimension 1 or more")
    p.add_argument("--rounds", type=positive_int, help="override the rounds per cell (1 or more)")
    p.add_argument("--sample-ms", type=positive_float, help="override the duration of one sample (above 0)")
    p.add_argument("--passive-wait", action="store_true",
                   help="OMP_WAIT_POLICY=passive and no ONNX Runtime spinning: idle pool "
                        "threads sleep instead of spinning (see README)")
    p.add_argument("--busy-neighbour", action="store_true",
                   help="measure with a process spinning on one CPU (results named busy, or "
                        "norms-busy)")
    p.add_argument("--no-latency", action="store_true", help="skip the tiny-input latency")
    p.add_argument("--wait-quiet", type=non_negative_float, default=0, metavar="SECONDS",
                   help="first wait up to SECONDS for idle CPUs (others below "
                        f"{machine.QUIET_BUSY * 100:.0f}%%)")
    p.add_argument("--retry-disturbed", type=non_negative_int, default=0, metavar="N",
                   help="re-measure a cell up to N times while other processes take over "
                        f"{machine.QUIET_BUSY * 100:.0f}%% of the CPUs (each retry first waits "
                        "--wait-quiet seconds at most); the quietest attempt is kept")
    p.add_argument("--readme", action="store_true",
                   help="also copy the tables into the results section of bench/README.md")
    p.add_argument("--from-json", type=results_file, metavar="PATH",
                   help="measure nothing: rewrite the report (and --readme) from a results file")
    p.add_argument("--save", action="store_true",
                   help="write a partial run (--quick, --shapes, --ops, --impls, --threads, --rounds, "
                        "--sample-ms) to bench/results/ as a full run does (without it: "
                        "bench/results/local/, ignored by git)")
    p.add_argument("--out-dir", type=pathlib.Path,
                   help="where the files go (default: see --save)")
    p.add_argument("--name", help="base name of the output files (default: latest, norms with "
                                   "--family norms, busy with --busy-neighbour; -<dtype> appended "
                                   "for any dtype but float32, e.g. latest-float64)")
    args = p.parse_args(argv)
    if args.out_dir is None:
        args.out_dir = LOCAL_DIR if _partial(args, p) and not args.save else results_dir()
    family_ops = NORM_OPS if args.family == "norms" else OPS
    args.ops = args.ops or list(family_ops)
    if not set(args.ops) <= set(family_ops):
        p.error(f"--ops of --family {args.family}: {', '.join(family_ops)}")
    if args.name is None:  # one file set per kind of run: a float64 run keeps the float32 results
        base = "norms" if args.family == "norms" else "latest"
        if args.busy_neighbour:
            base = "norms-busy" if args.family == "norms" else "busy"
        args.name = base if args.dtype == "float32" else f"{base}-{args.dtype}"
    return args


def _partial(args: argparse.Namespace, parser: argparse.ArgumentParser) -> bool:
    """Whether the run measures less, or otherwise, than a full run: its files must not
    replace the committed results of one."""
    subsets = ("threads", "impls", "shapes")
    return (args.quick or args.ops is not None or args.rounds is not None or args.sample_ms is not None
            or any(getattr(args, name) != parser.get_default(name) for name in subsets))


def collect(args: argparse.Namespace) -> dict:
    """Run everything the arguments ask for; the results as written to JSON."""
    rounds, target_s = QUICK if args.quick else FULL
    rounds = rounds if args.rounds is None else args.rounds
    target_s = target_s if args.sample_ms is None else args.sample_ms / 1e3
    if args.passive_wait:  # must precede the first import of an OpenMP runtime
        os.environ["OMP_WAIT_POLICY"] = "passive"

    loaded = impls.load(args.impls)
    for impl in loaded:
        if impl.unavailable:
            print(f"skipping {impl.name}: {impl.unavailable}", file=sys.stderr)
    before = machine.wait_until_quiet(args.wait_quiet)
    info = machine.describe()
    if machine.disturbed(before):
        print(f"warning: the machine is busy ({before}); the ratios will be noisy",
              file=sys.stderr)
    settings = runner.Settings(rounds, target_s, SETTLE_S, machine.l2_bytes(),
                               args.retry_disturbed, args.wait_quiet)
    norms = args.family == "norms"
    family_ops = NORM_OPS if norms else OPS
    neighbour = machine.BusyNeighbour() if args.busy_neighbour else contextlib.nullcontext()
    with neighbour:
        if norms:
            cells = runner.run_suite(loaded, list(iter_norm_cases(args.dtype)), args.ops,
                                     args.threads, settings, NORM_OPS, make_norm_arrays)
        else:
            cells = runner.run_suite(loaded, list(iter_cases(args.shapes, args.dtype)), args.ops,
                                     args.threads, settings, OPS, make_arrays)
        tiny = (None if args.no_latency or norms
                else latency.measure(loaded, args.dtype, rounds, target_s))
    return {
        "machine": info,
        "config": {"family": args.family, "dtype": args.dtype, "threads": args.threads, "ops": args.ops,
                   "rounds": rounds, "target_ms": target_s * 1e3,
                   "settle_ms": SETTLE_S * 1e3, "quick": args.quick,
                   "wait_policy": os.environ.get("OMP_WAIT_POLICY", "library defaults"),
                   "l2_bytes_for_targets": settings.l2_bytes,
                   "retry_disturbed": args.retry_disturbed, "wait_quiet_s": args.wait_quiet,
                   "busy_neighbour_cpu": getattr(neighbour, "cpu", None)},
        "implementations": {i.name: {"version": i.version, "unavailable": i.unavailable}
                            for i in loaded},
        "ops": {name: {"title": op.title, "floor": op.floor_text, "target": op.target_text}
                for name, op in family_ops.items() if name in args.ops},
        "conditions": {"before": before, "after": machine.conditions()},
        "notes": [],
        "cells": cells,
        "latency": tiny,
    }


def write(results: dict, args: argparse.Namespace) -> pathlib.Path:
    """<name>.png, .json, .md; and the README's results section with --readme."""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    base = args.out_dir / args.name
    png = base.with_suffix(".png")
    chart_problem = chart.write_png(results, png)
    if chart_problem:
        results["notes"].append(f"- {chart_problem}")
    report.write_json(results, base.with_suffix(".json"))
    base.with_suffix(".md").write_text(report.markdown(results, None if chart_problem
                                                       else png.name))
    if args.readme:
        readme = pathlib.Path(__file__).resolve().parent / "README.md"
        report.update_readme(readme, results, None if chart_problem
                             else os.path.relpath(png, readme.parent))
    return base


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.from_json:
        results = args.from_json
        results["notes"] = [n for n in results["notes"] if "chart skipped" not in n]
    else:
        results = collect(args)
        results["elapsed_s"] = round(time.perf_counter() - started, 1)
    base = write(results, args)
    print(f"wrote {base}.json/.md/.png in {time.perf_counter() - started:.1f} s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
