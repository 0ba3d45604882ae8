"""``captioner`` command line: caption images with a trained checkpoint."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import typing
from collections.abc import Collection
from dataclasses import asdict
from pathlib import Path

from captioner.bulk import InputError, default_workers
from captioner.caption_rules import DEFAULT_MAX_RATE
from captioner.checkpoint import CheckpointError, checkpoint_arg
from captioner.encoders import EncoderWeightsError
from captioner.model import BACKEND_CHOICES, BACKENDS
from captioner.onnx_backend import BackendUnavailable
from captioner.onnx_export import QUANTIZE_CHOICES, ExportError
from captioner.options import VALID_VALUES, DecodingOptions, check_options_apply


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="captioner", description="Caption images with a CNN+LSTM model.")
    sub = parser.add_subparsers(dest="command", required=True)
    cap = sub.add_parser(
        "caption",
        help="caption images: files, folders, glob patterns or a list; streamed to --output and resumable",
        description="Caption images. Without --output, one line per image (path<TAB>captions, each with its "
        "confidence when the model has a confidence calibration, then <TAB>tags: ... when the model has an ImageNet "
        "head) or, with --json, one JSON document. With --output FILE (.jsonl or .csv), one record per image is "
        "written and flushed as each batch finishes; running the same command again skips the images FILE already "
        "holds. Under torchrun, each process captions its share into FILE's part files, merged at the end (or: "
        "captioner merge FILE).",
    )
    cap.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="image files, folders (searched recursively for JPEG, PNG, WebP, GIF, BMP and TIFF files) or glob "
        "patterns such as 'photos/**/*.jpg' (quoted)",
    )
    cap.add_argument(
        "--from-list",
        metavar="FILE",
        help="more inputs from a manifest: one path per line, or a column of a .csv / key of a .jsonl file",
    )
    cap.add_argument("--list-column", metavar="NAME", help="the manifest's column (default: path, image or file)")
    cap.add_argument("--output", metavar="FILE", help="write records here (.jsonl or .csv) as they are made")
    cap.add_argument(
        "--retry-errors",
        action="store_true",
        help="caption again the images --output holds error records of (they are taken out of the file first)",
    )
    cap.add_argument(
        "--checkpoint",
        default=None,
        help="model checkpoint, an ONNX export folder (with --backend onnxruntime), or 'default' (the bundled model; "
        "the default)",
    )
    add_decoding_args(cap)
    cap.add_argument("--batch-size", type=int, default=32, help="images run through the model together")
    cap.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help="threads decoding images ahead of the model; 0 decodes between batches (default: %(default)s)",
    )
    cap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    add_backend_arg(cap, default="auto", choices=BACKEND_CHOICES)
    cap.add_argument("--json", action="store_true", help="print one JSON document instead of text lines")
    cap.add_argument("--no-progress", action="store_true", help="no progress bar (there is none when not a terminal)")
    _add_verbose_arg(cap)
    merge = sub.add_parser("merge", help="merge the part files a torchrun caption run wrote into one output file")
    merge.add_argument("output", help="the run's --output; its parts are OUTPUT-STEM.part-RRRRR-of-WWWWW.EXT beside it")
    info = sub.add_parser("info", help="describe a checkpoint")
    info.add_argument("checkpoint", nargs="?", default=None, help="checkpoint file or 'default' (the default)")
    export = sub.add_parser(
        "export",
        help="write a model-only copy of a checkpoint (pt: drops optimizer state) or its ONNX graphs (onnx)",
        description="--format pt (the default) writes a model-only checkpoint file; --format onnx writes a folder "
        "with encoder.onnx, decoder_init.onnx, decoder_step.onnx and captioner.json, checked against PyTorch.",
    )
    export.add_argument("source", help="checkpoint to read (e.g. runs/x/best.pt or last.pt), or 'default'")
    export.add_argument("target", help="file to write (pt) or folder to write (onnx)")
    export.add_argument("--format", default="pt", choices=["pt", "onnx"], help="output format (default: pt)")
    export.add_argument("--half", action="store_true", help="pt: store weights in fp16 (half the size)")
    export.add_argument("--metadata", default=None, help="JSON file merged into the model's metadata")
    export.add_argument(
        "--quantize",
        default=None,
        choices=QUANTIZE_CHOICES,
        help="onnx: int8 encoder (static quantization calibrated on --calibration-images; opt-in: on the default "
        "model it cost 0.011 CIDEr on Flickr8k dev and ran the encoder about 2x faster)",
    )
    export.add_argument(
        "--calibration-images",
        nargs="+",
        default=None,
        metavar="IMG",
        help="onnx --quantize int8: photos like those the model will see (a few hundred), or folders of them",
    )
    export.add_argument(
        "--check-images",
        nargs="+",
        default=None,
        metavar="IMG",
        help="onnx: photos for the export's self-check (default: synthetic pictures)",
    )
    _add_verbose_arg(export)
    rules = sub.add_parser(
        "rules",
        help="learn where captions may start and end from a data set's training captions, into a checkpoint copy",
        description="Derive caption rules (captioner.caption_rules: words and word pairs no human caption ends on, "
        "words none starts with) from the training split of --data and write SOURCE with them to TARGET. Every "
        "decoding method then follows them. Checkpoints trained by captioner-train already carry them.",
    )
    _add_checkpoint_copy_args(rules)
    rules.add_argument(
        "--max-rate",
        type=float,
        default=DEFAULT_MAX_RATE,
        help=f"a word is ruled out when (k + 1) / (n + 2) is below this, for k endings (or starts) in n sightings "
        f"(default: {DEFAULT_MAX_RATE})",
    )
    extend = sub.add_parser(
        "extend-vocabulary",
        help="add words the model never learned (zebra, sink, broccoli...) for tag-guided captions, into a copy",
        description="Add each new word of --words to SOURCE's vocabulary with the weights of a known word used alike "
        "(captioner.vocabulary_extension: zebra <- sheep, sink <- toilet) and write the result to TARGET. Only "
        "tag-guided decoding (guided_by_tags) says a new word, for a photo whose tag names it; every other caption "
        "stays as SOURCE gives it. The bundled default model is extended already.",
    )
    extend.add_argument("source", help="checkpoint to read, or 'default'")
    extend.add_argument("target", help="checkpoint file to write (may be SOURCE itself)")
    extend.add_argument(
        "--words",
        type=Path,
        default=None,
        help="a word-transfer table as scripts/make_word_transfers.py writes it (default: the bundled one, "
        "captioner/assets/word_transfers.json)",
    )
    calibrate = sub.add_parser(
        "calibrate",
        help="fit caption confidence on a data set's held-out photos, into a checkpoint copy",
        description="Fit the confidence every caption gets (captioner.confidence: a calibrated probability that the "
        "caption reaches per-image CIDEr-D >= --threshold) on the val split of --data, with the train split as the "
        "reference for what the model's photos look like, and write SOURCE with it to TARGET. Never use the test "
        "split. Needs the train extra (scikit-learn). captioner-train does this at the end of a run.",
    )
    _add_checkpoint_copy_args(calibrate)
    calibrate.add_argument(
        "--threshold", type=float, default=0.5, help="per-image CIDEr-D a caption must reach to count as acceptable"
    )
    calibrate.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    add_backend_arg(calibrate, default="auto", choices=BACKEND_CHOICES)
    calibrate.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_verbose_arg(calibrate)
    return parser


def _add_checkpoint_copy_args(parser: argparse.ArgumentParser) -> None:
    """SOURCE, TARGET and the data a command learns from: the commands that write a checkpoint's copy with
    something learned added (``rules``, ``calibrate``)."""
    parser.add_argument("source", help="checkpoint to read, or 'default'")
    parser.add_argument("target", help="checkpoint file to write (may be SOURCE itself)")
    parser.add_argument("--data", required=True, help="Flickr8k folder, COCO captions JSON, or Karpathy split JSON")
    parser.add_argument("--data-format", default="auto", choices=["auto", "coco", "karpathy", "flickr8k"])


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

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        setattr(namespace, _GIVEN, (*getattr(namespace, _GIVEN, ()), self.dest))  # a new tuple: never shared


def decoding_options_from_args(args: argparse.Namespace) -> DecodingOptions:
    """Validated :class:`DecodingOptions` from the flags of :func:`add_decoding_args`; ``ValueError`` for a
    flag given that the method does not use (``--method sample --beam-size 3``), whatever its value."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(DecodingOptions) if hasattr(args, f.name)}
    options = DecodingOptions(**given)
    check_options_apply(options.method, getattr(args, _GIVEN, ()))
    return options


