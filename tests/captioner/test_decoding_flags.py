"""The decoding flags are made from DecodingOptions' fields: a new option or a changed default is written once."""

import argparse
import dataclasses

import pytest

from captioner.cli import main
from captioner.cli_args import add_decoding_args, decoding_options_from_args
from captioner.decoding import METHODS, VALID_VALUES, DecodingOptions


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


@pytest.mark.parametrize(
    ("argv", "unused"),
    [
        (["--method", "sample", "--beam-size", "3"], "beam_size"),  # 3 is the default: given, so refused
        (["--method", "sample", "--beam-size", "1"], "beam_size"),
        (["--method", "greedy", "--num-captions", "1"], "num_captions"),
        (["--method", "beam", "--top-p", "1.0", "--temperature", "1"], "temperature, top_p"),
        (["--seed", "0"], "seed"),  # the default method is beam
    ],
)
def test_a_flag_the_method_does_not_use_is_refused_whatever_its_value(argv, unused) -> None:
    with pytest.raises(ValueError, match=rf"method \w+ does not use {unused} \(.*\): leave it out"):
        decoding_options_from_args(_parser().parse_args(argv))


def test_the_flags_a_method_uses_are_accepted_at_their_defaults() -> None:
    args = _parser().parse_args(["--method", "beam", "--beam-size", "3", "--length-penalty", "0", "--max-length", "20"])
    assert decoding_options_from_args(args) == DecodingOptions()
    args = _parser().parse_args(["--method", "sample", "--top-k", "0", "--top-p", "1", "--num-captions", "1"])
    assert decoding_options_from_args(args) == DecodingOptions(method="sample")
    assert decoding_options_from_args(_parser().parse_args(["--method", "greedy", "--max-length", "20"])) == (
        DecodingOptions(method="greedy")
    )
    # a Namespace made by hand names no flags: only values other than the default are refused
    hand_made = argparse.Namespace(**dataclasses.asdict(DecodingOptions(method="sample")))
    assert decoding_options_from_args(hand_made) == DecodingOptions(method="sample")


def test_the_command_line_exits_2_with_one_line(capsys) -> None:
    # refused before any image or checkpoint is opened
    assert main(["caption", "no-such.jpg", "--method", "sample", "--beam-size", "1"]) == 2
    err = capsys.readouterr().err
    assert err == "captioner: error: method sample does not use beam_size (beam_size is for beam): leave it out\n"


def test_each_flag_states_its_valid_values() -> None:
    flags = {action.dest: action for action in _parser()._actions}
    assert set(VALID_VALUES) <= set(flags)  # no range for an option that is not there
    for name, words in VALID_VALUES.items():
        assert words in (flags[name].help or "")
    assert "[0.0, 1.0]" in (flags["min_confidence"].help or "")


def test_a_flag_left_out_takes_its_default() -> None:
    parser = argparse.ArgumentParser(prog="test")
    add_decoding_args(parser, leave_out=("min_confidence",))
    assert "min_confidence" not in {action.dest for action in parser._actions}
    assert decoding_options_from_args(parser.parse_args(["--beam-size", "4"])) == DecodingOptions(beam_size=4)
