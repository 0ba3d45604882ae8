"""The request and response option models are made from DecodingOptions' fields, plus the service's attention."""

from __future__ import annotations

import dataclasses

import pytest
from pydantic import ValidationError

from captioner.decoding import APPLIES_TO, DecodingOptions
from captioner.options import RANGES, VALID_VALUES
from service.schemas import OPTION_NAMES, AppliedOptions, CaptionOptions, option_range

FIELDS = dataclasses.fields(DecodingOptions)


def test_request_options_are_the_library_options_then_attention() -> None:
    assert tuple(OPTION_NAMES) == (*(option.name for option in FIELDS), "attention")
    defaults = CaptionOptions()
    assert defaults.decoding_options() == DecodingOptions()
    assert defaults.attention is False
    for option in FIELDS:
        description = CaptionOptions.model_fields[option.name].description
        assert description.startswith(option.metadata.get("help", ""))
        assert description.endswith(option_range(option.name))


def test_request_options_keep_the_library_ranges() -> None:
    for name, value in [("max_length", 0), ("beam_size", 21), ("temperature", 0), ("top_p", 1.5), ("seed", -1)]:
        with pytest.raises(ValidationError):
            CaptionOptions(**{name: value})
    with pytest.raises(ValidationError):
        CaptionOptions(method="best")


def test_applied_options_require_only_what_every_method_uses() -> None:
    required = {name for name, info in AppliedOptions.model_fields.items() if info.is_required()}
    assert required == {option.name for option in FIELDS if option.name not in APPLIES_TO} | {"attention"}
    for method in ("greedy", "sample", "beam"):
        options = DecodingOptions(method=method)
        applied = AppliedOptions(**options.to_dict(), attention=False).model_dump()
        assert applied == {**{k: v for k, v in options.to_dict().items() if v is not None}, "attention": False}


def test_an_option_the_request_names_is_refused_when_its_method_does_not_use_it() -> None:
    # query parameters and form fields arrive as strings; what the request named is model_fields_set
    for given in ({"method": "sample", "beam_size": "3"}, {"method": "greedy", "num_captions": "1"}):
        options = CaptionOptions.model_validate(given)
        with pytest.raises(ValueError, match=f"method {given['method']} does not use "):
            options.decoding_options()
    # the same values left to their defaults, the options the method uses, and attention (every method) pass
    assert CaptionOptions.model_validate({"method": "sample"}).decoding_options() == DecodingOptions(method="sample")
    beam = CaptionOptions.model_validate({"method": "beam", "beam_size": "3", "attention": "true"})
    assert beam.decoding_options() == DecodingOptions(method="beam", beam_size=3)
    greedy = CaptionOptions.model_validate({"method": "greedy", "max_length": "20", "attention": "true"})
    assert greedy.decoding_options() == DecodingOptions(method="greedy")


_SCHEMA_KEYWORDS = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum"}


def _number_schema(name: str) -> dict:
    """The JSON Schema of option ``name``'s number (``seed``'s is one branch of an anyOf with null)."""
    schema = CaptionOptions.model_json_schema()["properties"][name]
    branches = [branch for branch in schema.get("anyOf", [schema]) if branch.get("type") in ("integer", "number")]
    assert len(branches) == 1, schema
    return branches[0]


def test_the_schema_bounds_and_words_are_the_librarys() -> None:
    """Every bound the API documents and enforces is captioner.options' own, for every option with a range."""
    assert RANGES  # the loop below checks something
    for option in FIELDS:
        assert option_range(option.name) == VALID_VALUES[option.name]
        schema = _number_schema(option.name) if option.name in RANGES else {}
        bounds = {key: value for key, value in schema.items() if key in _SCHEMA_KEYWORDS.values()}
        expected = RANGES[option.name].constraints() if option.name in RANGES else {}
        assert bounds == {_SCHEMA_KEYWORDS[key]: value for key, value in expected.items()}, option.name


@pytest.mark.parametrize("name", list(RANGES))
def test_the_request_accepts_what_the_library_accepts_at_each_bound(name: str) -> None:
    valid = RANGES[name]
    step = 1 if valid.integer else 1e-6
    values = [valid.low - step, valid.low, valid.low + step]
    if valid.high is not None:
        values += [valid.high - step, valid.high, valid.high + step]
    for value in values:
        if valid.contains(value):
            assert getattr(CaptionOptions(**{name: value}), name) == value
        else:
            with pytest.raises(ValidationError):
                CaptionOptions(**{name: value})
