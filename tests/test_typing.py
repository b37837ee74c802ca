"""Typing: ``mypy --strict`` on the Python package, on examples/python/typed_usage.py and on
USER_SCRIPT (a user's typed script of what the docs show: every norm's functional form, backward
helper and module, and ``model = bnt.convert(model)``), and the ``_core`` stubs
(batchnorm/_core.pyi) that nanobind's stubgen writes at build time.

mypy is optional (skipped without it), and so is torch: the package's torch modules subclass
torch's and are only typed against it, so without torch the mypy runs skip too. Its cache lives in the repository's .mypy_cache
(git-ignored): the first run analyses torch's sources (~30 s), later runs take seconds.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

import batchnorm

pytest.importorskip("mypy")

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "python" / "typed_usage.py"
INSTALLED = pathlib.Path(batchnorm.__file__).parent
STUB = INSTALLED / "_core.pyi"
ARRAY_FUNCTIONS = ("stats", "forward_train", "forward_eval", "backward")


# docs/python.md: "NumPy inputs give NumPy result types; other inputs give Any". Each function
# returns a call under a NumPy result type, so a call typed Any (no NumPy overload) fails with
# no-any-return; convert/revert/fold_model results are assigned back to an nn.Sequential, as
# the docs do. Run as a script (test_user_script_runs), it checks the objects at run time.
USER_SCRIPT = '''"""A user's typed script (what docs/norms.md, python.md and torch.md show), checked by
``mypy --strict``: every function returns a call of the package under a NumPy result type, so
an ``Any`` result (a missing overload) is a ``no-any-return`` error, and ``convert``/``revert``
results are assigned back to a ``torch.nn.Sequential``. Run as a script, it checks that the
runtime objects are what the annotations say."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Tuple

import numpy as np
import numpy.typing as npt
import torch

import batchnorm as bn
import batchnorm.torch as bnt

if TYPE_CHECKING:
    from typing_extensions import assert_type
else:
    def assert_type(value: object, _type: object) -> object:
        return value

Floats = npt.NDArray[np.floating[Any]]
F32 = npt.NDArray[np.float32]


def layer_norm(x: F32) -> Floats:
    return bn.layer_norm(x, 768)


def layer_norm_fused(x: F32, ln: bn.LayerNorm) -> Floats:
    r, s = np.ones_like(x), np.empty_like(x)
    return bn.layer_norm(x, 768, ln.weight, ln.bias, residual=r, sum_out=s)


def layer_norm_out(x: F32) -> Floats:
    return bn.layer_norm(x, (768,), out=np.empty_like(x))


def rms_norm(x: F32) -> Floats:
    return bn.rms_norm(x, 768, eps=None)


def group_norm(img: F32) -> Floats:
    return bn.group_norm(img, 32, axis=-1, activation="relu")


def instance_norm(img: F32) -> Floats:
    return bn.instance_norm(img, axis=-1)


def layer_norm_grads(gy: F32, x: F32) -> Tuple[Floats, Floats, Floats]:
    mean = x.mean(-1)
    invstd = (1.0 / np.sqrt(x.var(-1) + 1e-5)).astype(np.float32)
    gx, gw, gb = bn.layer_norm_backward(gy, x, 768, mean, invstd)
    assert_type(gw, Floats)
    return gx, gw, gb


def rms_norm_grads(gy: F32, x: F32) -> Tuple[Floats, Floats]:
    invstd = (1.0 / np.sqrt(np.square(x).mean(-1) + 1e-6)).astype(np.float32)
    gx, gw = bn.rms_norm_backward(gy, x, 768, invstd, out=np.empty_like(gy))
    assert_type(gx, Floats)
    return gx, gw


def group_norm_grads(gy: F32, x: F32) -> Floats:
    groups = x.reshape(x.shape[0], 4, -1)  # (N, C=8, L): 4 groups of 2 channels
    mean = groups.mean(-1)
    invstd = (1.0 / np.sqrt(groups.var(-1) + 1e-5)).astype(np.float32)
    gx, gw, gb = bn.group_norm_backward(gy, x, 4, mean, invstd)
    return gx + gw[None, :, None] + gb[None, :, None]


def instance_norm_grads(gy: F32, x: F32) -> Floats:
    mean = x.mean(-1)
    invstd = (1.0 / np.sqrt(x.var(-1) + 1e-5)).astype(np.float32)
    grads = bn.instance_norm_backward(gy, x, mean, invstd)
    assert_type(grads, Tuple[Floats, Floats, Floats])
    return grads[0]


def layer_norm_module(x: F32) -> Floats:
    ln = bn.LayerNorm(768)
    y = ln(x)
    assert_type(ln.forward(x), Floats)
    return y + ln.backward(np.ones_like(y))


def rms_norm_module(x: F32) -> Floats:
    return bn.RMSNorm(768)(x, out=np.empty_like(x))


def group_norm_module(img: F32) -> Floats:
    return bn.GroupNorm(32, 320, axis=-1)(img, activation="relu")


def instance_norm_module(x: F32) -> Floats:
    m = bn.InstanceNorm2d(3)
    y = m(x)
    return m.backward(np.ones_like(y))


def sync_batch_norm_module(m: bn.SyncBatchNorm, x: F32) -> Floats:
    y = m(x)
    assert_type(m.forward(x), Floats)
    return y + m.backward(np.ones_like(y))


def torch_input_gives_any(t: torch.Tensor) -> torch.Tensor:
    y = bn.layer_norm(t, 4)
    assert_type(y, Any)
    z: torch.Tensor = bn.LayerNorm(4)(t) + y
    return z


