"""One process running the whole batch (the oracles), and the per-rank comparisons.

Oracle 1: ``batchnorm.BatchNorm1d/2d`` on the concatenated batch, in the case's dtype and
layout. Oracle 2: ``torch.nn.BatchNorm1d/2d`` in float64 on the same values (skipped where
torch is absent). For the gradients of data far from zero (mean 1e6) oracle 1 is the float64
reference (tests/reference.py) instead: the one-process ``BatchNorm2d.backward`` in float32
centres x on the float32-rounded saved mean and is 0.05 off there (a defect of its own,
outside the synchronized path). Each rank's saved results (see sync_worker.py) must equal the slice of
the oracle that belongs to the rank, to float32 rounding (outputs 1e-5, running variance
relative 1e-6, reductions 1e-5 of their terms' magnitude; float64 1e-12).
"""

from __future__ import annotations

import functools
from typing import Any, Dict, List

import numpy as np

import reference
from helpers import assert_close, assert_close_sum, module_cls
from sync_worker import CASES, STEPS, Case

CASE_BY_NAME = {case.name: case for case in CASES}
VAR_RTOL = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-12}


@functools.lru_cache(maxsize=None)
def batchnorm_oracle(name: str, world: int) -> Dict[str, Any]:
    """Oracle 1 (batchnorm, one process, whole batch); also the magnitudes of the
    gradient sums' terms for the reduction tolerances."""
    case = CASE_BY_NAME[name]
    m = module_cls(1 + len(case.shape))(case.shape[0], momentum=case.momentum,
                                            dtype=case.dtype, axis=case.axis)
    w, b = case.params()
    m.weight[:], m.bias[:] = w, b
    out: Dict[str, Any] = {}
    for step in range(STEPS):
        batch = case.data(world, step)
        y = m(case.arranged(batch["x"]))
        gx = m.backward(case.arranged(batch["g"]))
        key = f"{step}"
        out[f"{key}/y"], out[f"{key}/gx"] = case.logical(y), case.logical(gx)
        out[f"{key}/gw"], out[f"{key}/gb"] = m.weight_grad, m.bias_grad
        out[f"{key}/rm"], out[f"{key}/rv"] = m.running_mean.copy(), m.running_var.copy()
        out[f"{key}/count"] = int(m.num_batches_tracked)
        # |terms| of the sums: grad_bias = sum(g), grad_weight = sum(g * xhat)
        axes = tuple(i for i in range(batch["x"].ndim) if i != 1)
        mean = batch["x"].mean(axis=axes, keepdims=True)
        xhat = (batch["x"] - mean) / batch["x"].std(axis=axes, keepdims=True)
        out[f"{key}/abs_gb"] = np.abs(batch["g"]).sum(axis=axes)
        out[f"{key}/abs_gw"] = np.abs(batch["g"] * xhat).sum(axis=axes)
        if case.offset:
            ref_mean, ref_var = reference.stats(batch["x"])
            grads = reference.backward_train(batch["g"], batch["x"], ref_mean, 1.0 / np.sqrt(ref_var + 1e-5), w)
            out[f"{key}/gx"], out[f"{key}/gw"], out[f"{key}/gb"] = grads
    m.eval()
    out["eval/y"] = case.logical(m(case.arranged(case.data(world, 0)["x"])))
    return out


@functools.lru_cache(maxsize=None)
def torch_oracle(name: str, world: int) -> Dict[str, Any]:
    """Oracle 2 (torch.nn.BatchNorm in float64, one process, whole batch)."""
    import torch

    case = CASE_BY_NAME[name]
    cls = torch.nn.BatchNorm1d if len(case.shape) < 3 else torch.nn.BatchNorm2d
    m = cls(case.shape[0], momentum=case.momentum, dtype=torch.float64)
    w, b = case.params()
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(w.astype(np.float64)))
        m.bias.copy_(torch.from_numpy(b.astype(np.float64)))
    out: Dict[str, Any] = {}
    for step in range(STEPS):
        batch = case.data(world, step)
        x = torch.from_numpy(batch["x"]).requires_grad_()
        m.weight.grad = m.bias.grad = None
        y = m(x)
        (y * torch.from_numpy(batch["g"])).sum().backward()
        key = f"{step}"
        out[f"{key}/y"], out[f"{key}/gx"] = y.detach().numpy(), x.grad.numpy()
        out[f"{key}/gw"], out[f"{key}/gb"] = m.weight.grad.numpy(), m.bias.grad.numpy()
        out[f"{key}/rm"], out[f"{key}/rv"] = m.running_mean.numpy().copy(), m.running_var.numpy().copy()
        out[f"{key}/count"] = int(m.num_batches_tracked)
    m.eval()
    with torch.no_grad():
        out["eval/y"] = m(torch.from_numpy(case.data(world, 0)["x"])).numpy()
    return out


