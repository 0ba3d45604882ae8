"""The HTTP client, the package and the modules it rests on import neither torch nor numpy.

Each statement runs in a fresh interpreter (this one has both loaded long ago), with this environment's
PYTHONPATH, and reports which of the two it left in ``sys.modules``. How long the imports take is measured by
bench/import_time.py, not here.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "numpy")


def _heavy_modules_after(statement: str) -> list[str]:
    probe = f"{statement}\nimport json, sys\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize(
    "statement",
    [
        "import captioner.client",
        "import captioner",
        "from captioner import Caption, CaptionResult, DecodingOptions",
        "import captioner.options, captioner.results, captioner.images",
    ],
)
def test_the_light_modules_load_neither_torch_nor_numpy(statement: str) -> None:
    assert _heavy_modules_after(statement) == []


def test_the_probe_sees_a_heavy_module() -> None:
    """The check above could pass by seeing nothing: a statement that loads numpy must be reported."""
    assert _heavy_modules_after("import numpy") == ["numpy"]
