"""The console scripts: Ctrl-C in a command's first second, while torch is still importing, is one line and 130."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.interrupt import Output, interrupt, script

COMMANDS = ["captioner", "captioner-train", "captioner-eval", "captioner-serve"]


@pytest.mark.parametrize("name", COMMANDS)
def test_ctrl_c_while_the_command_is_still_importing_is_one_line(name: str) -> None:
    started = time.monotonic()

    def importing(output: Output) -> bool:  # torch alone takes seconds to import: this lands inside it
        return time.monotonic() - started > 0.4

    run = interrupt([script(name), "--help"], importing)
    assert run.returncode == 130, run.describe()
    assert run.stdout == [] and run.before == [], run.describe()  # interrupted before --help printed anything
    assert run.after == [f"{name}: interrupted\n"], run.describe()


def test_the_console_module_does_not_import_torch() -> None:
    probe = "import sys, captioner.console, training.console, service.console; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "False", "the entry points must catch Ctrl-C before torch starts importing"


def test_the_package_names_still_import() -> None:
    import captioner

    assert captioner.Captioner.__name__ == "Captioner"
    assert captioner.DecodingOptions(method="beam").method == "beam"
    assert {"Captioner", "Vocabulary", "__version__"} <= set(dir(captioner))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = captioner.Nope  # type: ignore[attr-defined]
