"""Typed use of batchnorm's public API: ``mypy --strict`` checks this file (tests/test_typing.py).

NumPy in gives precise NumPy types out; other DLPack producers (torch tensors) give ``Any``
(their own kind at run time). Run it: ``python examples/python/typed_usage.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Tuple

import numpy as np
import numpy.typing as npt

import batchnorm as bn

if TYPE_CHECKING:
    from typing_extensions import assert_type
else:
    def assert_type(value: object, _type: object) -> object:
        """Run-time stand-in for typing_extensions.assert_type (checked by mypy only)."""
        return value

FloatArray = npt.NDArray[np.floating[Any]]


def train_step(
    m: bn.BatchNorm2d, x: npt.NDArray[np.float32], grad_y: npt.NDArray[np.float32]
) -> Tuple[FloatArray, FloatArray]:
    """Forward in training mode, then the gradient for the upstream gradient ``grad_y``."""
    y = m(x)
    assert_type(y, FloatArray)
    grad_x = m.backward(grad_y)
    assert_type(grad_x, FloatArray)
    return y, grad_x


def main() -> None:
    """Train, backward, eval, fuse, fold and state round trip, with checked types."""
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(8, 4, 5, 5)).astype(np.float32)

    m = bn.BatchNorm2d(4, momentum=0.1)
    y, grad_x = train_step(m, x, rng.normal(size=x.shape).astype(np.float32))
    running_var: Optional[npt.NDArray[Any]] = m.running_var
    assert running_var is not None and m.weight_grad is not None

    mean, var = bn.batch_norm_stats(x)
    assert_type(mean, FloatArray)
    z = bn.batch_norm(x, mean, var, training=False)
    assert_type(z, FloatArray)
    fused = m.eval()(x, residual=x, activation="relu")
    assert_type(fused, FloatArray)

    gx, gw, gb = bn.batch_norm_backward(y, x, mean, 1.0 / np.sqrt(var + 1e-5))
    assert_type(gw, FloatArray)

    conv_weight = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    w2, b2 = bn.fold(m, conv_weight)
    assert_type(w2, npt.NDArray[Any])

    state = m.state_dict()
    result = bn.BatchNorm2d(4).load_state_dict(state)
    assert not result.missing_keys and not result.unexpected_keys

    threads: int = bn.get_num_threads()
    isa: str = bn.isa()
    print(f"isa {isa}, {threads} threads; y {y.shape} {y.dtype}, |grad_x| {float(np.abs(grad_x).max()):.3f}, "
          f"fused min {float(fused.min()):.1f}, folded {w2.shape} {b2.shape}, gx {gx.shape}, gb {gb.shape}")


if __name__ == "__main__":
    main()
