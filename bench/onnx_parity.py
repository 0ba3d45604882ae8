"""Do the backends caption alike? PyTorch (fused, as served) against ONNX Runtime on a whole test split.

Captions every photo of the split with each model (``caption()``, batches of 8, beam 3 by default),
then prints how many captions are identical to PyTorch's and each model's scores (BLEU-4, CIDEr-D;
METEOR too with ``--java``), with the time each model took. The issue's bar: >= 99 % identical and
CIDEr within 0.005 for the fp32 export; an int8 export (``--int8 DIR``) is reported beside it.

    python bench/onnx_parity.py [--data ../shared/data/flickr8k] [--split test] [--onnx DIR] [--int8 DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from captioner import Captioner, DecodingOptions
from captioner.progress import progress_bar
from captioner.runtime import tune_malloc
from training.data import load_corpus
from training.metrics import compute_metrics

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="default: the bundled model")
    parser.add_argument("--onnx", default=None, help="its ONNX export (default: exported/cached on use)")
    parser.add_argument("--int8", default=None, help="an int8 export to score as well")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=None, help="only the first N photos")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--java", action="store_true", help="also METEOR (needs Java)")
    parser.add_argument("--out", type=Path, default=None, help="write the captions and figures here (JSON)")
    return parser


def caption_all(model: Captioner, paths: list[str], options: DecodingOptions, batch: int, name: str):
    texts: list[str] = []
    bar = progress_bar(len(paths), name, sys.stderr.isatty())
    started = time.perf_counter()
    for first in range(0, len(paths), batch):
        texts += [r.captions[0].text for r in model.caption(paths[first : first + batch], options)]
        bar.update(min(batch, len(paths) - first))
    bar.close()
    return texts, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    tune_malloc()
    records = load_corpus(str(args.data)).split(args.split, restval_as_train=False)[: args.limit]
    paths = [str(r.path) for r in records]
    references = {r.image_id: list(r.captions) for r in records}
    options = DecodingOptions(method="beam", beam_size=args.beam_size)
    models = {
        "torch": Captioner.from_checkpoint(args.checkpoint).optimize_for_inference(),
        "onnxruntime": Captioner.from_checkpoint(args.onnx or args.checkpoint, backend="onnxruntime"),
    }
    if args.int8:
        models["onnxruntime int8"] = Captioner.from_checkpoint(args.int8, backend="onnxruntime")
    results = {}
    for name, model in models.items():
        texts, seconds = caption_all(model, paths, options, args.batch_size, name)
        predictions = {r.image_id: t for r, t in zip(records, texts, strict=True)}
        metrics = compute_metrics(predictions, references, java=args.java)
        results[name] = {"texts": texts, "seconds": seconds, "metrics": metrics}

    base = results["torch"]["texts"]
    print(f"\n{len(paths)} photos of {args.data} ({args.split}), beam {args.beam_size}, batches of {args.batch_size}")
    print(f"| {'model':<18} | identical to torch | {'BLEU-4':>6} | {'METEOR':>6} | {'CIDEr':>6} | {'seconds':>7} |")
    print(f"|{'-' * 20}|--------------------|--------|--------|--------|---------|")
    for name, result in results.items():
        same = sum(a == b for a, b in zip(base, result["texts"], strict=True))
        m = result["metrics"]
        meteor = f"{100 * m['METEOR']:6.1f}" if "METEOR" in m else f"{'-':>6}"
        print(
            f"| {name:<18} | {same:>5}/{len(paths)} ({100 * same / len(paths):5.1f} %) | {100 * m['BLEU-4']:6.1f} "
            f"| {meteor} | {m['CIDEr']:6.3f} | {result['seconds']:7.1f} |"
        )
        result["identical_to_torch"] = same
    cider_gap = abs(results["onnxruntime"]["metrics"]["CIDEr"] - results["torch"]["metrics"]["CIDEr"])
    same = results["onnxruntime"]["identical_to_torch"] / len(paths)
    print(f"fp32 export: {100 * same:.1f} % identical (goal >= 99 %), CIDEr gap {cider_gap:.4f} (goal <= 0.005)")
    if args.out:
        args.out.write_text(json.dumps({"paths": paths, **results}, indent=1))
    return 0 if same >= 0.99 and cider_gap <= 0.005 else 1


if __name__ == "__main__":
    sys.exit(main())
