"""``captioner`` command line: caption images with a trained checkpoint.

The library's commands are here. Commands another package adds (``training`` adds ``rules`` and ``calibrate``, which
learn from a data set) come in as :class:`Command` values to :func:`main`, so this module never imports them: the
console script runs ``training.data_commands.main``, which passes them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captioner.backends import BACKEND_CHOICES, torch_available
from captioner.bulk import InputError, RecordFile, default_workers
from captioner.checkpoint import checkpoint_arg
from captioner.cli_args import add_backend_arg, add_decoding_args, add_verbose_arg, decoding_options_from_args
from captioner.decoding import DecodingOptions
from captioner.errors import USER_ERRORS, one_line
from captioner.export_format import QUANTIZE_CHOICES
from captioner.loading import TORCH_HINT
from captioner.onnx_backend import BackendUnavailable
from captioner.torchrun import launch_rank

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from captioner.model import Captioner


@dataclass(frozen=True)
class Command:
    """A subcommand another package adds to ``captioner``."""

    name: str  # what follows ``captioner`` on the command line
    help: str  # its line in ``captioner --help``
    description: str  # what ``captioner NAME --help`` says first
    add_arguments: Callable[[argparse.ArgumentParser], None]  # its arguments, on the subparser made for it
    run: Callable[[argparse.Namespace], int]  # the exit status; raises USER_ERRORS for the user's mistakes


def get_args_parser(commands: Sequence[Command] = ()) -> argparse.ArgumentParser:
    """The library's commands, then ``commands``."""
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
    add_verbose_arg(cap)
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
        help="onnx: int8-decoder stores the decoder's weights in int8 (no calibration; on the default model a "
        "decoder step ran about 3x faster, Flickr8k test CIDEr +0.0006); int8 also the encoder (static quantization "
        "calibrated on --calibration-images; it cost 0.004-0.006 CIDEr on Flickr8k dev and test)",
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
        help="onnx: photos for the export's self-check (default: synthetic pictures; with --quantize int8, the first "
        "four calibration photos)",
    )
    add_verbose_arg(export)
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
    for command in commands:
        command.add_arguments(sub.add_parser(command.name, help=command.help, description=command.description))
    return parser


def _configure_logging(verbose: bool) -> None:
    """The library's progress lines (a first-use ONNX export) and every warning on stderr; with ``verbose``,
    the library's debug lines and other libraries' INFO lines too (captioner.onnx_export.quiet_exporter)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("captioner").setLevel(logging.DEBUG if verbose else logging.INFO)


def _fail(message: str) -> int:
    print(f"captioner: error: {message}", file=sys.stderr)
    return 2


# The commands that read or write a .pt checkpoint's weights (and those training adds): torch's, not the runtime's.
NEEDS_TORCH = frozenset({"info", "export", "extend-vocabulary"})


def main(argv: Sequence[str] | None = None, *, commands: Sequence[Command] = ()) -> int:
    """Run ``captioner ARGV`` with the library's commands and ``commands``; the exit status."""
    args = get_args_parser(commands).parse_args(argv)
    _configure_logging(getattr(args, "verbose", False))
    added = {command.name: command for command in commands}
    try:
        if (args.command in added or args.command in NEEDS_TORCH) and not torch_available():
            raise BackendUnavailable(f"captioner {args.command} needs torch, which this install lacks: {TORCH_HINT}")
        if args.command in added:
            return added[args.command].run(args)
        if args.command == "info":
            from captioner.model import Captioner  # reads the .pt checkpoint: needs torch

            model = Captioner.from_checkpoint(checkpoint_arg(args.checkpoint))
            print(json.dumps(_describe(model), indent=2))
            return 0
        if args.command == "export":
            return _export(args)
        if args.command == "extend-vocabulary":
            return _extend_vocabulary(args)
        if args.command == "merge":
            from captioner.bulk import merge_parts

            output, count = merge_parts(args.output)
            print(f"merged {count} records into {output}")
            return 0
        return _caption(args)
    except USER_ERRORS as exc:
        return _fail(one_line(exc))
    except KeyboardInterrupt:  # Ctrl-C: one line and the shell's status for it, never a traceback
        print("captioner: interrupted", file=sys.stderr)
        return 130


def _caption(args: argparse.Namespace) -> int:
    """``captioner caption``: expand the inputs, skip what --output holds, caption the rest batch by batch."""
    from captioner.bulk import (
        RecordFile,
        RunSignature,
        caption_stream,
        expand_inputs,
        output_format,
        part_path,
        read_records,
    )
    from captioner.default_model import model_id
    from captioner.loading import load_captioner
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
    launch = launch_rank()
    rank, world = launch.rank, launch.world
    if world > 1 and not args.output:
        raise ValueError("under torchrun each process writes its share to a file: give --output")
    model = load_captioner(checkpoint_arg(args.checkpoint), device=args.device, backend=args.backend)
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


def _say_what_the_file_holds(sink: RecordFile) -> None:
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

    def __init__(self, as_json: bool, sink: RecordFile | None, options: DecodingOptions) -> None:
        self.as_json = as_json
        self.sink = sink
        self.options = options
        self.results: list[dict[str, Any]] = []
        self.failed = 0

    def emit(self, records: list[dict[str, Any]]) -> None:
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


def text_line(record: dict[str, Any], options: DecodingOptions) -> str:
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


def _join_process_group(world: int) -> ProcessGroup | None:
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
    calibrated = args.quantize is not None and "encoder" in QUANTIZE_CHOICES[args.quantize]  # what calibration is for
    if args.calibration_images and not calibrated:
        raise ValueError("--calibration-images needs --quantize int8")
    if calibrated and not args.calibration_images:
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


def _describe(model: Captioner) -> dict[str, Any]:
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


if __name__ == "__main__":
    sys.exit(main())
