"""Build captioner/assets/tag_words.json: for each tag (an ImageNet display name), the caption words that name it.

Tag-guided decoding (``captioner.guided``) forces one of a confident tag's words into the caption, so a word here
must be a word the decoder knows (its vocabulary) and one a person would write for that thing in a caption. The
runtime only reads the JSON (``captioner.tag_words``); this script records every choice so it can be rebuilt and
reviewed. For each display name of ``captioner/assets/imagenet_tags.json``, in this order of precedence:

1. a reviewed override (:data:`OVERRIDES`) when the rules below would pick a wrong or missing word: a class whose
   everyday word differs from its name ("notebook computer" -> laptop, computer; "airliner" -> airplane, plane,
   jet; "cheeseburger" -> burger, sandwich, food), a name whose head is another thing alone ("hot dog", "computer
   mouse"; the ImageNet "kite" is the bird), and kitchen and bathroom appliances, named by the object ("microwave
   oven" -> microwave, oven), by the room only when the vocabulary has no word for the object ("dishwasher" ->
   kitchen: offered beside the object, the room is the word the decoder already likes, as parents below are);
2. else the name's own words: the whole name when it is one word of the vocabulary ("pizza", "t-shirt"), and its
   head (last) word when the vocabulary has it and it is not in :data:`AMBIGUOUS_HEADS`, heads that name
   something else alone ("trash can" -> can, "cassette player" -> player, "block plane" -> plane);
3. else, when neither gives a word, the first of its parents (nearest first) with a word in
   :data:`PARENT_WORDS`: goldfinch -> bird, tench -> fish, lion -> animal, banana -> fruit, cardigan -> nothing.
   Parents are only a fallback: offered beside the name, the decoder would pick the word it already likes ("food"
   over "pizza"), which is the word it says without guidance. "building" is no fallback: WordNet files shops and
   rooms under it (a "library" photo is taken inside), so buildings are reviewed overrides.

Every word is then kept only if the vocabulary has it (a word of an override that it lacks, such as "burger", is
dropped; adding such words is vocabulary extension, not this table's job), duplicates dropped, order kept. Tags
left with no word are left out: guidance never fires for them. The vocabulary's size and sha256 are recorded;
``captioner.tag_words`` filters again by the model's own vocabulary, so another checkpoint only loses words.

    python scripts/make_tag_words.py [--checkpoint CKPT] [--out captioner/assets/tag_words.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from captioner import Captioner
from captioner.tags import TAGS_FILE, load_tag_table
from captioner.text import tokenize
from captioner.vocab import Vocabulary

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "captioner" / "assets" / "tag_words.json"

# Heads that mean something else on their own in a caption (reviewed against the list of all display names).
AMBIGUOUS_HEADS = {
    "bar", "bars", "bank", "beam", "boa", "can", "cap", "carrier", "case", "center", "control", "cover", "cream",
    "dish", "drive", "home", "light", "machine", "mouse", "pad", "plane", "player", "rack", "screen", "spray",
    "stick", "theater", "track", "trunks", "vehicle",
}  # fmt: skip

# A parent group -> the caption words for it, used only when a tag has no word of its own.
PARENT_WORDS = {
    "dog": ["dog"], "cat": ["animal"], "bird": ["bird"], "fish": ["fish"], "insect": ["bug", "insect"],
    "primate": ["animal"], "aircraft": ["airplane", "plane", "jet"], "boat": ["boat"], "car": ["car"],
    "computer": ["computer"], "camera": ["camera"], "fruit": ["fruit"], "vegetable": ["vegetables"],
    "food": ["food"], "kitchen appliance": ["kitchen"], "musical instrument": ["instrument"], "person": ["person"],
    "reptile": ["animal"], "amphibian": ["animal"],
    "mammal": ["animal"], "animal": ["animal"],
}  # fmt: skip

# Reviewed: the tag's words when the rules above would miss or mislead (display name -> words, best first).
OVERRIDES = {
    "kite": ["bird"],  # ImageNet's kite is the bird of prey
    "hot dog": ["hotdog", "sandwich", "food"],
    "cheeseburger": ["burger", "hamburger", "sandwich", "food"],
    "ice cream": ["ice", "cream", "dessert"],
    "computer mouse": ["computer"],
    "notebook computer": ["laptop", "computer"],
    "laptop": ["laptop", "computer"],
    "hand-held computer": ["computer"],
    "desktop computer": ["computer"],
    "computer keyboard": ["keyboard", "computer"],
    "CRT monitor": ["computer", "monitor"],
    "monitor": ["computer", "monitor"],
    "television": ["television", "tv"],
    "mobile phone": ["phone", "cellphone"],
    "payphone": ["phone"],
    "airliner": ["airplane", "plane", "jet"],
    "military aircraft": ["airplane", "plane", "jet"],
    "airplane wing": ["airplane", "plane"],
    "taxicab": ["taxi", "car"],
    "minibus": ["bus", "van"],
    "trolleybus": ["bus"],
    "tram": ["trolley", "train"],
    "electric locomotive": ["train"],
    "steam locomotive": ["train"],
    "high-speed train": ["train"],
    "freight car": ["train"],
    "railroad car": ["train"],
    "minivan": ["van", "car"],
    "convertible": ["car"],
    "moped": ["scooter", "motorcycle"],
    "motor scooter": ["scooter", "motorcycle"],
    "microwave oven": ["microwave", "oven"],
    "dishwasher": ["kitchen"],
    "toaster": ["kitchen"],
    "stove": ["stove", "oven"],
    "Dutch oven": ["kitchen"],
    "refrigerator": ["refrigerator", "fridge"],
    "sink": ["sink"],
    "toilet seat": ["toilet"],
    "toilet paper": ["toilet", "paper"],
    "bathtub": ["bathtub", "tub"],
    "shower curtain": ["shower", "bathroom"],
    "teddy bear": ["teddy", "bear"],
    "traffic light": ["traffic"],
    "baseball player": ["baseball", "player"],
    "scuba diver": ["diver", "scuba"],
    "bridegroom": ["groom", "bride", "wedding"],
    "tusker": ["elephant"],
    "ox": ["ox", "cow", "cattle"],
    "water buffalo": ["buffalo", "cow"],
    "bison": ["bison", "buffalo"],
    "ram": ["sheep"],
    "hen": ["chicken", "bird"],
    "rooster": ["chicken", "rooster", "bird"],
    "drake": ["duck", "bird"],
    "goose": ["goose", "bird"],
    "king penguin": ["penguin", "bird"],
    "sea lion": ["seal"],
    "hare": ["rabbit"],
    "tennis ball": ["tennis", "ball"],
    "racket": ["racket", "tennis"],
    "soccer ball": ["soccer", "ball"],
    "rugby ball": ["rugby", "ball"],
    "golf ball": ["golf", "ball"],
    "volleyball ball": ["volleyball", "ball"],
    "ping-pong ball": ["ball"],
    "bagel": ["bread", "food"],
    "baguette": ["bread", "food"],
    "pretzel": ["bread", "food"],
    "pot pie": ["pie", "food"],
    "carbonara": ["pasta", "food"],
    "container ship": ["ship", "boat"],
    "pirate ship": ["ship", "boat"],
    "analog clock": ["clock", "tower"],
    "wall clock": ["clock"],
    "umbrella": ["umbrella"],
    "park bench": ["bench"],
    "street sign": ["sign"],
    "plate": ["plate"],
    # rooms and buildings: WordNet files shops and rooms under "building", but a photo tagged "home theater" or
    # "library" is taken inside, where "building" is wrong; only what is seen from outside gets "building"
    "home theater": ["tv", "television", "room"],
    "entertainment center": ["tv", "television", "room"],
    "library": ["books", "library"],
    "bookstore": ["books", "store"],
    "barbershop": ["shop"],
    "bakery": ["bakery", "shop"],
    "movie theater": ["theater"],
    "medicine cabinet": ["cabinet", "mirror"],
    "palace": ["palace", "building"],
    "monastery": ["building"],
    "mosque": ["building"],
    "castle": ["castle", "building"],
    "stupa": ["building"],
    "planetarium": ["building"],
    "boathouse": ["boat", "building"],
    "slide rule": [],  # WordNet's "computer" parent: not what a caption would say
}


def tag_words(display: str, parents: tuple[str, ...], vocab: Vocabulary) -> list[str]:
    """The caption words for one tag, by the rules of the module docstring."""
    kept: list[str] = []
    for word in candidate_words(display, parents, vocab):
        if word in vocab and word not in kept:
            kept.append(word)
    return kept


def candidate_words(display: str, parents: tuple[str, ...], vocab: Vocabulary) -> list[str]:
    """A tag's words by rules 1-3, before those the vocabulary lacks are dropped (``make_word_transfers.py`` adds
    the frequent ones to the vocabulary): its own words, then, when ``vocab`` has none, its parent's."""
    if display in OVERRIDES:
        candidates = list(OVERRIDES[display])
    else:
        words = tokenize(display)
        candidates = []
        if len(words) == 1:
            candidates.append(words[0])
        head = words[-1].split("-")[-1] if words else ""
        if head and head not in AMBIGUOUS_HEADS:
            candidates.append(head)
        if not any(word in vocab for word in candidates):  # the parents' words follow, for tag_words to fall back
            parent = next((p for p in parents if any(w in vocab for w in PARENT_WORDS.get(p, []))), None)
            candidates += PARENT_WORDS[parent] if parent is not None else []
    return candidates


def build_table(vocab: Vocabulary) -> dict[str, object]:
    table = load_tag_table()
    words = {
        display: found
        for display, parents in zip(table.display_names, table.display_parents, strict=True)
        if (found := tag_words(display, parents, vocab))
    }
    digest = hashlib.sha256("\n".join(vocab.tokens).encode("utf-8")).hexdigest()
    return {
        "about": "Caption words for each tag (ImageNet display name of captioner/assets/imagenet_tags.json), "
        "words of the default model's vocabulary only. Built by scripts/make_tag_words.py (its docstring says how); "
        "read by captioner/tag_words.py.",
        "tags_file": TAGS_FILE.name,
        "vocabulary": {"size": len(vocab), "sha256": digest},
        "words": words,
    }


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="the model whose vocabulary is used (default: bundled)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    vocab = Captioner.from_checkpoint(args.checkpoint).vocab
    table = build_table(vocab)
    args.out.write_text(json.dumps(table, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.out}: words for {len(table['words'])} of {len(load_tag_table().display_names)} tags")


if __name__ == "__main__":
    main()
