"""``captioner`` command line: caption images with a trained checkpoint."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import asdict

from captioner.checkpoint import CheckpointError
from captioner.decoding import DecodingOptions
from captioner.encoders import EncoderWeightsError
from captioner.transforms import ImageError, load_image


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="captioner", description="Caption images with a CNN+LSTM model.")
    sub = parser.add_subparsers(dest="command", required=True)
    cap = sub.add_parser("caption", help="caption one or more images")
    cap.add_argument("images", nargs="+", metavar="IMG", help="image files (JPEG, PNG, GIF, WebP, ...)")
    cap.add_argument("--checkpoint", default=None, help="model checkpoint (default: the bundled default model)")
    add_decoding_args(cap)
    cap.add_argument("--batch-size", type=int, default=32, help="images run through the model together")
    cap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    cap.add_argument("--json", action="store_true", help="print one JSON document instead of text lines")
    info = sub.add_parser("info", help="describe a checkpoint")
    info.add_argument("checkpoint", nargs="?", default=None)
    export = sub.add_parser("export", help="write a model-only copy of a checkpoint (drops optimizer state)")
    export.add_argument("source", help="checkpoint to read (e.g. runs/x/best.pt or last.pt)")
    export.add_argument("target", help="file to write")
    export.add_argument("--half", action="store_true", help="store weights in fp16 (half the size)")
    export.add_argument("--metadata", default=None, help="JSON file merged into the checkpoint's metadata")
    return parser


def add_decoding_args(parser: argparse.ArgumentParser, *, seed: int | None = None) -> None:
    """The decoding flags, shared by every command that captions (``captioner``, ``captioner-eval``)."""
    parser.add_argument("--method", default="beam", choices=["greedy", "sample", "beam"])
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--length-penalty", type=float, default=0.0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--num-captions", type=int, default=1)
    parser.add_argument("--seed", type=int, default=seed)
    parser.add_argument("--max-length", type=int, default=20)


def decoding_options_from_args(args: argparse.Namespace) -> DecodingOptions:
    """Validated :class:`DecodingOptions` from the flags of :func:`add_decoding_args`."""
    return DecodingOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DecodingOptions)})


def _fail(message: str) -> int:
    print(f"captioner: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    from captioner.model import Captioner  # imported late so that --help stays fast

    try:
        if args.command == "info":
            model = Captioner.from_checkpoint(args.checkpoint)
            print(json.dumps(_describe(model), indent=2))
            return 0
        if args.command == "export":
            model = Captioner.from_checkpoint(args.source)
            if args.metadata:
                model.metadata = _merge(model.metadata, _read_json_mapping(args.metadata))
            model.save(args.target, half=args.half)
            print(f"wrote {args.target} ({os.path.getsize(args.target) / 1e6:.1f} MB)")
            return 0
        options = decoding_options_from_args(args)
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        model = Captioner.from_checkpoint(args.checkpoint, device=args.device).optimize_for_inference()
    except (ValueError, CheckpointError, EncoderWeightsError) as exc:
        return _fail(str(exc))

    failed = 0
    results: list[dict] = []
    readable: list[tuple[str, object]] = []
    for path in args.images:
        try:
            readable.append((path, load_image(path)))
        except ImageError as exc:
            failed += 1
            print(f"captioner: {path}: {exc}", file=sys.stderr)
            results.append({"image": path, "error": str(exc)})
    for start in range(0, len(readable), args.batch_size):
        chunk = readable[start : start + args.batch_size]
        for (path, _), result in zip(chunk, model.caption([im for _, im in chunk], options), strict=True):
            entry = {"image": path, "captions": [_caption_dict(c) for c in result.captions]}
            results.append(entry)
            if not args.json:
                texts = " | ".join(c.text for c in result.captions)
                print(f"{path}\t{texts}")
    if args.json:
        order = {p: i for i, p in enumerate(args.images)}
        results.sort(key=lambda r: order[r["image"]])
        print(json.dumps({"options": options.to_dict(), "results": results}, indent=2))
    return 1 if failed else 0


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


def _caption_dict(caption) -> dict:
    data = asdict(caption)
    data.pop("attention")
    return data


def _describe(model) -> dict:
    return {
        "encoder": model.encoder.identity(),
        "decoder": asdict(model.decoder.config),
        "vocab_size": len(model.vocab),
        "preprocess": model.encoder.preprocess.to_dict(),
        "metadata": model.metadata,
    }


if __name__ == "__main__":
    sys.exit(main())
