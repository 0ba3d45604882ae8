"""``captioner-train`` and ``captioner-eval`` (also ``python -m training`` / ``torchrun -m training``)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import re
import sys
import time
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from captioner.checkpoint import checkpoint_arg
from captioner.cli_args import add_backend_arg, add_decoding_args, decoding_options_from_args
from captioner.errors import USER_ERRORS, one_line
from captioner.torchrun import launch_rank
from training.data import FORMATS

if TYPE_CHECKING:
    import torch

    from training.config import TrainConfig

log = logging.getLogger("training")
T = TypeVar("T")
_FIELD_COMMENT = re.compile(r"^\s+(\w+):[^#\n]*#\s*(.+)$", re.MULTILINE)


def _field_help(cls: type) -> dict[str, str]:
    """Each TrainConfig field's inline comment doubles as its --help text: one source of truth."""
    return dict(_FIELD_COMMENT.findall(inspect.getsource(cls)))


def _optional(parse: Callable[[str], T]) -> Callable[[str], T | None]:
    """``parse``, or None for ``none``/``null``/nothing: the flag of an optional config field."""

    def convert(text: str) -> T | None:
        return None if text.lower() in ("none", "null", "") else parse(text)

    convert.__name__ = parse.__name__
    return convert


def _train_field_help() -> dict[str, str]:
    """--help text for every TrainConfig key: its own fields' comments, and the decoder's (DecoderConfig's)."""
    from captioner.config import DecoderConfig
    from training.config import TrainConfig

    return {**_field_help(DecoderConfig), **_field_help(TrainConfig)}


def get_args_parser() -> argparse.ArgumentParser:
    from training.config import flat_fields

    parser = argparse.ArgumentParser(
        prog="captioner-train",
        description="Train a CNN+LSTM captioner. Flags override values from --config (YAML or JSON).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", default=None, help="YAML or JSON file of TrainConfig fields")
    helps = _train_field_help()
    for f, kind in flat_fields():
        flag = "--" + f.name.replace("_", "-")
        args = typing.get_args(kind)
        optional = isinstance(kind, types.UnionType) and type(None) in args
        base = next((a for a in args if a is not type(None)), kind) if optional else kind
        default = None if f.default is dataclasses.MISSING else f.default
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=helps.get(f.name))
        else:
            parser.add_argument(
                flag, type=_optional(base) if optional else base, default=default, help=helps.get(f.name)
            )
    return parser


def _load_config_file(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"config file not found: {path}")
    text = file.read_text()
    try:
        if file.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml and json raise their own error types
        raise ValueError(f"{path}: cannot parse config ({exc.__class__.__name__}: {one_line(exc)})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must hold a mapping of TrainConfig fields")
    return data


def parse_train_config(argv: list[str] | None = None) -> TrainConfig:
    from training.config import TrainConfig, flat_fields

    parser = get_args_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        values = _load_config_file(pre.config)
        known = {f.name for f, _ in flat_fields()}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{pre.config}: unknown config keys {unknown}; valid keys: {', '.join(sorted(known))}")
        parser.set_defaults(**values)
    args = vars(parser.parse_args(argv))
    args.pop("config")
    if not args.get("data"):
        raise ValueError("--data is required (a Flickr8k folder, a COCO captions JSON, or a Karpathy split JSON)")
    return TrainConfig.from_dict(args)


def _setup_logging() -> None:
    """INFO on the main process; under torchrun the other ranks log warnings and errors only, so the console
    shows each line once, not once per GPU."""
    level = logging.INFO if launch_rank().main else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _interrupted_message(output_dir: str | None) -> str:
    """What Ctrl-C leaves to resume from: last.pt, or (before the first save) nothing."""
    if output_dir is None:  # still reading the flags: nothing has started
        return "captioner-train: interrupted"
    if not (Path(output_dir) / "last.pt").is_file():
        return (
            f"captioner-train: interrupted before the first checkpoint: no last.pt in {output_dir} to resume from "
            "(last.pt is saved at the end of each epoch and every --checkpoint-every steps)"
        )
    return "captioner-train: interrupted; resume with --resume (last.pt holds the last saved step)"


