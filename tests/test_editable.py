"""An editable install (pip install -e .) gives build paths where the files are.

There the package's Python files stay in the source tree while the extension, the headers and
the CMake package are installed into site-packages; get_include() and get_cmake_dir() used to
point into the source tree. Builds the project into a fresh virtual environment (which sees
the running environment's packages, for numpy and the build requirements), so it is slow:
run with ``pytest -m slow`` (CI does).
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]


def run(args, **kwargs):
    done = subprocess.run(args, capture_output=True, text=True, timeout=1200, **kwargs)
    assert done.returncode == 0, f"{args}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout.strip()


def test_editable_install_paths_and_find_package(tmp_path):
    pytest.importorskip("nanobind")
    pytest.importorskip("scikit_build_core")
    if shutil.which("cmake") is None:
        pytest.skip("needs cmake")
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    python = str(venv / "bin" / "python")
    # The new environment sees this one's packages (numpy, nanobind, scikit-build-core), after
    # its own, whether this one is the system's Python or itself a virtual environment (where
    # --system-site-packages would reach past it, to the base interpreter's).
    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    with open(os.path.join(purelib, "outer-environment.pth"), "w") as pth:
        pth.write("\n".join(site.getsitepackages()) + "\n")
    # Debug: this checks where the files go, not the code, and an -O3 build of the kernels
    # took minutes.
    run([python, "-m", "pip", "install", "-q", "--no-build-isolation", "-Ccmake.build-type=Debug",
         "-e", ROOT])

    code = ("import batchnorm as bn, json; print(json.dumps([bn.__file__, bn.get_include(), "
            "bn.get_cmake_dir(), bn.__version__]))")
    import json

    package_file, include, cmakedir, version = json.loads(run([python, "-c", code], cwd=tmp_path))
    assert package_file.startswith(os.path.join(ROOT, "python")), package_file  # really editable
    assert run([python, "-m", "batchnorm", "--includedir"], cwd=tmp_path) == include
    assert run([python, "-m", "batchnorm", "--cmakedir"], cwd=tmp_path) == cmakedir
    assert os.path.isfile(os.path.join(include, "batchnorm", "batchnorm.hpp"))
    assert os.path.isfile(os.path.join(cmakedir, "batchnorm-config.cmake"))

    # find_package from the printed directory: configure the consumer project against it.
    build = tmp_path / "consumer"
    out = run(["cmake", "-S", os.path.join(ROOT, "tests", "cpp", "consumers", "find_package"),
               "-B", str(build), f"-Dbatchnorm_DIR={cmakedir}", f"-DEXPECT_BATCHNORM_DIR={cmakedir}"])
    assert f"batchnorm {version} from" in out
