"""ISA dispatch.  The ISA is chosen once per process, so every forced ISA runs in a fresh
interpreter (subprocess) with BATCHNORM_ISA set; the parity script there compares with
the float64 reference at the usual tolerances (float32 1e-5, float64 1e-12)."""

import os
import platform
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import batchnorm as bn

HERE = os.path.dirname(os.path.abspath(__file__))
KNOWN = ("avx512_bf16", "avx512", "avx2", "neon", "scalar")
MACHINE = platform.machine().lower()
IS_X86 = MACHINE in ("x86_64", "amd64", "i686", "i386")
IS_ARM = MACHINE in ("aarch64", "arm64")


def run_py(code, isa=None, timeout=180, extra_env=None):
    env = dict(os.environ)
    env.pop("BATCHNORM_ISA", None)
    if isa is not None:
        env["BATCHNORM_ISA"] = isa
    env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
    if extra_env:
        env.update(extra_env)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=timeout)


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags") or line.startswith("Features"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def test_isa_is_available_and_matches_env():
    avail = bn._core.available_isas()
    assert isinstance(avail, list) and avail
    assert all(a in KNOWN for a in avail), avail
    assert len(set(avail)) == len(avail)
    assert "scalar" in avail
    assert bn._core.isa() in avail
    forced = os.environ.get("BATCHNORM_ISA")
    if forced:
        assert bn._core.isa() == forced
    else:
        assert bn._core.isa() == avail[0], "without BATCHNORM_ISA the best available ISA is used"


def test_isa_names_the_backend_family():
    # The API contract's four names: a CPU with AVX512-BF16 runs the "avx512" backend (its
    # kernels narrow to bfloat16 with the CPU's instruction, a variant only _core names).
    variant = bn._core.isa()
    assert bn.isa() in ("avx512", "avx2", "neon", "scalar")
    assert bn.isa() == ("avx512" if variant == "avx512_bf16" else variant)


def test_available_isas_respect_the_cpu():
    avail = bn._core.available_isas()
    if IS_X86:
        assert "neon" not in avail
        flags = cpu_flags()
        if flags is not None:
            if "avx512f" not in flags:
                assert "avx512" not in avail
            if "avx512_bf16" not in flags:
                assert "avx512_bf16" not in avail
            if "avx512_bf16" in avail:
                assert "avx512" in avail, "avx512_bf16 is avx512 plus AVX512-BF16"
            if not {"avx2", "fma"} <= flags:
                assert "avx2" not in avail
    if IS_ARM:
        assert not {"avx2", "avx512", "avx512_bf16"} & set(avail)
        assert "neon" in avail, "NEON is the aarch64 baseline"


def test_default_is_best_isa_in_fresh_process():
    r = run_py("import batchnorm as bn; print(bn._core.isa()); print(','.join(bn._core.available_isas()))")
    assert r.returncode == 0, r.stderr
    isa, avail = r.stdout.split()
    assert isa == avail.split(",")[0]


