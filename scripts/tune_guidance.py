"""Choose the thresholds of tag-guided decoding (``captioner.guidance.GuidancePolicy``) on Flickr8k dev.

Guidance must not make in-domain captions worse, and should fire as often as it can (out of domain, every firing
is a chance to name what the photo shows). So, on the 1,000 Flickr8k dev photos (never test, never coco-mini):

1. plain beam search (beam 3, the model's caption rules), with each caption's calibrated confidence and the tags;
2. for each tag threshold, the constrained caption of every photo with a confident tag whose words the plain
   caption does not name;
3. for each pair (tag threshold, caption-confidence ceiling), the photos it would guide get their constrained
   caption, the rest keep the plain one, and the whole split is scored (CIDEr-D, BLEU-4).

Chosen: the pair guiding the most dev photos among those whose dev CIDEr-D and BLEU-4 are both at least the plain
captions' (ties: the higher tag threshold, then the lower ceiling). The table is printed whole.

    python scripts/tune_guidance.py [--checkpoint CKPT] [--data ../shared/data/flickr8k]
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch

from captioner import Captioner, DecodingOptions
from captioner.decoding import constrained_beam_search
from captioner.guidance import GuidancePolicy, required_words
from captioner.model import model_id
from training.data import load_corpus
from training.metrics import compute_metrics
from training.tagged_features import encode_with_logits

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "flickr8k"
TAG_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8)
CAPTION_CEILINGS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="default: the bundled model")
    parser.add_argument("--data", type=Path, default=DATA, help="a Flickr8k folder; its dev split is used")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "novel_objects")
    parser.add_argument("--batch", type=int, default=100)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    model = Captioner.from_checkpoint(args.checkpoint)
    records = load_corpus(str(args.data)).split("val")
    cache = args.cache / f"{model_id(args.checkpoint)}-flickr8k-dev.pt"
    features = encode_with_logits(model, [str(r.path) for r in records], [r.image_id for r in records], cache)
    options = DecodingOptions()
    plain = []
    for start in range(0, len(records), args.batch):
        part = slice(start, start + args.batch)
        plain += model.caption_features(features.grids[part].float(), options, class_logits=features.logits[part])
    print(f"plain beam 3 captioned {len(plain)} dev photos")

    guided: dict[tuple[int, tuple[str, ...]], str] = {}  # (photo, words) -> constrained caption
    wanted: dict[float, dict[int, tuple[str, ...]]] = {}
    for threshold in TAG_THRESHOLDS:
        policy = GuidancePolicy(min_tag_confidence=threshold, max_caption_confidence=1.0)
        wanted[threshold] = {}
        for i, result in enumerate(plain):
            words = required_words(result.tags, result.captions[0].tokens, None, model.vocab, policy)
            if words:
                wanted[threshold][i] = tuple(words)
    todo = sorted({(i, words) for chosen in wanted.values() for i, words in chosen.items()})
    print(f"{len(todo)} constrained decodes")
    for start in range(0, len(todo), args.batch):
        part = todo[start : start + args.batch]
        required = torch.zeros(len(part), len(model.vocab), dtype=torch.bool)
        for row, (_, words) in enumerate(part):
            required[row, [model.vocab.token_id(w) for w in words]] = True
        grid = features.grids[[i for i, _ in part]].float()
        for (i, words), hyps in zip(
            part, constrained_beam_search(model.decoder, grid, options, required, model.rule_masks()), strict=True
        ):
            if hyps is not None:
                guided[i, words] = model.vocab.decode(hyps[0].tokens)

    references = {r.image_id: list(r.captions) for r in records}
    base = compute_metrics({r.image_id: p.captions[0].text for r, p in zip(records, plain, strict=True)}, references,
                           java=False)  # fmt: skip
    print(f"\nplain: CIDEr-D {base['CIDEr']:.4f}  BLEU-4 {100 * base['BLEU-4']:.2f}\n")
    print("tag >=  caption <  guided  changed  CIDEr-D  BLEU-4")
    rows = []
    for threshold, ceiling in itertools.product(TAG_THRESHOLDS, CAPTION_CEILINGS):
        predictions, fired, changed = {}, 0, 0
        for i, (record, result) in enumerate(zip(records, plain, strict=True)):
            text = result.captions[0].text
            words = wanted[threshold].get(i)
            confidence = result.captions[0].confidence
            if words and (confidence is None or confidence < ceiling) and (i, words) in guided:
                fired += 1
                changed += guided[i, words] != text
                text = guided[i, words]
            predictions[record.image_id] = text
        metrics = compute_metrics(predictions, references, java=False)
        rows.append((threshold, ceiling, fired, changed, metrics["CIDEr"], metrics["BLEU-4"]))
        print(f"{threshold:6.2f}  {ceiling:8.2f}  {fired:6d}  {changed:7d}  {metrics['CIDEr']:.4f}  "
              f"{100 * metrics['BLEU-4']:6.2f}")  # fmt: skip
    safe = [row for row in rows if row[4] >= base["CIDEr"] and row[5] >= base["BLEU-4"] and row[2] > 0]
    if not safe:
        print("\nno pair keeps dev CIDEr-D and BLEU-4 at the plain captions': guidance should not fire")
        return
    best = max(safe, key=lambda row: (row[2], row[0], -row[1]))
    print(f"\nchosen: min_tag_confidence={best[0]}, max_caption_confidence={best[1]} "
          f"({best[2]} dev photos guided, CIDEr-D {best[4]:.4f}, BLEU-4 {100 * best[5]:.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