def _add_verbose_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also show the output of the libraries an ONNX export uses (quiet by default) and debug lines",
    )


def _configure_logging(verbose: bool) -> None:
    """The library's progress lines (a first-use ONNX export) and every warning on stderr; with ``verbose``,
    the library's debug lines and other libraries' INFO lines too (captioner.onnx_export.quiet_exporter)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("captioner").setLevel(logging.DEBUG if verbose else logging.INFO)


def _fail(message: str) -> int:
    print(f"captioner: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    _configure_logging(getattr(args, "verbose", False))
    from captioner.model import Captioner  # imported late so that --help stays fast

    try:
        if args.command == "info":
            model = Captioner.from_checkpoint(checkpoint_arg(args.checkpoint))
            print(json.dumps(_describe(model), indent=2))
            return 0
        if args.command == "export":
            return _export(args)
        if args.command == "rules":
            return _rules(args)
        if args.command == "calibrate":
            return _calibrate(args)
        if args.command == "extend-vocabulary":
            return _extend_vocabulary(args)
        if args.command == "merge":
            from captioner.bulk import merge_parts

            output, count = merge_parts(args.output)
            print(f"merged {count} records into {output}")
            return 0
        return _caption(args)
    except (ValueError, CheckpointError, EncoderWeightsError, BackendUnavailable, ExportError, InputError) as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:  # Ctrl-C: one line and the shell's status for it, never a traceback
        print("captioner: interrupted", file=sys.stderr)
        return 130


def _caption(args: argparse.Namespace) -> int:
    """``captioner caption``: expand the inputs, skip what --output holds, caption the rest batch by batch."""
    from captioner.bulk import (
        RecordFile,
        RunSignature,
        caption_stream,
        distributed_rank,
        expand_inputs,
        output_format,
        part_path,
        read_records,
    )
    from captioner.model import Captioner, model_id
    from captioner.progress import progress_bar

    options = decoding_options_from_args(args)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    if args.output and args.json:
        raise ValueError("--json prints to the terminal; with --output the format comes from its extension")
    if args.output:
        output_format(args.output)
    inputs = expand_inputs(args.inputs, from_list=args.from_list, column=args.list_column)
    if not inputs.paths and not inputs.missing:
        raise ValueError("no images given: name files, folders or glob patterns, or --from-list FILE")
    rank, world = distributed_rank()
    if world > 1 and not args.output:
        raise ValueError("under torchrun each process writes its share to a file: give --output")
    model = Captioner.from_checkpoint(checkpoint_arg(args.checkpoint), device=args.device, backend=args.backend)
    model.check_options(options)  # --min-confidence without a confidence model: refused before any output
    model = model.optimize_for_inference()
    group = _join_process_group(world)

    sink = None
    if args.output:
        run = RunSignature(model_id(checkpoint_arg(args.checkpoint)), options.to_dict())
        output = part_path(args.output, rank, world) if world > 1 else args.output
        sink = RecordFile(output, run, retry_errors=args.retry_errors)
        _say_what_the_file_holds(sink)
    done = sink.done if sink is not None else set()
    missing = [m for m in inputs.missing if m not in done] if rank == 0 else []
    todo = [p for p in inputs.paths[rank::world] if p not in done]
    skipped = len(inputs.paths[rank::world]) - len(todo)
    printer = _Printer(args.json, sink, options)
    if skipped:
        assert sink is not None  # only an --output file holds images already captioned
        errors = len(sink.errors & set(inputs.paths[rank::world]))
        held = f" ({errors} of them as errors: --retry-errors captions those again)" if errors else ""
        print(
            f"captioner: {skipped} images already in {sink.path}{held}; captioning the other {len(todo)}",
            file=sys.stderr,
        )
    bar = progress_bar(len(todo), None, not args.no_progress and sys.stderr.isatty())
    try:
        for records in caption_stream(model, todo, options, batch_size=args.batch_size, workers=args.workers):
            printer.emit(records)
            bar.update(len(records))
        # after the images: part r of a torchrun then still holds images r, r + N, ... first, as merging expects
        printer.emit([{"image": m, "error": _missing_reason(m)} for m in missing])
    except KeyboardInterrupt:
        if sink is None:
            raise
        bar.close()
        sink.close()  # every batch written so far is in the file; none is written in part (RecordFile.write)
        kept = len(read_records(sink.path))
        print(
            f"captioner: interrupted: {kept} records kept in {sink.path}; run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    finally:
        bar.close()
        if sink is not None:
            sink.close()
    if args.json:
        print(json.dumps({"options": options.to_dict(), "results": printer.results}, indent=2))
    if group is not None:
        _finish_distributed(args.output, rank, world)
    return 1 if printer.failed else 0


def _say_what_the_file_holds(sink) -> None:
    if sink.retried:
        print(f"captioner: {sink.retried} error records taken out of {sink.path} to caption again", file=sys.stderr)
    if sink.legacy:
        print(
            f"captioner: {sink.legacy} records in {sink.path} do not say which model and options made them "
            "(written by an earlier version); they are kept as they are",
            file=sys.stderr,
        )


def _missing_reason(item: str) -> str:
    return f"matches no file: {item}" if set("*?[") & set(item) else f"no such file: {item}"


class _Printer:
    """Where records go: the output file, or the terminal (text lines, or one JSON document at the end)."""

    def __init__(self, as_json: bool, sink, options: DecodingOptions) -> None:
        self.as_json = as_json
        self.sink = sink
        self.options = options
        self.results: list[dict] = []
        self.failed = 0

    def emit(self, records: list[dict]) -> None:
        for record in records:
            if "error" in record:
                self.failed += 1
                print(f"captioner: {record['image']}: {record['error']}", file=sys.stderr)
        if self.sink is not None:
            self.sink.write(records)
        elif self.as_json:
            self.results += records
        else:
            for record in records:
                if "captions" in record:
                    print(text_line(record, self.options), flush=True)


def text_line(record: dict, options: DecodingOptions) -> str:
    """An image's record as one line: ``path<TAB>captions``, each with its confidence when the model has a
    confidence model, then ``<TAB>tags: name 0.61, ...`` when the model has a class head. An abstained image says
    so in the captions' place: one line per image, whatever happened, so the output still reads as columns."""
    if record["abstained"]:
        captions = f"(abstained: no caption reached confidence {options.min_confidence})"
    else:
        captions = " | ".join(
            c["text"] if c["confidence"] is None else f"{c['text']} (confidence {c['confidence']:.2f})"
            for c in record["captions"]
        )
    tags = ", ".join(f"{t['name']} {t['confidence']:.2f}" for t in record["tags"])
    return f"{record['image']}\t{captions}" + (f"\ttags: {tags}" if tags else "")