PARITY = textwrap.dedent(r"""
    import os, sys
    import numpy as np
    import batchnorm as bn
    import reference as ref
    want = os.environ["BATCHNORM_ISA"]
    assert bn._core.isa() == want, (bn._core.isa(), want)
    rng = np.random.default_rng(0)
    TOL = {np.float32: 1e-5, np.float64: 1e-12}

    def close(a, e, dt, what, scale=1.0):
        np.testing.assert_allclose(np.asarray(a, np.float64), e, rtol=TOL[dt], atol=TOL[dt] * scale,
                                   err_msg=f"{want} {what} {dt.__name__}")

    cases = [((7, 33), 1), ((2, 17, 5, 3), 1), ((3, 5, 7, 33), -1), ((2, 3, 65), 1), ((1, 1, 67, 3), 1),
             ((4, 19, 2, 3, 5), 1), ((130, 9), -1)]
    for threads in (1, 2):
        bn.set_num_threads(threads)
        for dt in (np.float32, np.float64):
            for shape, axis in cases:
                x = (rng.standard_normal(shape) * 1.5 + 0.7).astype(dt)
                c = shape[axis]
                w = rng.uniform(0.5, 1.5, c).astype(dt)
                b = rng.uniform(-1, 1, c).astype(dt)
                rm, rv = np.zeros(c, dt), np.ones(c, dt)
                y = bn.batch_norm(x, rm, rv, w, b, training=True, momentum=0.3, axis=axis)
                ey, em, einv, erm, erv = ref.forward_train(x, w, b, np.zeros(c), np.ones(c), 0.3, 1e-5, axis)
                close(y, ey, dt, f"train {shape}")
                close(rm, erm, dt, f"running_mean {shape}")
                close(rv, erv, dt, f"running_var {shape}")
                mean, var = bn.batch_norm_stats(x, axis=axis)
                em2, ev2 = ref.stats(x, axis)
                close(mean, em2, dt, f"stats mean {shape}")
                close(var, ev2, dt, f"stats var {shape}")
                r = rng.standard_normal(shape).astype(dt)
                y = bn.batch_norm(x, rm, rv, w, b, axis=axis, residual=r, activation="relu")
                close(y, ref.fused_eval(x, rm, rv, w, b, 1e-5, axis, r, "relu"), dt, f"eval fused {shape}")
                y = bn.batch_norm(x, rm, rv, w, b, axis=axis)
                close(y, ref.forward_eval(x, rm, rv, w, b, 1e-5, axis), dt, f"eval {shape}")
                g = rng.standard_normal(shape).astype(dt)
                mean_d = em.astype(dt)
                inv_d = einv.astype(dt)
                gx, gw, gb = bn.batch_norm_backward(g, x, mean_d, inv_d, w, axis=axis)
                egx, egw, egb = ref.backward_train(g, x, mean_d, inv_d, w, axis)
                n = x.size // c
                close(gx, egx, dt, f"grad_x {shape}", scale=4 * np.abs(g).max())
                close(gw, egw, dt, f"grad_weight {shape}", scale=4 * n)
                close(gb, egb, dt, f"grad_bias {shape}", scale=4 * n)
    print("PARITY-OK", bn._core.isa())
""")


@pytest.mark.subprocess
@pytest.mark.parametrize("isa", KNOWN)
def test_forced_isa_parity(isa):
    if isa not in bn._core.available_isas():
        pytest.skip(f"{isa} not available on this CPU/build (see test_forcing_missing_isa_fails)")
    r = run_py(PARITY, isa=isa)
    assert r.returncode == 0, f"BATCHNORM_ISA={isa}:\n{r.stdout}\n{r.stderr}"
    assert f"PARITY-OK {isa}" in r.stdout


def missing_isas():
    avail = set(bn._core.available_isas())
    return [i for i in KNOWN if i not in avail]


FIRST_CALL = ("import numpy as np, batchnorm as bn\n"
              "bn.batch_norm_stats(np.ones((4, 3), np.float32))\n"
              "print('ISA', bn.isa())\n")


@pytest.mark.subprocess
def test_forcing_missing_isa_fails():
    missing = missing_isas()
    if IS_X86:
        assert "neon" in missing
    if IS_ARM:
        assert "avx512" in missing
    if not missing:
        pytest.skip("every ISA is available here")
    for isa in missing:
        r = run_py(FIRST_CALL, isa=isa)
        assert r.returncode != 0, f"BATCHNORM_ISA={isa} was accepted on a CPU without it: {r.stdout}"
        assert "BATCHNORM_ISA" in r.stderr, r.stderr
        assert isa in r.stderr, r.stderr
        assert "Traceback" in r.stderr  # a Python exception, not a crash (SIGILL etc.)


@pytest.mark.subprocess
@pytest.mark.parametrize("value", ["bogus", "sse2", "avx1024"])
def test_unknown_isa_is_rejected(value):
    r = run_py(FIRST_CALL, isa=value)
    assert r.returncode != 0, f"BATCHNORM_ISA={value} was accepted: {r.stdout}"
    assert "BATCHNORM_ISA" in r.stderr, r.stderr
    assert value in r.stderr, r.stderr
    assert "Traceback" in r.stderr


def test_isa_does_not_change_within_a_process(monkeypatch):
    before = bn._core.isa()
    other = [i for i in bn._core.available_isas() if i != before]
    monkeypatch.setenv("BATCHNORM_ISA", other[0] if other else "scalar")
    bn.batch_norm_stats(np.ones((4, 3), np.float32))
    assert bn._core.isa() == before
