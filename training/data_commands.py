"""``captioner rules`` and ``captioner calibrate``: the ``captioner`` commands that learn from a data set.

Each reads ``--data`` with training's data formats (:mod:`training.data`) and writes a copy of a checkpoint with
what it learned added: caption rules (:mod:`captioner.caption_rules`), or a confidence model
(:mod:`training.calibration`). The library cannot hold them (``captioner`` never imports ``training``), so they are
added to its command line as :class:`captioner.cli.Command` values: :func:`main` is the whole ``captioner``
command, the library's commands and these two, and is what the ``captioner`` console script runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from captioner import cli
from captioner.backends import BACKEND_CHOICES
from captioner.caption_rules import DEFAULT_MAX_RATE
from captioner.checkpoint import checkpoint_arg
from captioner.cli_args import add_backend_arg, add_verbose_arg
from training.data import FORMATS


def _add_checkpoint_copy_args(parser: argparse.ArgumentParser) -> None:
    """SOURCE, TARGET and the data a command learns from."""
    parser.add_argument("source", help="checkpoint to read, or 'default'")
    parser.add_argument("target", help="checkpoint file to write (may be SOURCE itself)")
    parser.add_argument("--data", required=True, help="Flickr8k folder, COCO captions JSON, or Karpathy split JSON")
    parser.add_argument("--data-format", default="auto", choices=FORMATS)


def _add_rules_arguments(parser: argparse.ArgumentParser) -> None:
    _add_checkpoint_copy_args(parser)
    parser.add_argument(
        "--max-rate",
        type=float,
        default=DEFAULT_MAX_RATE,
        help=f"a word is ruled out when (k + 1) / (n + 2) is below this, for k endings (or starts) in n sightings "
        f"(default: {DEFAULT_MAX_RATE})",
    )


def _rules(args: argparse.Namespace) -> int:
    """``captioner rules``: the checkpoint as it is (weights, dtype, training state), plus caption rules."""
    from captioner.caption_rules import CaptionRules
    from captioner.checkpoint import load_checkpoint, save_checkpoint
    from captioner.model import Captioner, default_checkpoint
    from training.data import load_corpus

    source = checkpoint_arg(args.source)
    data = load_checkpoint(default_checkpoint() if source is None else source)
    Captioner.from_state(data, source=str(args.source))  # the checkpoint is one this code can run
    corpus = load_corpus(args.data, format=args.data_format)
    captions = corpus.train_captions()
    if not captions:
        raise ValueError(f"{args.data}: no training captions (splits: {corpus.split_sizes()})")
    rules = CaptionRules.learn(captions, max_rate=args.max_rate)
    data["caption_rules"] = rules.to_dict()
    data["metadata"] = {
        **(data.get("metadata") or {}),
        "caption_rules_from": {"data": Path(args.data).name, "captions": len(captions)},
    }
    save_checkpoint(args.target, data)
    print(
        f"{args.target}: captions may not end on {len(rules.no_end)} words or {len(rules.no_end_pairs)} word pairs, "
        f"nor start with {len(rules.no_start)} words (learned from {len(captions):,} training captions)"
    )
    return 0


def _add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    _add_checkpoint_copy_args(parser)
    parser.add_argument(
        "--threshold", type=float, default=0.5, help="per-image CIDEr-D a caption must reach to count as acceptable"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    add_backend_arg(parser, default="auto", choices=BACKEND_CHOICES)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_verbose_arg(parser)


def _calibrate(args: argparse.Namespace) -> int:
    """``captioner calibrate``: the checkpoint as it is, plus a confidence model fitted on --data."""
    try:
        from training.calibration import CalibrationSettings, calibrate_checkpoint
    except ImportError as error:  # the train extra (scikit-learn) is not installed
        raise ValueError(f"captioner calibrate needs the train extra (pip install 'captioner[train]'): {error}") from (
            error
        )

    confidence = calibrate_checkpoint(
        checkpoint_arg(args.source),
        args.target,
        args.data,
        data_format=args.data_format,
        settings=CalibrationSettings(threshold=args.threshold),
        backend=args.backend,
        device=args.device,
        progress=not args.no_progress,
    )
    fitted = confidence.fitted_on
    checked = fitted.get("cross_validated", {})
    print(
        f"{args.target}: caption confidence fitted on {fitted['held_out_photos']:,} held-out photos "
        f"({fitted['acceptable_share']:.1%} acceptable: {confidence.target}); "
        f"{checked.get('folds', 0)}-fold: calibration error {checked.get('calibration_error', float('nan')):.3f}, "
        f"Spearman with CIDEr-D {checked.get('spearman_with_cider', float('nan')):.2f}"
    )
    return 0


RULES = cli.Command(
    name="rules",
    help="learn where captions may start and end from a data set's training captions, into a checkpoint copy",
    description="Derive caption rules (captioner.caption_rules: words and word pairs no human caption ends on, "
    "words none starts with) from the training split of --data and write SOURCE with them to TARGET. Every "
    "decoding method then follows them. Checkpoints trained by captioner-train already carry them.",
    add_arguments=_add_rules_arguments,
    run=_rules,
)

CALIBRATE = cli.Command(
    name="calibrate",
    help="fit caption confidence on a data set's held-out photos, into a checkpoint copy",
    description="Fit the confidence every caption gets (captioner.confidence: a calibrated probability that the "
    "caption reaches per-image CIDEr-D >= --threshold) on the val split of --data, with the train split as the "
    "reference for what the model's photos look like, and write SOURCE with it to TARGET. Never use the test "
    "split. Needs the train extra (scikit-learn). captioner-train does this at the end of a run.",
    add_arguments=_add_calibrate_arguments,
    run=_calibrate,
)

DATA_COMMANDS = (RULES, CALIBRATE)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``captioner`` command: the library's commands (:func:`captioner.cli.main`) with ``rules`` and
    ``calibrate``."""
    return cli.main(argv, commands=DATA_COMMANDS)


if __name__ == "__main__":
    sys.exit(main())
