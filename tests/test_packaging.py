"""pyproject.toml: one version, read from the package without importing it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import captioner

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")


def test_the_version_is_written_once_in_the_package() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"], "the version lives in captioner/__init__.py only"
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "captioner._version.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]|rc|\.dev|\.post)?\d*", captioner.__version__), captioner.__version__


def test_the_build_reads_the_version_without_importing_torch() -> None:
    """setuptools reads ``__version__`` from the file's syntax tree when it is a plain string; were it computed,
    building (and ``pip install -e .``) would import the package, and with it torch."""
    attr = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    probe = (
        "import sys\n"
        "from setuptools.config.expand import read_attr\n"
        f"print(read_attr({attr!r}, root_dir={str(ROOT)!r}))\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [captioner.__version__, "False"]
