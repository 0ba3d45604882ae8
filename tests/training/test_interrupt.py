"""Ctrl-C in ``captioner-train`` and ``captioner-eval``: one line, exit 130, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import make_flickr_folder
from tests.interrupt import WORKING, interrupt, script, stand_in_command


def test_ctrl_c_in_eval_is_one_line(tmp_path: Path) -> None:
    command = stand_in_command("training.cli:evaluate", "training.cli:eval_main", "--data", str(tmp_path))
    run = interrupt(command, lambda output: WORKING + "\n" in output.stdout)
    assert run.returncode == 130, run.describe()
    assert run.before == [] and run.after == ["captioner-eval: interrupted\n"], run.describe()


@pytest.mark.slow
def test_ctrl_c_in_training_is_one_line_and_says_how_to_resume(tmp_path: Path) -> None:
    data = make_flickr_folder(tmp_path / "data")
    command = [script("captioner-train"), "--data", str(data), "--output-dir", str(tmp_path / "run")]
    command += ["--cache-dir", str(tmp_path / "cache"), "--encoder", "efficientnet_lite0", "--epochs", "1000"]
    command += ["--embed-dim", "16", "--hidden-dim", "16", "--attention-dim", "8", "--min-word-count", "1"]
    command += ["--num-workers", "0", "--no-progress", "--device", "cpu"]

    def training(output) -> bool:  # past the feature cache: in the epochs, which log nothing until the end
        return any("training captions over" in line for line in output.stderr)

    run = interrupt(command, training)
    assert run.returncode == 130, run.describe()
    assert run.after == ["captioner-train: interrupted; resume with --resume (last.pt holds the last saved step)\n"]
