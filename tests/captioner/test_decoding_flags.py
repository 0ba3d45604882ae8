"""The decoding flags are made from DecodingOptions' fields: a new option or a changed default is written once."""

import argparse
import dataclasses

import pytest

from captioner.cli import add_decoding_args, decoding_options_from_args
from captioner.decoding import METHODS, DecodingOptions


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="test")
    add_decoding_args(parser)
    return parser


def test_one_flag_per_option_with_its_default_and_help() -> None:
    flags = {action.dest: action for action in _parser()._actions if action.dest != "help"}
    options = dataclasses.fields(DecodingOptions)
    assert list(flags) == [option.name for option in options]
    for option in options:
        action = flags[option.name]
        assert action.option_strings == ["--" + option.name.replace("_", "-")]
        assert action.default == option.default
        assert option.metadata.get("help", "") in (action.help or "")
    assert tuple(flags["method"].choices) == METHODS


def test_no_flags_give_the_default_options() -> None:
    assert decoding_options_from_args(_parser().parse_args([])) == DecodingOptions()


def test_flags_are_parsed_with_the_fields_types() -> None:
    args = _parser().parse_args(
        ["--method", "sample", "--max-length", "7", "--temperature", "0.5", "--top-k", "3", "--top-p", "0.9"]
        + ["--num-captions", "2", "--seed", "11"]
    )
    assert decoding_options_from_args(args) == DecodingOptions(
        method="sample", max_length=7, temperature=0.5, top_k=3, top_p=0.9, num_captions=2, seed=11
    )
    args = _parser().parse_args(["--beam-size", "5", "--length-penalty", "1.5"])
    assert decoding_options_from_args(args) == DecodingOptions(beam_size=5, length_penalty=1.5)


@pytest.mark.parametrize("argv", [["--method", "best"], ["--beam-size", "2.5"], ["--seed", "x"]])
def test_bad_values_are_usage_errors(argv, capsys) -> None:
    with pytest.raises(SystemExit) as caught:
        _parser().parse_args(argv)
    assert caught.value.code == 2
    assert "invalid" in capsys.readouterr().err
