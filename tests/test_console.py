"""The console scripts: Ctrl-C in a command's first seconds, while torch is still importing, is one line and 130."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.interrupt import WORKING, interrupt, script

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = {  # console script -> (its module, what it runs)
    "captioner": ("captioner.console", "training.data_commands:main"),
    "captioner-train": ("training.console", "training.cli:train_main"),
    "captioner-eval": ("training.console", "training.cli:eval_main"),
    "captioner-serve": ("service.console", "service.cli:main"),
}


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_each_console_script_starts_in_its_light_module(name: str) -> None:
    module, target = ENTRY_POINTS[name]
    assert f"from {module} import " in Path(script(name)).read_text(), "reinstall: scripts/setup.sh dev"
    assert f'"{target}"' in (ROOT / (module.replace(".", "/") + ".py")).read_text()


def test_ctrl_c_while_the_command_is_still_importing_is_one_line(tmp_path: Path) -> None:
    """A command whose import takes a minute (as torch's takes seconds), Ctrl-C'd in the middle of it."""
    (tmp_path / "slow_command.py").write_text(
        textwrap.dedent(
            f"""\
            import time
            print({WORKING!r}, flush=True)
            time.sleep(60)  # importing


            def main():
                return 0
            """
        )
    )
    launcher = "import sys; from captioner.console import run; sys.exit(run('slow-command', 'slow_command:main'))"
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    run = interrupt([sys.executable, "-c", launcher], lambda o: WORKING + "\n" in o.stdout, env=env)
    assert run.returncode == 130, run.describe()
    assert run.before == [] and run.after == ["slow-command: interrupted\n"], run.describe()


def test_the_console_modules_do_not_import_torch() -> None:
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
