"""One version: cpp/include/batchnorm/version.hpp. The wheel's metadata, batchnorm.__version__,
the installed header and the installed CMake package all carry the same one."""

import os
import re
from importlib import metadata

import batchnorm as bn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def header_version(path):
    with open(path) as f:
        text = f.read()
    parts = [re.search(rf"#define BATCHNORM_VERSION_{p} (\d+)", text) for p in ("MAJOR", "MINOR", "PATCH")]
    assert all(parts), path
    return ".".join(m.group(1) for m in parts)


def test_python_version_is_the_metadata_version():
    assert re.fullmatch(r"\d+\.\d+\.\d+", bn.__version__)
    assert bn.__version__ == metadata.version("batchnorm")


def test_installed_header_carries_it():
    assert header_version(os.path.join(bn.get_include(), "batchnorm", "version.hpp")) == bn.__version__


def test_source_header_carries_it():
    source = os.path.join(ROOT, "cpp", "include", "batchnorm", "version.hpp")
    assert header_version(source) == bn.__version__


def test_installed_cmake_package_carries_it():
    with open(os.path.join(bn.get_cmake_dir(), "batchnorm-config-version.cmake")) as f:
        assert f'set(PACKAGE_VERSION "{bn.__version__}")' in f.read()


def test_version_is_written_nowhere_else():
    """pyproject.toml and CMakeLists.txt read the header; neither repeats the number."""
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        pyproject = f.read()
    assert 'dynamic = ["version"]' in pyproject
    assert not re.search(r"(?m)^version\s*=", pyproject)
    with open(os.path.join(ROOT, "CMakeLists.txt")) as f:
        assert "VERSION ${BATCHNORM_VERSION}" in f.read()
