"""An independent check of caption endings and starts: hand-made word lists, not the learned rules.

``captioner-eval`` reports ``dangling`` and ``subjectless`` with rules learned from the training
captions (``captioner.caption_rules``), the same kind of rules decoding follows. This script judges
captions with lists written by hand instead, so a rule set cannot grade itself: a caption is
*dangling* when it ends on an article, a preposition, a conjunction, a possessive, a colour or a
common bare adjective (not a material noun: "on the dirt", "on a stone" are complete), and
*subjectless* when it starts with a verb or a preposition. Particles that legitimately end English
captions ("jumps up", "falls down", "runs around") are not counted.

Usage::

    captioner-eval ... --out runs/eval-before      # writes predictions.json
    python bench/caption_endings.py runs/eval-before/predictions.json runs/eval-after/predictions.json
    python bench/caption_endings.py captions.jsonl          # from captioner caption DIR --output captions.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from captioner.text import tokenize

ARTICLES = {"a", "an", "the"}
PREPOSITIONS = {
    "on", "in", "of", "at", "with", "to", "by", "for", "from", "into", "onto", "over", "under", "near",
    "through", "across", "along", "behind", "beside", "between", "towards", "toward", "against", "inside",
    "atop", "underneath", "beneath", "among", "next",
}  # fmt: skip
CONJUNCTIONS = {"and", "or", "but", "while", "as", "that"}
POSSESSIVES = {"his", "her", "their", "its", "my", "your", "our"}
COLOURS = {
    "red", "blue", "green", "yellow", "white", "black", "brown", "orange", "pink", "purple", "gray", "grey",
    "tan", "colorful", "colourful", "striped", "blond", "blonde",
}  # fmt: skip
ADJECTIVES = {
    "wooden", "large", "small", "big", "little", "young", "old", "tall", "grassy", "rocky", "sandy", "snowy",
    "muddy", "wet", "dry", "wooded", "busy", "crowded", "empty",
    "several", "many", "two", "three", "four", "some", "another", "other", "each",
}  # fmt: skip
BAD_ENDINGS = ARTICLES | PREPOSITIONS | CONJUNCTIONS | POSSESSIVES | COLOURS | ADJECTIVES
BAD_STARTS = PREPOSITIONS | CONJUNCTIONS | {
    "is", "are", "was", "were", "be", "being", "standing", "sitting", "running", "playing", "walking",
    "jumping", "holding", "wearing", "riding", "looking", "smiling", "climbing", "swimming", "stands", "sits",
    "runs", "plays", "walks", "jumps", "holds", "wears", "rides", "looks",
}  # fmt: skip


def read_captions(path: Path) -> list[str]:
    """``predictions.json`` of captioner-eval, or the ``.jsonl`` of ``captioner caption --output`` (first caption)."""
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [r["captions"][0]["text"] for r in records if r.get("captions")]
    return [item["caption"] for item in json.loads(path.read_text())]


def judge(captions: list[str]) -> dict[str, object]:
    words = [tokenize(c) for c in captions]
    dangling = [w for w in words if not w or w[-1] in BAD_ENDINGS]
    subjectless = [w for w in words if w and w[0] in BAD_STARTS]
    return {
        "captions": len(words),
        "dangling": len(dangling),
        "subjectless": len(subjectless),
        "endings": Counter(w[-1] if w else "(empty)" for w in dangling).most_common(8),
        "examples": [" ".join(w) for w in dangling[:3]],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser("bench/caption_endings.py", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "predictions", nargs="+", type=Path, help="predictions.json (captioner-eval --out) or captioner caption .jsonl"
    )
    args = parser.parse_args(argv)
    print(f"| {'predictions':<48} | {'captions':>8} | {'dangling':>14} | {'subjectless':>14} |")
    print(f"|{'-' * 50}|{'-' * 10}|{'-' * 16}|{'-' * 16}|")
    details = []
    for path in args.predictions:
        try:
            captions = read_captions(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"bench/caption_endings.py: error: {path}: {exc}", file=sys.stderr)
            return 1
        result = judge(captions)
        n = max(result["captions"], 1)
        name = str(path)[-48:]
        print(
            f"| {name:<48} | {result['captions']:>8} | {result['dangling']:>5} ({100 * result['dangling'] / n:5.2f} %) "
            f"| {result['subjectless']:>5} ({100 * result['subjectless'] / n:5.2f} %) |"
        )
        details.append((name, result))
    for name, result in details:
        if result["dangling"]:
            print(f"\n{name}: most frequent bad endings {result['endings']}; e.g. {result['examples']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
