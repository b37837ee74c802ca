"""Robust timing: calibrated samples, implementations interleaved round by round.

One cell times several callables (the copy floor and each implementation). Each round
takes one sample of every callable, in an order rotated from round to round, so slow
drifts of the machine (frequency, a neighbour VM, page cache) hit all of them alike and
no callable always runs right after the same other one. A sample repeats its callable
enough times to last `target_s`, which puts timer resolution and Python call overhead
out of the picture. Ratios are taken per round (paired), then summarized by median and
interquartile range: a pair measured milliseconds apart shares its noise.
"""
from __future__ import annotations

import dataclasses
import gc
import math
import time
from typing import Callable, Sequence

import numpy as np

_MAX_REPS = 1_000_000


@dataclasses.dataclass(frozen=True)
class Spread:
    median: float
    q1: float
    q3: float

    @classmethod
    def of(cls, values: Sequence[float]) -> "Spread":
        q1, median, q3 = np.percentile(np.asarray(values, dtype=float), [25, 50, 75])
        return cls(float(median), float(q1), float(q3))

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    def microseconds(self) -> dict:
        """The JSON form of a spread of per-call seconds."""
        return {"median_us": self.median * 1e6, "q1_us": self.q1 * 1e6, "q3_us": self.q3 * 1e6}


def _sample(run: Callable[[], object], reps: int) -> float:
    """Seconds per call, averaged over `reps` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(reps):
        run()
    return (time.perf_counter() - start) / reps


def calibrate(run: Callable[[], object], target_s: float) -> int:
    """Repetitions that make one sample last about `target_s` (at least one call)."""
    run()  # first call pays for lazy initialization and first-touch page faults
    per_call = _sample(run, 1)
    reps = 1
    # Two refinements: a single-call estimate of a microsecond op is mostly timer noise.
    for _ in range(2):
        if per_call * reps >= target_s:
            break
        reps = min(_MAX_REPS, max(1, math.ceil(target_s / max(per_call, 1e-9))))
        per_call = _sample(run, reps)
    return reps


def interleaved(
    runs: dict[str, Callable[[], object]],
    rounds: int,
    target_s: float,
    settle_s: float = 0.0,
) -> dict[str, list[float]]:
    """Per-call seconds of every callable, one sample per round, rotated order.

    `settle_s` sleeps before each sample so that thread pools of the previous library
    (OpenMP, ONNX Runtime) stop spinning on the cores before the next one is timed.
    """
    names = list(runs)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside one sample would be charged to one library
    try:
        reps = {name: calibrate(runs[name], target_s) for name in names}
        samples: dict[str, list[float]] = {name: [] for name in names}
        for round_index in range(rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                if settle_s:
                    time.sleep(settle_s)
                samples[name].append(_sample(runs[name], reps[name]))
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def paired_ratio(samples: Sequence[float], floor: Sequence[float]) -> Spread:
    """Median and IQR of the per-round ratios sample / floor."""
    return Spread.of([s / f for s, f in zip(samples, floor)])
