"""The decoding options and their valid values: the one definition every front end reads.

:class:`DecodingOptions` checks itself; the ``captioner`` and ``captioner-eval`` flags, the service's request
schema (its bounds, descriptions and 422 messages) and the HTTP client are all made from its fields, their
metadata and :data:`VALID_VALUES`, so a range is written once and every front end refuses the same values with
the same words. Standard library only: the HTTP client imports this without torch or numpy.
"""

from __future__ import annotations

import numbers
import typing
from collections.abc import Iterable
from dataclasses import Field, asdict, dataclass, field, fields
from typing import Any

METHODS = ("greedy", "sample", "beam")

# The bounds of the ranged options, as plain numbers for callers that want them (each is read into a Range below).
MAX_LENGTH_RANGE = (1, 100)
BEAM_SIZE_RANGE = (1, 20)
NUM_CAPTIONS_RANGE = (1, 20)
LENGTH_PENALTY_RANGE = (0.0, 5.0)
TEMPERATURE_MAX = 10.0
MIN_CONFIDENCE_RANGE = (0.0, 1.0)
# A seed is a non-negative signed 64-bit integer: what every random generator the runtimes use takes as it is
# (torch.Generator.manual_seed, numpy), so one seed means the same draws wherever it is given.
SEED_RANGE = (0, 2**63 - 1)
SEED_MAX = SEED_RANGE[1]


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric option: ``low`` up to ``high`` (None: no upper bound), ``low`` itself
    excluded when ``low_open``. An integer option takes ints only; a number option any real number, an int too.

    It states itself three ways, so no front end writes a bound again: in words (:meth:`words`, for help texts
    and error messages), as a check (:meth:`check`) and as JSON Schema's keywords (:meth:`constraints`).
    """

    low: float
    high: float | None = None
    integer: bool = False
    low_open: bool = False
    note: str = ""  # what a special value means ("0 keeps all"), for help texts

    def limits(self) -> str:
        """The bounds alone: ``in [1, 20]``, ``in (0, 10.0]``, ``>= 0``."""
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}]"

    def words(self) -> str:
        """The valid values in words, for help texts: ``an integer in [1, 20]``, ``a number in (0, 1]``."""
        kind = "an integer" if self.integer else "a number"
        return f"{kind} {self.limits()}" + (f" ({self.note})" if self.note else "")

    def contains(self, value: object) -> bool:
        """Whether ``value`` is valid: of the right kind (never a bool) and within the bounds (never NaN)."""
        # ints only for an integer (as before: numpy's are refused, JSON could not write them); any real number else
        kind = int if self.integer else numbers.Real
        if isinstance(value, bool) or not isinstance(value, kind):
            return False
        # an int compared exactly (2**63 - 1 is no float); NaN is within no bounds
        number = value if isinstance(value, int) else float(value)
        above = number > self.low if self.low_open else number >= self.low
        return above and (self.high is None or number <= self.high)

    def check(self, name: str, value: object) -> None:
        """Raise ``ValueError`` naming the valid values when ``value`` is not one of them."""
        if not self.contains(value):
            # the kind is named for integers only: a number option takes any number within the bounds
            limits = f"an integer {self.limits()}" if self.integer else self.limits()
            raise ValueError(f"{name} must be {limits}, got {value!r}")

    def constraints(self) -> dict[str, float]:
        """The bounds as pydantic's ``Field`` keywords (JSON Schema's ``minimum``, ``exclusiveMinimum``, ...)."""
        bounds = {"gt" if self.low_open else "ge": self.low}
        if self.high is not None:
            bounds["le"] = self.high
        return bounds


# The methods each option is for (max_length and method are for all). Set on another method, an option
# would be silently ignored: it is an error instead (see check_options_apply).
APPLIES_TO = {
    "beam_size": ("beam",),
    "length_penalty": ("beam",),
    "temperature": ("sample",),
    "top_k": ("sample",),
    "top_p": ("sample",),
    "num_captions": ("sample", "beam"),
    "seed": ("sample",),
    "guided_by_tags": ("beam",),
}


def check_options_apply(method: str, given: Iterable[str]) -> None:
    """Raise ``ValueError`` for any option in ``given`` that ``method`` does not use, whatever its value.

    ``given`` names the options the caller set explicitly (flags, query parameters or form fields, keyword
    arguments); options every method uses, and names that are not decoding options (the service's
    ``attention``), pass. Every front end calls this, so ``--method sample --beam-size 3`` is refused
    although 3 is ``beam_size``'s default. :class:`DecodingOptions` cannot tell a default from a value set
    to it, so on its own it refuses only values other than the default.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    names = set(given)
    unused = [name for name, methods in APPLIES_TO.items() if name in names and method not in methods]
    if unused:
        uses = "; ".join(f"{name} is for {' and '.join(APPLIES_TO[name])}" for name in unused)
        raise ValueError(f"method {method} does not use {', '.join(unused)} ({uses}): leave it out")


