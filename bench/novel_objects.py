"""Tag-guided decoding against plain beam search: out of domain (coco-mini) and in domain (Flickr8k dev and test).

For each set, the same model captions every photo with plain beam 3 and with ``guided_by_tags`` (beam 3, the
thresholds of ``captioner.guidance``), from one cached encoder pass per photo (``training.tagged_features``), and
prints side by side:

- CIDEr-D, BLEU-4 and METEOR (METEOR when Java runs; ``--no-java`` skips it);
- coco-mini: the share of photos whose caption names an *object word* that one of its references names;
- the share of captions that guidance changed, and the dangling-ending rate (``captioner-eval``'s "dangling": the
  caption ends where no Flickr8k training caption ends);
- time per caption, plain and guided in interleaved rounds (medians): ``caption()`` on photo files (the encoder
  included, as a caller pays it) and the decoding alone on cached grids, on the first ``--batch`` photos of
  coco-mini (where guidance fires most) and of Flickr8k test.

Two ceilings say how far guidance over these tags can go, whatever its thresholds: a third column, guidance with
the caption-confidence gate removed (every caption with a tag of at least 0.1 must name one: no gate can guide
more), and the row "a tag names a reference object": the share of photos one of whose five tags has a caption
word (``captioner.tag_words``) that a reference names, which no choice among the tags can exceed.

Object words (reproducible, no tagger): the head (last) words of the ImageNet class names, display names and
parent groups (``captioner/assets/imagenet_tags.json``; the head of a noun phrase is a noun) that occur at least
``--min-count`` times in the COCO caption text (``coco-caption-text``). A caption or reference word counts as the
object word ``w`` when it is ``w``, ``w`` + "s" or ``w`` + "es".

Goals (issue 26): coco-mini CIDEr-D +0.10 over plain beam 3, the naming share at least doubled; Flickr8k test
BLEU-4 >= 23.0 and CIDEr-D >= 0.59; dangling 0.0 %; guided <= 1.5x the time of plain.

    python bench/novel_objects.py [--checkpoint CKPT] [--data ../shared/data] [--rounds 5] [--no-java]
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from captioner import Captioner, DecodingOptions
from captioner.guidance import DEFAULT_POLICY, GuidancePolicy
from captioner.model import CaptionResult, model_id
from captioner.runtime import tune_malloc
from captioner.tag_words import words_for_tags
from captioner.tags import TAGS_FILE
from captioner.text import tokenize
from training.data import ImageRecord, load_corpus
from training.evaluation import caption_shape_rates
from training.metrics import compute_metrics
from training.tagged_features import TaggedFeatures, encode_with_logits

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
PLAIN, GUIDED = DecodingOptions(), DecodingOptions(guided_by_tags=True)
# column -> how it decodes: plain beam 3, guided with the shipped policy, guided with the caption gate removed
DECODINGS: dict[str, tuple[DecodingOptions, GuidancePolicy]] = {
    "plain": (PLAIN, DEFAULT_POLICY),
    "guided": (GUIDED, DEFAULT_POLICY),
    "guided, no confidence gate": (GUIDED, dataclasses.replace(DEFAULT_POLICY, max_caption_confidence=1.0)),
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="default: the bundled model")
    parser.add_argument(
        "--data", type=Path, default=DATA, help="folder holding flickr8k/, coco-mini/, coco-caption-text/"
    )
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "novel_objects", help="encoded photos")
    parser.add_argument(
        "--java", action=argparse.BooleanOptionalAction, default=None, help="METEOR (default: if found)"
    )
    parser.add_argument("--min-count", type=int, default=5, help="COCO caption-text count for an object word")
    parser.add_argument("--batch", type=int, default=8, help="photos per timed call")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds; medians are reported")
    parser.add_argument("--limit", type=int, default=None, help="only the first N photos of each set (a smoke run)")
    parser.add_argument("--examples", type=int, default=12, help="coco-mini photos whose captions are printed")
    return parser


def object_words(coco_text: Path, min_count: int) -> set[str]:
    """The object words of the module docstring."""
    table = json.loads(TAGS_FILE.read_text(encoding="utf-8"))
    heads = set()
    for entry in table["classes"]:
        for name in (entry["name"], entry["display"], *entry["parents"]):
            words = tokenize(name)
            if words:
                heads.add(words[-1].split("-")[-1])
    with gzip.open(coco_text, "rt", encoding="utf-8") as lines:
        counts = Counter(w for line in lines for w in tokenize(json.loads(line)["caption"]))
    return {w for w in heads if counts[w] + counts[f"{w}s"] + counts[f"{w}es"] >= min_count}


def _objects(words: Sequence[str], vocabulary: set[str]) -> set[str]:
    found = set()
    for w in words:
        for stem in (w, w[:-1] if w.endswith("s") else None, w[:-2] if w.endswith("es") else None):
            if stem in vocabulary:
                found.add(stem)
    return found


def _caption_all(
    model: Captioner, features: TaggedFeatures, options: DecodingOptions, guidance: GuidancePolicy = DEFAULT_POLICY
) -> list[CaptionResult]:
    results: list[CaptionResult] = []
    for start in range(0, len(features.image_ids), 100):
        part = slice(start, start + 100)
        grid, logits = features.grids[part].float(), features.logits[part]
        results += model.caption_features(grid, options, class_logits=logits, guidance=guidance)
    return results


class Run(NamedTuple):
    """One decoding of a set: its results, first captions, metrics, naming share and seconds."""

    results: list[CaptionResult]
    texts: list[str]
    metrics: dict[str, float]
    named: float
    seconds: float


def _tag_names_reference(result: CaptionResult, references: set[str], objects: set[str], model: Captioner) -> bool:
    """Whether a caption word of one of the result's tags (any confidence) is an object word the references name."""
    return bool(_objects(words_for_tags([tag.name for tag in result.tags], model.vocab), objects) & references)