def train_main(argv: list[str] | None = None) -> int:
    output_dir = None
    try:
        _setup_logging()  # reads torchrun's variables: values no launch sets are the user's error
        config = parse_train_config(argv)
        output_dir = config.output_dir
        from training.engine import train

        summary = train(config)
    except USER_ERRORS as exc:
        print(f"captioner-train: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(_interrupted_message(output_dir), file=sys.stderr)
        return 130
    if launch_rank().main:
        log.info("finished: %s", json.dumps(summary))
    return 0


# -- evaluation -------------------------------------------------------------------------------------


def get_eval_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="captioner-eval", description="Score a checkpoint on a data split.")
    parser.add_argument("--checkpoint", default=None, help="model checkpoint (default: the bundled default model)")
    parser.add_argument("--data", required=True, help="Flickr8k folder, COCO captions JSON, or Karpathy split JSON")
    parser.add_argument("--format", default="auto", choices=FORMATS)
    parser.add_argument("--images-dir", default=None)
    parser.add_argument("--split", default="test", help="train | val | test (a COCO file is its own split)")
    # every image's best caption is scored: an abstention would leave an image out of the metrics unseen (the
    # captions kept at a confidence are bench/confidence.py's measure)
    # guided_by_tags needs the ImageNet head's logits, which the feature cache does not keep: bench/novel_objects.py
    # scores guided captions
    add_decoding_args(parser, leave_out=("min_confidence", "guided_by_tags"))
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    parser.add_argument("--device", default="auto")
    add_backend_arg(parser)
    parser.add_argument("--cache-dir", default=".cache/features", help="feature cache folder")
    parser.add_argument("--out", default=None, help="folder for metrics.json and predictions.json")
    parser.add_argument(
        "--java",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="METEOR needs Java; default: use it when found",
    )
    parser.add_argument(
        "--caption-rules",
        choices=["checkpoint", "off"],
        default="checkpoint",
        help="decode under the checkpoint's caption rules (where a caption may start and end; "
        "captioner.caption_rules), or without them, to compare (default: checkpoint)",
    )
    parser.add_argument("--no-progress", action="store_true")
    return parser


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from captioner import Captioner
    from captioner.progress import progress_bar
    from training.data import load_corpus
    from training.evaluation import caption_shape_rates, predict_captions, score_captions
    from training.features import build_feature_cache

    if args.method == "sample" and args.seed is None:
        args.seed = 0  # a seeded default keeps sampled evaluations repeatable
    options = decoding_options_from_args(args)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    # not fused for inference: the feature cache is keyed by the encoder's weights, so an unfused encoder
    # shares the cache the training run built (eval then runs only the decoder). The onnxruntime backend's
    # features are cached apart, keyed by its encoder graph.
    model = Captioner.from_checkpoint(checkpoint_arg(args.checkpoint), device=args.device, backend=args.backend)
    if args.caption_rules == "off":
        model.caption_rules = None
    corpus = load_corpus(args.data, format=args.format, images_dir=args.images_dir)
    records = corpus.split(args.split, restval_as_train=False)
    if not records:
        raise ValueError(f"{args.data}: split {args.split!r} is empty (splits: {corpus.split_sizes()})")
    records = records[: args.limit] if args.limit else records
    store = build_feature_cache(
        model.encoder,
        [str(r.path) for r in records],
        args.cache_dir,
        device=model.device,
        progress=not args.no_progress,
    )
    bar = progress_bar(len(records), f"captioning ({args.method})", not args.no_progress)

    def batches() -> Iterator[tuple[list[int], torch.Tensor]]:  # the readable images' cached grids, batch by batch
        for first in range(0, len(records), args.batch_size):
            end = min(first + args.batch_size, len(records))
            rows = [i for i in range(first, end) if str(records[i].path) not in store.failed]
            if rows:
                yield rows, store.get(rows)
            bar.update(end - first)

    start = time.perf_counter()
    predictions = predict_captions(model, batches(), records, options)
    bar.close()
    seconds = time.perf_counter() - start
    metrics = score_captions(predictions, records, java=args.java)
    metrics.update(caption_shape_rates(predictions, corpus, model))
    report = {
        "checkpoint": str(args.checkpoint or "default"),
        "data": str(args.data),
        "split": args.split,
        "images": len(predictions),
        "skipped_unreadable": len(records) - len(predictions),
        "options": options.to_dict(),
        "decode_seconds": round(seconds, 2),
        "metrics": metrics,
    }
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(report, indent=2))
        results = [{"image_id": _coco_id(k), "caption": v} for k, v in predictions.items()]
        (out / "predictions.json").write_text(json.dumps(results, indent=1))
    return report


def _coco_id(image_id: str) -> int | str:
    return int(image_id) if image_id.isdigit() else image_id


def eval_main(argv: list[str] | None = None) -> int:
    args = get_eval_args_parser().parse_args(argv)
    try:
        _setup_logging()  # reads torchrun's variables: values no launch sets are the user's error
        report = evaluate(args)
    except USER_ERRORS as exc:
        print(f"captioner-eval: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line and the shell's status for it, never a traceback
        print("captioner-eval: interrupted", file=sys.stderr)
        return 130
    from training.metrics import format_metrics

    print(f"{report['images']} images of {report['data']} ({report['split']}), {report['options']['method']}")
    print(format_metrics(report["metrics"]))
    if args.out:
        print(f"wrote {Path(args.out) / 'metrics.json'} and {Path(args.out) / 'predictions.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