def _join_process_group(world: int):
    """Under torchrun, join the gloo group (to wait for every rank before merging); None otherwise."""
    if world == 1:
        return None
    from datetime import timedelta

    import torch.distributed as dist

    # ranks may finish hours apart: the barrier at the end must outwait the slowest
    dist.init_process_group("gloo", timeout=timedelta(days=7))
    return dist.group.WORLD


def _finish_distributed(output: str, rank: int, world: int) -> None:
    import torch.distributed as dist

    from captioner.bulk import merge_parts

    dist.barrier()
    if rank == 0:
        try:
            merged, count = merge_parts(output, world_size=world)
            print(f"captioner: merged {count} records from {world} part files into {merged}", file=sys.stderr)
        except InputError as exc:  # parts on other machines' disks
            print(
                f"captioner: not merged ({exc}); gather the part files, then: captioner merge {output}", file=sys.stderr
            )
    dist.barrier()
    dist.destroy_process_group()


def _export(args: argparse.Namespace) -> int:
    from captioner.encoders import file_sha256
    from captioner.model import DEFAULT_CHECKPOINT, Captioner

    source = checkpoint_arg(args.source)
    model = Captioner.from_checkpoint(source)
    if args.metadata:
        model.metadata = _merge(model.metadata, _read_json_mapping(args.metadata))
    if args.format == "pt":
        if args.quantize or args.calibration_images or args.check_images:
            raise ValueError("--quantize, --calibration-images and --check-images apply to --format onnx")
        model.save(args.target, half=args.half)
        print(f"wrote {args.target} ({os.path.getsize(args.target) / 1e6:.1f} MB)")
        return 0
    if args.half:
        raise ValueError("--half applies to --format pt (use --quantize int8 for a smaller ONNX encoder)")
    if args.calibration_images and not args.quantize:
        raise ValueError("--calibration-images needs --quantize int8")
    if args.quantize and not args.calibration_images:
        raise ValueError("--quantize int8 needs --calibration-images: a few hundred photos like those you will caption")
    from captioner.onnx_backend import require_onnxruntime
    from captioner.onnx_export import export_onnx

    require_onnxruntime()
    path = source if source is not None else DEFAULT_CHECKPOINT
    print(f"exporting {path} to {args.target} (ONNX) and checking it against PyTorch ...", file=sys.stderr)
    report = export_onnx(
        model,
        args.target,
        source=str(path),
        source_sha256=file_sha256(path),
        quantize=args.quantize,
        calibration_images=_image_paths(args.calibration_images),
        check_images=_image_paths(args.check_images),
    )
    for name, size in report.files.items():
        print(f"wrote {report.out_dir / name} ({size / 1e6:.1f} MB)")
    check = report.check
    print(
        f"check passed on {check['images']} images: features differ by at most {check['feature_max_abs_diff']:.1e}, "
        f"logits by at most {check['logit_max_abs_diff']:.1e}; beam-3 captions identical "
        f"{check['beam3_captions_identical']}"
    )
    return 0


