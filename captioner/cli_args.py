"""Arguments every command line shares (``captioner``, ``captioner-eval``, and the commands ``training`` adds to
``captioner``): the decoding flags, ``--backend`` and ``--verbose``.

Here rather than in :mod:`captioner.cli` so that a command line in another package takes the flags without
importing the ``captioner`` command itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Collection, Sequence
from typing import Any

from captioner.backends import BACKENDS
from captioner.decoding import VALID_VALUES, DecodingOptions, check_options_apply


def add_backend_arg(
    parser: argparse.ArgumentParser, default: str = "torch", choices: tuple[str, ...] = BACKENDS
) -> None:
    """``--backend``, shared by every command that captions."""
    parser.add_argument(
        "--backend",
        default=default,
        choices=choices,
        help="torch, or onnxruntime (CPU; the 'onnx' extra; a .pt checkpoint is exported on first use and "
        "cached)"
        + ("; auto: onnxruntime on CPU when installed, else torch" if "auto" in choices else "")
        + f" (default: {default})",
    )


def add_decoding_args(parser: argparse.ArgumentParser, *, leave_out: Collection[str] = ()) -> None:
    """The decoding flags, shared by every command that captions (``captioner``, ``captioner-eval``).

    One flag per :class:`DecodingOptions` field (``max_length`` -> ``--max-length``), with its type,
    default, and help with its valid values (:data:`~captioner.decoding.VALID_VALUES`) or choices. A flag
    the method does not use (``--beam-size`` with ``--method sample``) is refused by
    :func:`decoding_options_from_args` even at its default value, as the service refuses the option: each
    flag records that it was given. An option in ``leave_out`` gets no flag, for a command it would mean nothing
    to; :func:`decoding_options_from_args` then takes its default.
    """
    types = typing.get_type_hints(DecodingOptions)
    for option in dataclasses.fields(DecodingOptions):
        if option.name in leave_out:
            continue
        hint = types[option.name]
        kind = next((t for t in typing.get_args(hint) if t is not type(None)), hint)  # int | None -> int
        described = "; ".join(filter(None, (option.metadata.get("help"), VALID_VALUES.get(option.name))))
        help_text = described.replace("%", "%%")
        if option.default is not None:
            help_text = f"{help_text} (default: %(default)s)".lstrip()
        flag = "--" + option.name.replace("_", "-")
        if kind is bool:  # a switch: --flag alone means true, --flag false turns it off
            parser.add_argument(
                flag,
                action=_DecodingFlag,
                type=_parse_bool,
                nargs="?",
                const=True,
                metavar="BOOL",
                default=option.default,
                help=help_text or None,
            )
            continue
        parser.add_argument(
            flag,
            action=_DecodingFlag,
            type=kind,
            default=option.default,
            choices=option.metadata.get("choices"),
            help=help_text or None,
        )


def _parse_bool(text: str) -> bool:
    """A switch's value (``--guided-by-tags false``); ``bool("false")`` would be True."""
    value = text.strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value in ("true", "1", "yes")


_GIVEN = "decoding_flags_given"  # the Namespace attribute listing the decoding options given as flags


class _DecodingFlag(argparse.Action):
    """Stores a decoding flag's value and records that it was given: a default value alone cannot tell."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        setattr(namespace, _GIVEN, (*getattr(namespace, _GIVEN, ()), self.dest))  # a new tuple: never shared


def decoding_options_from_args(args: argparse.Namespace) -> DecodingOptions:
    """Validated :class:`DecodingOptions` from the flags of :func:`add_decoding_args`; ``ValueError`` for a
    flag given that the method does not use (``--method sample --beam-size 3``), whatever its value."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(DecodingOptions) if hasattr(args, f.name)}
    options = DecodingOptions(**given)
    check_options_apply(options.method, getattr(args, _GIVEN, ()))
    return options


def add_verbose_arg(parser: argparse.ArgumentParser) -> None:
    """``--verbose``, for the commands that may export a model to ONNX (or train a calibration) on the way."""
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also show the output of the libraries an ONNX export uses (quiet by default) and debug lines",
    )