@dataclass(frozen=True)
class DecodingOptions:
    """How to turn image features into words. Invalid values raise ``ValueError`` naming the valid values.

    Every front end (the ``captioner`` and ``captioner-eval`` flags, the service's ``/caption`` options, the
    HTTP client) is made from these fields: their names, types and defaults, and each field's ``metadata``:
    ``help``, what it does in a few words (the front end adds the valid values), and ``range`` (a
    :class:`Range`) or ``choices``, its valid values.
    """

    method: str = field(default="beam", metadata={"choices": METHODS})
    max_length: int = field(  # the end token not counted
        default=20, metadata={"help": "most words per caption", "range": Range(*MAX_LENGTH_RANGE, integer=True)}
    )
    beam_size: int = field(
        default=3, metadata={"help": "beams per image (beam)", "range": Range(*BEAM_SIZE_RANGE, integer=True)}
    )
    length_penalty: float = field(
        default=0.0,
        metadata={
            "help": "beam ranking by log_prob / (words + 1) ** length_penalty",
            "range": Range(*LENGTH_PENALTY_RANGE),
        },
    )
    temperature: float = field(
        default=1.0,
        metadata={"help": "softmax temperature (sample)", "range": Range(0, TEMPERATURE_MAX, low_open=True)},
    )
    top_k: int = field(
        default=0,
        metadata={"help": "sample from the k likeliest words", "range": Range(0, integer=True, note="0 keeps all")},
    )
    # nucleus: sample from the smallest set of likeliest words holding this much probability
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling", "range": Range(0, 1, low_open=True)})
    num_captions: int = field(  # sample: independent draws; beam: the best beams
        default=1,
        metadata={
            "help": "captions returned (sample: draws, beam: best beams, <= beam_size)",
            "range": Range(*NUM_CAPTIONS_RANGE, integer=True),
        },
    )
    seed: int | None = field(  # None: unseeded
        default=None,
        metadata={"help": "same seed, same samples (sample)", "range": Range(*SEED_RANGE, integer=True)},
    )
    # Captions whose calibrated confidence is below this are left out; none left: the result abstains (its tags
    # stay). 0 never abstains. Needs a model with a confidence model (captioner.confidence).
    min_confidence: float = field(
        default=0.0,
        metadata={
            "help": "abstain below this caption confidence",
            "range": Range(*MIN_CONFIDENCE_RANGE, note="0 never abstains; above 0 needs a calibrated model"),
        },
    )
    # Make the caption name a confident image tag when the plain caption is unsure (captioner.guidance): constrained
    # beam search over the tag's caption words. Needs a model with the ImageNet head.
    guided_by_tags: bool = field(default=False, metadata={"help": "name a confident tag in the caption (beam)"})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {', '.join(METHODS)}")
        for name, valid in RANGES.items():
            value = getattr(self, name)
            if value is not None or _FIELD_DEFAULTS[name] is not None:  # None is valid where it is the default
                valid.check(name, value)
        if not isinstance(self.guided_by_tags, bool):
            raise ValueError(f"guided_by_tags must be true or false, got {self.guided_by_tags!r}")
        if self.method == "greedy" and self.num_captions != 1:
            raise ValueError("greedy decoding gives one caption per image; use method sample or beam for more")
        if self.method == "beam" and self.num_captions > self.beam_size:
            raise ValueError(f"num_captions must be <= beam_size ({self.beam_size}) for beam search")
        # Only a value other than the default is known to be set here; the front ends, which know what the
        # caller gave, refuse a default value given explicitly too (check_options_apply).
        changed = [name for name in APPLIES_TO if getattr(self, name) != _FIELD_DEFAULTS[name]]
        check_options_apply(self.method, changed)

    def applies(self, name: str) -> bool:
        """Whether option ``name`` does anything for this method."""
        return self.method in APPLIES_TO.get(name, METHODS)

    def to_dict(self) -> dict[str, Any]:
        """The options this method uses (what a caption was made with), by name."""
        return {name: value for name, value in asdict(self).items() if self.applies(name)}


_FIELD_DEFAULTS = {f.name: f.default for f in fields(DecodingOptions)}
# The ranged options' valid values, by name, in field order: what DecodingOptions checks and the service's schema
# bounds.
RANGES: dict[str, Range] = {f.name: f.metadata["range"] for f in fields(DecodingOptions) if "range" in f.metadata}


def _valid_values(option: Field[Any], hint: object) -> str | None:
    """An option's valid values in words: its choices, its range, or a switch's two values; None: nothing to say."""
    if "choices" in option.metadata:
        return f"one of {', '.join(option.metadata['choices'])}"
    if "range" in option.metadata:
        return str(option.metadata["range"].words())
    return "true or false" if hint is bool else None


_HINTS = typing.get_type_hints(DecodingOptions)
# Each option's valid values in words, by name, for help texts, the API's descriptions and its error messages
# (DecodingOptions.__post_init__ enforces them).
VALID_VALUES: dict[str, str] = {
    option.name: words for option in fields(DecodingOptions) if (words := _valid_values(option, _HINTS[option.name]))
}
