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
import gzip
import json
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from captioner import Captioner, DecodingOptions
from captioner.model import CaptionResult, model_id
from captioner.runtime import tune_malloc
from captioner.tags import TAGS_FILE
from captioner.text import tokenize
from training.data import ImageRecord, load_corpus
from training.evaluation import caption_shape_rates
from training.metrics import compute_metrics
from training.tagged_features import TaggedFeatures, encode_with_logits

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
PLAIN, GUIDED = DecodingOptions(), DecodingOptions(guided_by_tags=True)


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


def _caption_all(model: Captioner, features: TaggedFeatures, options: DecodingOptions) -> list[CaptionResult]:
    results: list[CaptionResult] = []
    for start in range(0, len(features.image_ids), 100):
        part = slice(start, start + 100)
        results += model.caption_features(features.grids[part].float(), options, class_logits=features.logits[part])
    return results


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
    rows: list[tuple[str, str, str, str]] = []
    timing_paths: dict[str, list[str]] = {}
    examples: list[str] = []
    for name, records in sets.items():
        cache = args.cache / f"{model_id(args.checkpoint)}-{name}.pt"
        if args.limit:
            records = records[: args.limit]
            cache = cache.with_name(f"{cache.stem}-first{args.limit}.pt")
        features = encode_with_logits(model, [str(r.path) for r in records], [r.image_id for r in records], cache)
        references = {r.image_id: list(r.captions) for r in records}
        scored = {}
        for label, options in (("plain", PLAIN), ("guided", GUIDED)):
            started = time.perf_counter()
            results = _caption_all(model, features, options)
            seconds = time.perf_counter() - started
            predictions = {r.image_id: res.captions[0].text for r, res in zip(records, results, strict=True)}
            metrics = compute_metrics(predictions, references, java=args.java)
            metrics.update(caption_shape_rates(predictions, flickr, model))
            named = [
                bool(_objects(res.captions[0].tokens, objects) & _objects(tokenize(" ".join(r.captions)), objects))
                for r, res in zip(records, results, strict=True)
            ]
            scored[label] = (results, predictions, metrics, sum(named) / len(named), seconds)
        (plain, plain_text, pm, p_named, p_s), (guided, guided_text, gm, g_named, g_s) = (
            scored["plain"],
            scored["guided"],
        )
        changed = sum(plain_text[i] != guided_text[i] for i in plain_text) / len(plain_text)
        print(f"{name}: {len(records)} photos, decoded in {p_s:.0f} s plain, {g_s:.0f} s guided", flush=True)
        for metric in ("CIDEr", "BLEU-4", "METEOR"):
            if metric in pm and metric in gm:
                scale = 100 if metric != "CIDEr" else 1
                digits = 3 if metric == "CIDEr" else 2
                rows.append((name, metric if metric != "CIDEr" else "CIDEr-D", f"{scale * pm[metric]:.{digits}f}",
                             f"{scale * gm[metric]:.{digits}f}"))  # fmt: skip
        rows.append((name, "names a reference object", f"{p_named:.1%}", f"{g_named:.1%}"))
        dangling = [f"{m.get('dangling', float('nan')):.1%}" for m in (pm, gm)]
        rows.append((name, "dangling endings", *dangling))
        rows.append((name, "captions changed by guidance", "", f"{changed:.1%}"))
        timing_paths[name] = [str(r.path) for r in records[: args.batch]]
        if name == "coco-mini":
            shown = [i for i, r in enumerate(records) if plain_text[r.image_id] != guided_text[r.image_id]]
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
                         f"{guided_ms:.1f} ({guided_ms / plain_ms:.2f}x)"))  # fmt: skip

    print(f"\nmodel {model_id(args.checkpoint)}, beam 3; object words: {len(objects)} (min count {args.min_count})\n")
    widths = [max(len(row[i]) for row in [("set", "measure", "plain", "guided"), *rows]) for i in range(4)]
    for row in [("set", "measure", "plain", "guided"), tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    print("\ncoco-mini examples (changed by guidance first):")
    for line in examples:
        print(" ", line)


if __name__ == "__main__":
    main()
