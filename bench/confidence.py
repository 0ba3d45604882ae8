"""How well caption confidence and tags work, in domain (Flickr8k test) and out of it (coco-mini), and what they cost.

Captions every Flickr8k test photo and every coco-mini photo with the serving defaults (beam 3) and prints:

- AUROC of the best caption's confidence for telling Flickr8k test photos (positive) from coco-mini ones;
- Spearman correlation of confidence with per-image CIDEr-D over both sets together (CIDEr-D's document
  frequencies from both sets' references, so one scale for all photos);
- expected calibration error on Flickr8k test (10 equal-width bins) against the target the model's confidence was
  fitted to (per-image CIDEr-D >= threshold, frequencies from the test set's references, as the fit computes them);
- CIDEr-D of the captions kept at 70 % coverage (the most confident 70 % of both sets) against all of them: the
  mean of the same per-image scores (primary), and recomputed as a corpus over the kept photos;
- the share of coco-mini photos whose tags (top 5, >= 0.02: what every result carries) name an object in their
  references: a tag's name or one of its parents, as a word of a reference (plural -s/-es accepted);
- the time ``caption()`` takes at batch 8 with tags and confidence against without them (class head off or its
  logits unused, no confidence model), interleaved rounds, medians;
- with ``--backends``: the largest difference of confidences and tag confidences between torch and ONNX Runtime.

Goals (issue 23): AUROC >= 0.85, Spearman >= 0.4, calibration error <= 0.05, 70 %-coverage CIDEr >= 1.2x the full
one, tags name a reference object on >= 60 % of coco-mini, tags + confidence add <= 5 % at batch 8.

    python bench/confidence.py [--checkpoint CKPT] [--backend auto] [--backends] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from captioner import Captioner, DecodingOptions
from captioner.model import CaptionResult
from captioner.runtime import tune_malloc
from captioner.tags import Tag
from captioner.text import tokenize
from training.calibration import expected_calibration_error
from training.data import load_corpus
from training.metrics import compute_cider_d

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="default: the bundled model")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "onnxruntime"])
    parser.add_argument("--data", type=Path, default=DATA, help="folder holding flickr8k/ and coco-mini/")
    parser.add_argument("--coverage", type=float, default=0.7, help="share of photos kept by confidence")
    parser.add_argument("--batch", type=int, default=8, help="photos per timed call")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds; medians are reported")
    parser.add_argument("--backends", action="store_true", help="also compare torch and ONNX Runtime on 80 photos")
    return parser


def _caption_all(model: Captioner, paths: list[str], batch: int = 16) -> list[CaptionResult]:
    results: list[CaptionResult] = []
    for start in range(0, len(paths), batch):
        results += model.caption(paths[start : start + batch])
    return results


def _tag_words(tag: Tag) -> set[str]:
    words: set[str] = set()
    for name in (tag.name, *tag.parents):
        for word in name.lower().replace("-", " ").split():
            words |= {word, f"{word}s", f"{word}es"}
    return words


def _timings(model: Captioner, paths: list[str], rounds: int) -> tuple[float, float]:
    """ms per image of caption() with tags and confidence, and without (head off / logits unused, no confidence)."""
    options = DecodingOptions()
    confidence = model.confidence_model
    head = getattr(model.encoder, "classifier", None) if model.backend == "torch" else None

    def plain() -> object:
        model.confidence_model = None
        if model.backend == "torch":
            model.encoder.set_classifier(None)
        try:
            return model.caption_features(model.encode(model.preprocess(paths)), options)
        finally:
            model.confidence_model = confidence
            if model.backend == "torch":
                model.encoder.set_classifier(head)

    def full() -> object:
        return model.caption(paths, options)

    times: dict[str, list[float]] = {"plain": [], "full": []}
    plain(), full()  # warm-up
    for _ in range(rounds):
        for name, call in (("plain", plain), ("full", full)):
            started = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - started) * 1000 / len(paths))
    return statistics.median(times["full"]), statistics.median(times["plain"])


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    tune_malloc()  # as the service runs it
    model = Captioner.from_checkpoint(args.checkpoint, backend=args.backend)
    if model.confidence_model is None:
        raise SystemExit("this model has no confidence model: fit one with `captioner calibrate`")
    test = load_corpus(str(args.data / "flickr8k")).split("test", restval_as_train=False)
    coco = load_corpus(str(args.data / "coco-mini")).records
    records = [*test, *coco]
    started = time.perf_counter()
    results = _caption_all(model, [str(r.path) for r in records])
    seconds = time.perf_counter() - started
    in_domain = np.array([1] * len(test) + [0] * len(coco))
    confidence = np.array([r.captions[0].confidence for r in results], dtype=np.float64)
    hyps = [r.captions[0].tokens for r in results]
    refs = [[tokenize(c) for c in r.captions] for r in records]
    cider = compute_cider_d(hyps, refs)  # one corpus: both sets
    test_cider = compute_cider_d(hyps[: len(test)], refs[: len(test)])  # as the fit scores its held-out set
    threshold = float(model.confidence_model.target.split(">=")[1].split()[0])

    keep = np.argsort(-confidence, kind="stable")[: int(round(args.coverage * len(records)))]
    kept_corpus = compute_cider_d([hyps[i] for i in keep], [refs[i] for i in keep]).mean()
    tagged = [
        any(_tag_words(tag) & {w for ref in refs[len(test) + i] for w in ref} for tag in result.tags)
        for i, result in enumerate(results[len(test) :])
    ]
    full_ms, plain_ms = _timings(model, [str(r.path) for r in test[: args.batch]], args.rounds)

    print(
        f"\n{model.backend} backend, {len(test)} Flickr8k test + {len(coco)} coco-mini photos, beam 3, "
        f"captioned in {seconds:.0f} s; confidence target: {model.confidence_model.target}\n"
    )
    rows = [
        ("AUROC, Flickr8k test vs coco-mini", f"{roc_auc_score(in_domain, confidence):.3f}", ">= 0.85"),
        (
            "Spearman(confidence, per-image CIDEr-D), both sets",
            f"{spearmanr(confidence, cider).statistic:.3f}",
            ">= 0.4",
        ),
        (
            f"calibration error (10 bins), Flickr8k test, CIDEr-D >= {threshold}",
            f"{expected_calibration_error(confidence[: len(test)], test_cider >= threshold):.3f}",
            "<= 0.05",
        ),
        ("CIDEr-D, all photos (mean per image)", f"{cider.mean():.3f}", ""),
        (
            f"CIDEr-D, most confident {args.coverage:.0%} (mean per image)",
            f"{cider[keep].mean():.3f} ({cider[keep].mean() / cider.mean():.3f}x)",
            ">= 1.2x",
        ),
        (
            f"CIDEr-D, most confident {args.coverage:.0%} (corpus recomputed)",
            f"{kept_corpus:.3f} ({kept_corpus / cider.mean():.3f}x)",
            "",
        ),
        ("coco-mini photos kept", f"{int((keep >= len(test)).sum())} of {len(coco)}", ""),
        ("coco-mini: tags name a reference object", f"{np.mean(tagged):.1%}", ">= 60 %"),
        (
            f"caption() at batch {args.batch}: with / without tags + confidence",
            f"{full_ms:.1f} / {plain_ms:.1f} ms per image ({100 * (full_ms / plain_ms - 1):+.1f} %)",
            "<= +5 %",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"| {'measure':<{width}} | value | goal |")
    print(f"|{'-' * (width + 2)}|---:|---|")
    for name, value, goal in rows:
        print(f"| {name:<{width}} | {value} | {goal} |")
    print(
        f"\nmean confidence: Flickr8k test {confidence[: len(test)].mean():.3f}, coco-mini "
        f"{confidence[len(test) :].mean():.3f}; acceptable share on Flickr8k test "
        f"{(test_cider >= threshold).mean():.3f}"
    )

    if args.backends:
        other = "torch" if model.backend == "onnxruntime" else "onnxruntime"
        twin = Captioner.from_checkpoint(args.checkpoint, backend=other)
        sample = [str(r.path) for r in records[:: max(1, len(records) // 80)]][:80]
        mine, theirs = _caption_all(model, sample), _caption_all(twin, sample)
        conf_diff = max(
            abs((a.captions[0].confidence or 0) - (b.captions[0].confidence or 0))
            for a, b in zip(mine, theirs, strict=True)
        )
        tag_diff = max(
            abs(x.confidence - y.confidence) if x.name == y.name else float("inf")
            for a, b in zip(mine, theirs, strict=True)
            for x, y in zip(a.tags, b.tags, strict=False)
        )
        same = sum(a.captions[0].text == b.captions[0].text for a, b in zip(mine, theirs, strict=True))
        same_tags = sum([t.name for t in a.tags] == [t.name for t in b.tags] for a, b in zip(mine, theirs, strict=True))
        print(
            f"\n{model.backend} vs {other} on {len(sample)} photos: same caption {same}/{len(sample)}, same tag "
            f"names {same_tags}/{len(sample)}, max |confidence diff| {conf_diff:.2e}, max |tag confidence diff| "
            f"{tag_diff:.2e}"
        )


if __name__ == "__main__":
    main()
