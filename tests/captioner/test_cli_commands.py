"""The ``captioner`` command line's seams: commands another package adds (captioner.cli.Command), how any command's
errors are reported (captioner.errors: one line, exit status 2), and where a torchrun launch puts this process."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import pytest

from captioner import cli
from captioner.errors import CaptionerError
from captioner.torchrun import LaunchError, launch_rank
from training import data_commands


def _echo(args: argparse.Namespace) -> int:
    print(f"heard {args.word}")
    return 0


def _command(run: Callable[[argparse.Namespace], int] = _echo) -> cli.Command:
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("word")

    return cli.Command("echo", "say a word back", "Says WORD back.", add_arguments, run)


def test_an_added_command_runs_and_is_listed(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["echo", "zebra"], commands=[_command()]) == 0
    assert capsys.readouterr().out == "heard zebra\n"
    help_text = cli.get_args_parser([_command()]).format_help()
    assert "echo" in help_text and "say a word back" in help_text
    with pytest.raises(SystemExit) as exit_info:  # without it, argparse refuses the word
        cli.main(["echo", "zebra"])
    assert exit_info.value.code == 2


class _Refused(CaptionerError):
    pass


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (_Refused("the first line says why\nand the rest is detail"), "the first line says why"),
        (ValueError("--batch-size must be >= 1, got 0"), "--batch-size must be >= 1, got 0"),
        (PermissionError(13, "Permission denied", "/root/out.pt"), "[Errno 13] Permission denied: '/root/out.pt'"),
        (_Refused(""), "_Refused"),
    ],
    ids=["project", "value", "file", "empty"],
)
def test_a_user_error_in_any_command_is_one_line_and_status_2(
    error: Exception, line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail(args: argparse.Namespace) -> int:
        raise error

    assert cli.main(["echo", "x"], commands=[_command(fail)]) == 2
    assert capsys.readouterr().err == f"captioner: error: {line}\n"


def test_a_bug_keeps_its_traceback() -> None:
    def bug(args: argparse.Namespace) -> int:
        raise KeyError("decoder_state")

    with pytest.raises(KeyError):
        cli.main(["echo", "x"], commands=[_command(bug)])


@pytest.mark.parametrize("name", ["rules", "calibrate"])
def test_the_captioner_command_has_the_data_set_commands_the_library_has_not(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [name, str(tmp_path / "missing.pt"), str(tmp_path / "out.pt"), "--data", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)  # the library's command line alone
    assert exit_info.value.code == 2 and f"invalid choice: '{name}'" in capsys.readouterr().err
    assert data_commands.main(argv) == 2  # the console script's: it runs, and refuses the missing checkpoint
    error = capsys.readouterr().err
    assert error.startswith("captioner: error: ") and "missing.pt" in error and error.count("\n") == 1


@pytest.mark.parametrize(
    ("environment", "expected"),
    [
        ({}, (0, 1, 0, True)),
        ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, (3, 4, 1, False)),
    ],
)
def test_launch_rank_reads_torchrun_s_variables(
    environment: dict[str, str], expected: tuple[int, int, int, bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    launch = launch_rank()
    assert (launch.rank, launch.world, launch.local_rank, launch.main) == expected


@pytest.mark.parametrize(
    ("environment", "message"),
    [
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 and WORLD_SIZE=2 do not make sense together"),
        ({"WORLD_SIZE": "0"}, "RANK=0 and WORLD_SIZE=0 do not make sense together"),
        ({"RANK": "one"}, "torchrun's variables must be integers: RANK='one'"),
    ],
)
def test_launch_rank_refuses_what_no_launch_sets(
    environment: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(LaunchError, match=message):
        launch_rank()