def oracles(name: str, world: int) -> List[Dict[str, Any]]:
    found = [batchnorm_oracle(name, world)]
    try:
        import torch  # noqa: F401
    except ImportError:  # absent, or hidden (the sanitizer run): batchnorm's oracle alone
        return found
    found.append(torch_oracle(name, world))
    return found


def _rel(actual: np.ndarray, expected: np.ndarray, rtol: float, what: str) -> None:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    err = np.abs(actual - expected) / np.maximum(np.abs(expected), 1e-30)
    assert (err <= rtol).all(), f"{what}: relative error {err.max():.3g} > {rtol:g}: {actual} vs {expected}"


def check_case(ranks: List[Dict[str, Any]], impl: str, case: Case, world: int) -> None:
    """Every rank's results for ``impl`` (a key prefix) against both oracles.

    ``torch`` (the drop-in) keeps torch's gradient rule: each rank's weight/bias gradient
    is its own part (DDP sums them), so their sum must equal the whole batch's. The NumPy
    module gives the whole batch's on every rank.
    """
    dtype = case.dtype
    for step in list(range(STEPS)) + ["eval"]:
        for rank, got in enumerate(ranks):
            prefix = f"{impl}/{case.name}/{step}"
            what = f"{impl} {case.name} world {world} rank {rank} step {step}"
            for oracle in oracles(case.name, world):
                expected_y = case.local(oracle[f"{step}/y"], world, rank)
                assert_close(got[f"{prefix}/y"], expected_y, dtype, err_msg=f"{what}: y")
                if step == "eval":
                    continue
                assert_close(got[f"{prefix}/gx"], case.local(oracle[f"{step}/gx"], world, rank),
                             dtype, err_msg=f"{what}: grad x")
                _rel(got[f"{prefix}/rm"], oracle[f"{step}/rm"], VAR_RTOL[dtype], f"{what}: running_mean")
                _rel(got[f"{prefix}/rv"], oracle[f"{step}/rv"], VAR_RTOL[dtype], f"{what}: running_var")
                assert int(got[f"{prefix}/count"]) == oracle[f"{step}/count"], f"{what}: counter"
            if step == "eval":
                continue
            for name in ("rm", "rv", "count"):  # identical bits on every rank
                assert np.array_equal(got[f"{prefix}/{name}"], ranks[0][f"{prefix}/{name}"]), (
                    f"{what}: {name} differs from rank 0's")
            if impl == "torch":
                assert bool(got[f"{prefix}/layout_kept"]), f"{what}: output not in torch's memory format"
        base = batchnorm_oracle(case.name, world)
        if step == "eval":
            continue
        for grad in ("gw", "gb"):
            prefix = f"{impl}/{case.name}/{step}/{grad}"
            if impl == "torch":
                totals = [np.sum([r[prefix].astype(np.float64) for r in ranks], axis=0)]
            else:
                totals = [r[prefix] for r in ranks]
            for rank, total in enumerate(totals):
                for oracle in oracles(case.name, world):
                    assert_close_sum(total, oracle[f"{step}/{grad}"], base[f"{step}/abs_{grad}"], dtype,
                                     err_msg=f"{impl} {case.name} world {world} rank {rank} step {step}: {grad}")


def check_copies_of_checked_modules(faults: List[Dict[str, Any]]) -> None:
    """sync_worker._copies_of_checked_modules: rank r ran (2, 3, 2, 2) ramps times r + 1, so
    channel c's mean over the ranks is (2C + 4c + 1.5) (world + 1) / 2, C = 3; after k steps
    from zero the running mean is (1 - 0.9^k) times it: k = 2 for the copy, 3 after it, 4 for
    the restored state_dict."""
    world = len(faults)
    mean = sum(2 * 3 + 4 * c + 1.5 for c in range(3)) * (world + 1) / 2
    for f in faults:
        assert f["copied"]["raised"] is None, f["copied"]
        np.testing.assert_allclose(f["copied"]["value"], (1 - 0.9**2) * mean, rtol=1e-6)
        assert f["new_job"]["raised"] == "ValueError" and "num_features differs" in f["new_job"]["message"], f
        assert f["after_new_job"]["raised"] is None, f["after_new_job"]
        np.testing.assert_allclose(f["after_new_job"]["value"], (1 - 0.9**3) * mean, rtol=1e-6)
        assert f["restored"]["raised"] is None, f["restored"]
        np.testing.assert_allclose(f["restored"]["value"], (1 - 0.9**4) * mean, rtol=1e-6)
    for key in ("copied", "after_new_job", "restored"):
        assert len({f[key]["value"] for f in faults}) == 1, key