def convert_and_revert() -> torch.nn.Sequential:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    model = bnt.convert(model)
    assert isinstance(model[1], bnt.BatchNorm2d)
    model = bnt.revert(model)
    assert type(model[1]) is torch.nn.BatchNorm2d
    model = bnt.fold_model(model.eval())
    model = bnt.convert(model, sync=True)
    model = bnt.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def bare_norms() -> None:
    """A bare norm at the top level: its replacement, of the class the overloads name."""
    dropin = bnt.convert(torch.nn.BatchNorm2d(3))
    assert_type(dropin, torch.nn.BatchNorm2d)
    assert isinstance(dropin, bnt.BatchNorm2d)
    plain = bnt.revert(bnt.BatchNorm2d(3))
    assert_type(plain, torch.nn.BatchNorm2d)
    assert type(plain) is torch.nn.BatchNorm2d
    layer = bnt.revert(bnt.LayerNorm(4))
    assert_type(layer, torch.nn.LayerNorm)
    assert type(layer) is torch.nn.LayerNorm
    sync = bnt.convert(torch.nn.BatchNorm1d(3), sync=True)
    assert_type(sync, bnt.SyncBatchNorm)
    assert type(sync) is bnt.SyncBatchNorm
    assert type(bnt.revert(sync)) is torch.nn.SyncBatchNorm
    made = bnt.SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm2d(3))
    assert_type(made, bnt.SyncBatchNorm)
    assert type(made) is bnt.SyncBatchNorm


def check(array: object) -> None:
    assert type(array) is np.ndarray and array.dtype.kind == "f", type(array)


def main() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 768)).astype(np.float32)
    ln = bn.LayerNorm(768)
    img = rng.standard_normal((2, 4, 4, 320)).astype(np.float32)
    seq = rng.standard_normal((2, 8, 5)).astype(np.float32)
    batch = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    results = [
        layer_norm(x), layer_norm_fused(x, ln), layer_norm_out(x), rms_norm(x), group_norm(img),
        instance_norm(img), *layer_norm_grads(x, x), *rms_norm_grads(x, x), group_norm_grads(seq, seq),
        instance_norm_grads(seq, seq), layer_norm_module(x), rms_norm_module(x), group_norm_module(img),
        instance_norm_module(batch), sync_batch_norm_module(bn.SyncBatchNorm(3).eval(), batch),
    ]
    for result in results:
        check(result)
    assert isinstance(torch_input_gives_any(torch.from_numpy(x[..., :4].copy())), torch.Tensor)
    model = convert_and_revert()
    assert isinstance(model[0], torch.nn.Conv2d) and isinstance(model[2], torch.nn.ReLU)
    bare_norms()
    print("typed user script: ok")


if __name__ == "__main__":
    main()
'''


def mypy(*targets: os.PathLike[str] | str, cwd: pathlib.Path = ROOT) -> None:
    cmd = [sys.executable, "-m", "mypy", "--strict", "--no-color-output",
           "--config-file", str(ROOT / "pyproject.toml"),
           "--cache-dir", str(ROOT / ".mypy_cache"), *map(str, targets)]
    env = dict(os.environ, MYPYPATH="")
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}{done.stderr}"


pytestmark = pytest.mark.subprocess


def test_stub_is_installed_with_precise_signatures():
    assert STUB.is_file(), f"{STUB} is missing: the build should generate it (nanobind_add_stub)"
    text = STUB.read_text()
    assert (INSTALLED / "py.typed").is_file()
    for name in ARRAY_FUNCTIONS:
        line = next(ln for ln in text.splitlines() if ln.startswith(f"def {name}("))
        assert "-> object" not in line, line  # nb::sig gives the real return types
        assert "axis: int = 1" in line, line
    assert "import numpy.typing" in text
    # the stub and the module agree on every public name
    import batchnorm._core as core
    names = {n for n in dir(core) if not n.startswith("_")}
    stubbed = {ln[4:ln.index("(")] for ln in text.splitlines() if ln.startswith("def ")}
    assert stubbed == names


def test_mypy_strict_on_package_and_example():
    """The source tree as a developer checks it (``_core`` unresolved there: Any)."""
    pytest.importorskip("torch")
    mypy("python/batchnorm", EXAMPLE)


def test_mypy_strict_against_the_generated_stub(tmp_path):
    """The package's Python files beside the installed ``_core.pyi``: the layer must agree
    with the real extension's signatures (what users of the installed wheel get)."""
    pytest.importorskip("torch")
    if not STUB.is_file():
        pytest.fail(f"{STUB} is missing")
    package = tmp_path / "batchnorm"
    shutil.copytree(ROOT / "python" / "batchnorm", package,
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copy(STUB, package / "_core.pyi")
    example = tmp_path / "typed_usage.py"
    shutil.copy(EXAMPLE, example)
    mypy(package, example, user_script(tmp_path), cwd=tmp_path)


def user_script(directory: pathlib.Path) -> pathlib.Path:
    script = directory / "typed_user.py"
    script.write_text(USER_SCRIPT)
    return script


def test_mypy_strict_on_a_users_script(tmp_path):
    """The docs' calls, typed as a user types them, against the source tree."""
    pytest.importorskip("torch")
    mypy("python/batchnorm", user_script(tmp_path))


def test_user_script_runs(tmp_path):
    """The types the script's annotations claim are the objects the calls return (the
    installed package)."""
    pytest.importorskip("torch")
    done = subprocess.run([sys.executable, str(user_script(tmp_path))], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "typed user script: ok" in done.stdout
