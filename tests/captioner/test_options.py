"""captioner.options: the one definition of the decoding options' valid values, the seed limit included."""

from __future__ import annotations

import dataclasses
import math
import re
import typing

import pytest

from captioner.cli import main
from captioner.options import RANGES, SEED_MAX, VALID_VALUES, DecodingOptions, Range

FIELDS = dataclasses.fields(DecodingOptions)
HINTS = typing.get_type_hints(DecodingOptions)
SEED_WORDS = f"an integer in [0, {2**63 - 1}]"


def _numeric(hint: object) -> bool:
    kinds = set(typing.get_args(hint)) - {type(None)} or {hint}
    return bool(kinds & {int, float})


def test_every_option_states_its_valid_values_and_every_number_has_a_range() -> None:
    assert [name for name in VALID_VALUES] == [option.name for option in FIELDS]  # all of them, in field order
    assert set(RANGES) == {option.name for option in FIELDS if _numeric(HINTS[option.name])}
    for name, valid in RANGES.items():
        assert VALID_VALUES[name] == valid.words()


def test_the_seed_limit_is_a_non_negative_signed_64_bit_integer() -> None:
    assert SEED_MAX == 2**63 - 1 and VALID_VALUES["seed"] == SEED_WORDS
    for seed in (None, 0, SEED_MAX):
        assert DecodingOptions(method="sample", seed=seed).seed == seed
    for seed in (-1, SEED_MAX + 1, 1.0, True, "7"):
        with pytest.raises(ValueError, match=rf"^seed must be {re.escape(SEED_WORDS)}, got {re.escape(repr(seed))}$"):
            DecodingOptions(method="sample", seed=seed)


def test_the_command_line_refuses_a_seed_out_of_range_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    for seed in (-1, SEED_MAX + 1):
        # refused before the image or a checkpoint is opened
        assert main(["caption", "no-such.jpg", "--method", "sample", "--seed", str(seed)]) == 2
        assert capsys.readouterr().err == f"captioner: error: seed must be {SEED_WORDS}, got {seed}\n"


@pytest.mark.parametrize(
    ("valid", "inside", "outside"),
    [
        (Range(1, 20, integer=True), [1, 20], [0, 21, 2.0, True, None, "3"]),
        (Range(0, 10.0, low_open=True), [1e-9, 1, 10.0], [0, 0.0, -1, 10.5, math.nan, True, "1"]),
        (Range(0, integer=True), [0, 10**30], [-1, 0.5]),
    ],
)
def test_a_range_takes_its_kind_within_its_bounds(valid: Range, inside: list[object], outside: list[object]) -> None:
    for value in inside:
        assert valid.contains(value), value
        valid.check("x", value)
    for value in outside:
        assert not valid.contains(value), value
        with pytest.raises(ValueError, match=r"^x must be "):
            valid.check("x", value)


def test_a_range_states_itself_in_words_and_as_schema_bounds() -> None:
    assert Range(1, 20, integer=True).words() == "an integer in [1, 20]"
    assert Range(0, 10.0, low_open=True).words() == "a number in (0, 10.0]"
    assert Range(0, integer=True, note="0 keeps all").words() == "an integer >= 0 (0 keeps all)"
    assert Range(1, 20, integer=True).constraints() == {"ge": 1, "le": 20}
    assert Range(0, 10.0, low_open=True).constraints() == {"gt": 0, "le": 10.0}
    assert Range(0, integer=True).constraints() == {"ge": 0}