def _image_paths(items: list[str] | None) -> list[str] | None:
    """Image files named directly or found (sorted, recursively) in the folders named."""
    if not items:
        return None
    from captioner.bulk import expand_inputs

    found = expand_inputs(items)
    if found.missing:
        raise ValueError(f"no such file or folder: {found.missing[0]}")
    if not found.paths:
        raise ValueError(f"no images in {', '.join(items)}")
    return found.paths


def _read_json_mapping(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read metadata {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: metadata must be a JSON object")
    return data


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = (
            _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


def _describe(model) -> dict:
    """What ``captioner info`` prints: the model's parts, what it was trained with, and what its captions come with
    (tags need the encoder's ImageNet head; confidence and ``--min-confidence`` need a confidence model)."""
    rules = model.caption_rules
    confidence = model.confidence_model
    return {
        "encoder": model.encoder.identity(),
        "decoder": asdict(model.decoder.config),
        "vocab_size": len(model.vocab),
        "preprocess": model.encoder.preprocess.to_dict(),
        "caption_rules": None
        if rules is None
        else {
            "no_end_words": len(rules.no_end),
            "no_end_pairs": len(rules.no_end_pairs),
            "no_start_words": len(rules.no_start),
            "max_rate": rules.max_rate,
        },
        "class_head": model.encoder.classifier is not None,
        "confidence_model": None
        if confidence is None
        else {"target": confidence.target, "signals": confidence.described_signals, "fitted_on": confidence.fitted_on},
        # words only tag-guided decoding says (captioner.vocabulary_extension), each with its source word
        "vocabulary_extension": dict(model.vocabulary_extension.sources) if model.vocabulary_extension else None,
        "metadata": model.metadata,
    }


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


def _extend_vocabulary(args: argparse.Namespace) -> int:
    """``captioner extend-vocabulary``: the checkpoint with new words (decoder weights kept in their dtype)."""
    import torch

    from captioner.checkpoint import load_checkpoint, save_checkpoint
    from captioner.model import Captioner, default_checkpoint
    from captioner.vocabulary_extension import WORD_TRANSFERS_FILE, extend_vocabulary, load_word_transfers

    source = checkpoint_arg(args.source)
    data = load_checkpoint(default_checkpoint() if source is None else source)
    model = Captioner.from_state(data, source=str(args.source))
    transfers = load_word_transfers(args.words or WORD_TRANSFERS_FILE)
    added = extend_vocabulary(model, transfers)
    half = next(iter(data["decoder_state"].values())).dtype == torch.float16
    payload = model.state_payload(half=half)
    for key in ("config", "vocab", "decoder_state", "caption_rules", "vocabulary_extension"):
        data[key] = payload[key]
    # the optimizer state is shaped for the old vocabulary: the copy is a model to serve or fine-tune, not to resume
    resumable = data.pop("training", None) is not None
    save_checkpoint(args.target, data)
    total = len(model.vocabulary_extension or ())
    print(f"{args.target}: {len(added)} words added ({total} in all, {len(model.vocab)} in the vocabulary)")
    if added:
        print("  " + ", ".join(f"{word} <- {transfers[word]}" for word in added))
    if resumable and added:
        print(
            "  (its training state was left out: the optimizer's was shaped for the old vocabulary; --resume the "
            "source instead)"
        )
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