def _median_ms(calls: dict[str, Callable[[], object]], images: int, rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        call()  # warm-up
    for _ in range(rounds):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - started) * 1000 / images)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    tune_malloc()
    model = Captioner.from_checkpoint(args.checkpoint)
    flickr = load_corpus(str(args.data / "flickr8k"))
    sets: dict[str, list[ImageRecord]] = {
        "coco-mini": load_corpus(str(args.data / "coco-mini")).records,
        "flickr8k-dev": flickr.split("val"),
        "flickr8k-test": flickr.split("test", restval_as_train=False),
    }
    objects = object_words(args.data / "coco-caption-text" / "captions.jsonl.gz", args.min_count)
    rows: list[tuple[str, ...]] = []
    timing_paths: dict[str, list[str]] = {}
    examples: list[str] = []
    for name, records in sets.items():
        cache = args.cache / f"{model_id(args.checkpoint)}-{name}.pt"
        if args.limit:
            records = records[: args.limit]
            cache = cache.with_name(f"{cache.stem}-first{args.limit}.pt")
        features = encode_with_logits(model, [str(r.path) for r in records], [r.image_id for r in records], cache)
        references = {r.image_id: list(r.captions) for r in records}
        reference_objects = [_objects(tokenize(" ".join(r.captions)), objects) for r in records]
        runs = []
        for options, guidance in DECODINGS.values():
            started = time.perf_counter()
            results = _caption_all(model, features, options, guidance)
            seconds = time.perf_counter() - started
            texts = [res.captions[0].text for res in results]
            predictions = dict(zip(references, texts, strict=True))
            metrics = compute_metrics(predictions, references, java=args.java)
            metrics.update(caption_shape_rates(predictions, flickr, model))
            named = [
                bool(_objects(res.captions[0].tokens, objects) & wanted)
                for res, wanted in zip(results, reference_objects, strict=True)
            ]
            runs.append(Run(results, texts, metrics, sum(named) / len(named), seconds))
        plain, guided = runs[0].results, runs[1].results
        timings = ", ".join(f"{run.seconds:.0f} s {label}" for label, run in zip(DECODINGS, runs, strict=True))
        print(f"{name}: {len(records)} photos, decoded in {timings}", flush=True)
        for metric in ("CIDEr", "BLEU-4", "METEOR"):
            if all(metric in run.metrics for run in runs):
                scale, digits = (1, 3) if metric == "CIDEr" else (100, 2)
                label = "CIDEr-D" if metric == "CIDEr" else metric
                rows.append((name, label, *(f"{scale * run.metrics[metric]:.{digits}f}" for run in runs)))
        rows.append((name, "names a reference object", *(f"{run.named:.1%}" for run in runs)))
        tagged = [
            _tag_names_reference(res, wanted, objects, model)
            for res, wanted in zip(plain, reference_objects, strict=True)
        ]
        rows.append((name, "a tag names a reference object", "", "", f"{sum(tagged) / len(tagged):.1%} (ceiling)"))
        rows.append((name, "dangling endings", *(f"{run.metrics.get('dangling', float('nan')):.1%}" for run in runs)))
        changed = [
            sum(a != b for a, b in zip(runs[0].texts, run.texts, strict=True)) / len(records) for run in runs[1:]
        ]
        rows.append((name, "captions changed by guidance", "", *(f"{share:.1%}" for share in changed)))
        timing_paths[name] = [str(r.path) for r in records[: args.batch]]
        if name == "coco-mini":
            shown = [i for i, (a, b) in enumerate(zip(runs[0].texts, runs[1].texts, strict=True)) if a != b]
            shown += [i for i in range(len(records)) if i not in shown]
            for i in shown[: args.examples]:
                tags = ", ".join(f"{t.name} {t.confidence:.2f}" for t in guided[i].tags[:3])
                examples.append(
                    f"{records[i].image_id} [{tags}] plain: {plain[i].captions[0].text!r} "
                    f"(confidence {plain[i].captions[0].confidence:.2f}) | guided: {guided[i].captions[0].text!r} "
                    f"| a reference: {records[i].captions[0]!r}"
                )

    for name in ("coco-mini", "flickr8k-test"):
        paths = timing_paths[name]
        grid, logits = model.encode_with_class_logits(model.preprocess(paths))
        ms = _median_ms(
            {
                "plain caption()": lambda p=paths: model.caption(p, PLAIN),
                "guided caption()": lambda p=paths: model.caption(p, GUIDED),
                "plain decoding": lambda g=grid, c=logits: model.caption_features(g, PLAIN, class_logits=c),
                "guided decoding": lambda g=grid, c=logits: model.caption_features(g, GUIDED, class_logits=c),
            },
            len(paths),
            args.rounds,
        )
        for what in ("caption()", "decoding"):
            plain_ms, guided_ms = ms[f"plain {what}"], ms[f"guided {what}"]
            rows.append((name, f"ms per photo, {what}, batch {len(paths)}", f"{plain_ms:.1f}",
                         f"{guided_ms:.1f} ({guided_ms / plain_ms:.2f}x)", ""))  # fmt: skip

    print(f"\nmodel {model_id(args.checkpoint)}, beam 3; object words: {len(objects)} (min count {args.min_count})\n")
    header = ("set", "measure", *DECODINGS)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    print("\ncoco-mini examples (changed by guidance first):")
    for line in examples:
        print(" ", line)


if __name__ == "__main__":
    main()
