"""The code blocks of README.md and docs/*.md run as tests (pytest-markdown-docs, configured
in pyproject.toml): here, that plain `pytest` collects every Python block and that no block
escapes it by its label."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^ *```(.*)$", re.M)
NOT_RUN = {"bash", "cmake", "cpp", "text"}  # shell, C++ and signatures/formulas


def fences(path):
    """Info strings of the opening fences of ``path``."""
    infos = FENCE.findall(path.read_text("utf8"))
    return infos[0::2]


def test_every_block_is_python_or_labelled_as_not_run():
    for path in DOCS:
        for info in fences(path):
            words = info.split()
            assert words, f"{path.name}: a code block without a language (python, or one of {sorted(NOT_RUN)})"
            assert words[0] == "python" or words[0] in NOT_RUN, f"{path.name}: block labelled {info!r}"
            assert "notest" not in words, f"{path.name}: a Python block that is not run: {info!r}"


def test_plain_pytest_collects_every_python_block():
    expected = {f"{p.relative_to(ROOT)}": sum(i.split()[:1] == ["python"] for i in fences(p)) for p in DOCS}
    # Without options: the plugin and its --markdown-docs come from pyproject.toml.
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "README.md", "docs"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    collected = re.findall(r"^(README\.md|docs/\S+\.md)::", run.stdout, re.M)
    assert {path: collected.count(path) for path in expected} == expected
    assert sum(expected.values()) >= 10
