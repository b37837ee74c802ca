"""Argument types shared by the bench entry points (``python -m bench``, ``bench.torch_overhead``,
``bench.model``, ``bench.sync``).

Each is an argparse ``type=``: a value it refuses is argparse's usage error (exit code 2,
``error: argument --threads: must be a positive integer, got '0'``) before anything is
measured, instead of a traceback or a run of cells that all fail.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib

from .cases import parse_shape


def _number(kind, text: str, minimum, inclusive: bool, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if not (math.isfinite(value) and (value > minimum or (inclusive and value == minimum))):  # NaN, inf too
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """1, 2, ...: thread counts, rounds, steps, sizes."""
    return _number(int, text, 1, True, "a positive integer")


def non_negative_int(text: str) -> int:
    """0, 1, ...: counts where 0 means none (retries)."""
    return _number(int, text, 0, True, "a non-negative integer")


def positive_float(text: str) -> float:
    """Durations that must be above 0 (the length of one sample)."""
    return _number(float, text, 0.0, False, "a positive number")


def non_negative_float(text: str) -> float:
    """Durations where 0 means none (the wait for idle CPUs)."""
    return _number(float, text, 0.0, True, "a non-negative number")


def shape(text: str) -> tuple[int, ...]:
    """'32,64,56,56' or '32x64x56x56': at least (N, C), every dimension 1 or more (the
    bench has no empty arrays: a copy floor of 0 bytes has no ratio)."""
    try:
        dims = parse_shape(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be N,C,... with at least two integer dimensions, got {text!r}") from None
    if any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"every dimension must be 1 or more, got {text!r}")
    return dims


# what a results file (``python -m bench``'s JSON) holds at its top level, read by the report
RESULTS_KEYS = ("machine", "config", "conditions", "implementations", "ops", "cells", "notes")


def results_file(text: str) -> dict:
    """A results file of ``python -m bench`` (``--from-json``), read: a JSON object with the
    keys the report reads; a missing file, other JSON or not JSON at all is a usage error."""
    path = pathlib.Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{'not a file' if path.exists() else 'no such file'}: {text!r}")
    try:
        results = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise argparse.ArgumentTypeError(f"not a results file (invalid JSON: {e}): {text!r}") from None
    missing = [k for k in RESULTS_KEYS if k not in results] if isinstance(results, dict) else list(RESULTS_KEYS)
    if missing:
        raise argparse.ArgumentTypeError(f"not a results file of python -m bench (no {', '.join(missing)}): {text!r}")
    return results


def add_threads(parser: argparse.ArgumentParser, default=(1, 2), help: str | None = None) -> None:
    """``--threads N [N ...]``: the thread counts to measure at, each 1 or more."""
    parser.add_argument("--threads", type=positive_int, nargs="+", default=list(default),
                        metavar="N", help=help or f"thread counts (default: {' '.join(map(str, default))})")
