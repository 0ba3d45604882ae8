"""Ctrl-C in ``captioner-train`` and ``captioner-eval``: one line, exit 130, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import make_flickr_folder
from tests.interrupt import WORKING, interrupt, script, stand_in_command
from training.cli import _interrupted_message, train_main


def test_ctrl_c_in_eval_is_one_line(tmp_path: Path) -> None:
    command = stand_in_command("training.cli:evaluate", "training.cli:eval_main", "--data", str(tmp_path))
    run = interrupt(command, lambda output: WORKING + "\n" in output.stdout)
    assert run.returncode == 130, run.describe()
    assert run.before == [] and run.after == ["captioner-eval: interrupted\n"], run.describe()


def test_ctrl_c_before_the_first_checkpoint_does_not_promise_a_last_pt(tmp_path: Path, monkeypatch, capsys) -> None:
    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr("training.engine.train", interrupted)
    run = tmp_path / "run"
    argv = ["--data", str(tmp_path), "--output-dir", str(run)]
    assert train_main(argv) == 130
    assert capsys.readouterr().err == (
        f"captioner-train: interrupted before the first checkpoint: no last.pt in {run} to resume from "
        "(last.pt is saved at the end of each epoch and every --checkpoint-every steps)\n"
    )
    run.mkdir()
    (run / "last.pt").write_bytes(b"")  # a step was saved
    assert train_main(argv) == 130
    assert capsys.readouterr().err == (
        "captioner-train: interrupted; resume with --resume (last.pt holds the last saved step)\n"
    )


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
    # interrupted in the first epoch or after it: the line says what there is to resume from (the texts: above)
    assert run.after == [_interrupted_message(str(tmp_path / "run")) + "\n"], run.describe()
