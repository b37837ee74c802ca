"""Per-call latency of a tiny input, where call overhead, not memory, sets the time.

(1, 64, 7, 7) float is 12.5 KiB: the copy takes about a microsecond, so these figures
measure argument checking, dispatch and thread start-up. Reported in microseconds per
call at one thread, for the functional API and for a module's __call__ (torch modules
run under no_grad, so no autograd graph is recorded: the forward call alone).
"""
from __future__ import annotations

import sys
from typing import Callable

import numpy as np

from . import report, timing
from .cases import CHANNELS_FIRST, EPS, Arrays, Case, make_arrays
from .impls import Impl, NotApplicable

TINY_SHAPE = (1, 64, 7, 7)
_MODULE_NAMES = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}


def _state(a: Arrays) -> dict:
    return {"weight": a.weight, "bias": a.bias, "running_mean": a.running_mean,
            "running_var": a.running_var, "num_batches_tracked": np.array(0, dtype=np.int64)}


def _batchnorm_module(impl: Impl, case: Case, a: Arrays, training: bool) -> Callable:
    module_class = getattr(impl.bn, _MODULE_NAMES[len(case.shape)])
    module = module_class(case.channels, eps=EPS, dtype=np.dtype(case.dtype), axis=case.axis)
    module.load_state_dict(_state(a))
    module.train(training)
    return lambda: module(a.x, out=a.out)


def _torch_module(impl: Impl, case: Case, a: Arrays, training: bool) -> Callable:
    torch = impl.torch
    module_class = getattr(torch.nn, _MODULE_NAMES[len(case.shape)])
    module = module_class(case.channels, eps=EPS, dtype=getattr(torch, case.dtype))
    module.load_state_dict({k: torch.from_numpy(v) for k, v in _state(a).items()})
    module.train(training)
    x = case.to_torch(a.x)

    def call():
        with torch.no_grad():
            return module(x)

    return call


_MODULE_BUILDERS = {"batchnorm": _batchnorm_module, "torch": _torch_module}


def _calls(impls: list[Impl], case: Case, a: Arrays) -> tuple[dict, dict]:
    """Every (implementation, call kind) callable, and why the others are missing."""
    calls, missing = {}, {}
    for impl in impls:
        for op, training in (("eval", False), ("train", True)):
            key = (impl.name, f"{op} functional")
            try:
                calls[key] = impl.prepare(op, case, a).run
            except NotApplicable as reason:
                missing[key] = str(reason)
            except Exception as error:
                missing[key] = f"{type(error).__name__}: {error}"
            builder = _MODULE_BUILDERS.get(impl.name)
            if builder is None:
                continue
            key = (impl.name, f"{op} module")
            try:
                calls[key] = builder(impl, case, a, training)
            except Exception as error:
                missing[key] = f"{type(error).__name__}: {error}"
    return calls, missing


def measure(impls: list[Impl], dtype: str, rounds: int, target_s: float) -> dict:
    usable = [impl for impl in impls if impl.unavailable is None]
    for impl in usable:
        impl.set_threads(1)
    case = Case(TINY_SHAPE, CHANNELS_FIRST, dtype)
    a = make_arrays(case)
    calls, missing = _calls(usable, case, a)
    calls[(report.FLOOR, "np.copyto")] = lambda: np.copyto(a.out, a.x)
    rows = []
    for (impl, call), values in timing.interleaved(calls, rounds, target_s).items():
        rows.append({"impl": impl, "call": call, **timing.Spread.of(values).microseconds()})
        print(f"latency {impl:12} {call:17} {rows[-1]['median_us']:8.2f} us", file=sys.stderr)
    return {"shape": list(TINY_SHAPE), "dtype": dtype, "threads": 1, "calls": rows,
            "missing": [{"impl": impl, "call": call, "why": why}
                        for (impl, call), why in missing.items()]}
