import csv
import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from captioner.text import tokenize
from captioner.vocab import Vocabulary
from tests.helpers import require_data
from training.data import CaptionCorpus, DataError, ImageRecord, LoadReport, load_corpus

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)
    return path


def _write(path: Path, text: str, *, encoding: str = "utf-8", newline: str = "\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.replace("\n", newline).encode(encoding))
    return path


def _json(path: Path, data: object) -> Path:
    return _write(path, json.dumps(data))


def _flickr(root: Path, lines: list[str], splits: dict[str, list[str]], *, images: list[str]) -> Path:
    """A Flickr8k folder laid out as in ../shared/data: captions.txt, images/, splits/."""
    _write(root / "captions.txt", "\n".join(lines) + "\n")
    for name in images:
        _image(root / "images" / name)
    for split in ("train", "dev", "test"):
        _write(root / "splits" / f"Flickr_8k.{split}Images.txt", "".join(f"{n}\n" for n in splits.get(split, [])))
    return root


# --- real data ------------------------------------------------------------------------------------


def test_flickr8k_real_counts_and_splits():
    root = require_data("flickr8k")
    corpus = load_corpus(root)
    assert corpus.source == "flickr8k"
    assert len(corpus) == 8091
    assert sum(len(r.captions) for r in corpus.records) == 40455
    assert corpus.split_sizes() == {"train": 6000, "val": 1000, "test": 1000, "unsplit": 91}
    assert corpus.problems.total == 0, corpus.problems.summary()
    assert all(len(r.captions) == 5 for r in corpus.records)
    # The hand-rolled first-comma parser must agree with the csv module on every caption.
    with open(root / "captions.txt", newline="", encoding="utf-8") as f:
        expected = sorted((row["image"], row["caption"].strip()) for row in csv.DictReader(f))
    assert sorted((r.image_id, c) for r in corpus.records for c in r.captions) == expected
    record = corpus.to_references()["1012212859_01547e3f17.jpg"]
    assert "A dog shakes its head near the shore , a red ball next to it ." in record


def test_flickr8k_real_vocabulary_ignores_test_only_words():
    corpus = load_corpus(require_data("flickr8k"))
    vocab = Vocabulary.build(corpus.train_captions(), min_count=1)
    train_words = {w for c in corpus.train_captions() for w in tokenize(c)}
    test_only = {w for r in corpus.split("test") for c in r.captions for w in tokenize(c)} - train_words
    assert test_only, "expected some words that occur only in the test captions"
    assert not any(w in vocab for w in test_only)


def test_coco_mini_real_file_and_folder():
    root = require_data("coco-mini")
    json_path = root / "annotations" / "captions_train2017.json"
    data = json.loads(json_path.read_text(encoding="utf-8"))
    corpus = load_corpus(json_path, verify_images=True)
    assert corpus.source == "coco"
    assert len(corpus) == 80 == len(data["images"])
    assert sum(len(r.captions) for r in corpus.records) == len(data["annotations"])
    assert corpus.split_sizes() == {"train": 80}
    assert corpus.problems.total == 0, corpus.problems.summary()
    first = data["images"][0]
    assert corpus.records[0].image_id == str(first["id"])
    assert corpus.records[0].path == root / "train2017" / first["file_name"]
    assert load_corpus(root).records == corpus.records


# --- COCO -----------------------------------------------------------------------------------------


def _coco_file(root: Path, name: str = "captions_train2017.json", *, offset: int = 0) -> Path:
    """images 1-4 listed (4 without a file, 3 without captions), one annotation for unknown image 9."""
    ids = [offset + i for i in (1, 2, 3, 4, 9)]
    for i in ids[:3]:
        _image(root / name.removeprefix("captions_").removesuffix(".json") / f"{i:012d}.jpg")
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "height": 8, "width": 8} for i in ids[:4]]
    annotations = [
        {"image_id": ids[0], "id": offset + 10, "caption": "A red square.\n"},
        {"image_id": ids[0], "id": offset + 11, "caption": "Red, all red."},
        {"image_id": ids[1], "id": offset + 12, "caption": "Another red square"},
        {"image_id": ids[1], "id": offset + 13, "caption": "  "},
        {"image_id": ids[3], "id": offset + 14, "caption": "A square whose file is missing."},
        {"image_id": ids[4], "id": offset + 15, "caption": "An image that is not listed."},
    ]
    return _json(root / "annotations" / name, {"info": {}, "images": images, "annotations": annotations})


def test_coco_reports_each_problem_with_counts(tmp_path):
    corpus = load_corpus(_coco_file(tmp_path))
    assert [(r.image_id, r.captions, r.split) for r in corpus.records] == [
        ("1", ("A red square.", "Red, all red."), "train"),
        ("2", ("Another red square",), "train"),
    ]
    problems = corpus.problems
    assert dict(problems.counts) == {"unknown_image": 1, "empty_caption": 1, "no_captions": 1, "missing_image": 1}
    assert problems.examples["unknown_image"] == ["annotation 15 -> image 9"]
    assert problems.examples["missing_image"] == [str(tmp_path / "train2017" / "000000000004.jpg")]
    assert problems.examples["no_captions"] == ["3"]


def test_coco_duplicates_and_malformed_entries(tmp_path):
    _image(tmp_path / "images" / "a.jpg")
    data = {
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}, {"file_name": "c.jpg"}],
        "annotations": [
            {"image_id": 1, "id": 5, "caption": "one"},
            {"image_id": 1, "id": 5, "caption": "one again"},
            {"image_id": 1, "caption": 3},
            "not an object",
        ],
    }
    corpus = load_corpus(_json(tmp_path / "caps.json", data), images_dir=tmp_path / "images")
    assert corpus.records == [ImageRecord("1", tmp_path / "images" / "a.jpg", ("one",), "unsplit")]
    assert dict(corpus.problems.counts) == {"duplicate": 2, "malformed": 3}
    assert corpus.problems.examples["duplicate"] == ["image id 1 listed twice", "annotation id 5 listed twice"]


def test_coco_split_comes_from_the_file_name_unless_overridden(tmp_path):
    _coco_file(tmp_path, "captions_train2014.json")
    val = _coco_file(tmp_path, "captions_val2014.json", offset=100)
    assert load_corpus(val).split_sizes() == {"val": 2}
    assert load_corpus(val, split="test").split_sizes() == {"test": 2}
    both = load_corpus(tmp_path)  # a COCO folder: every annotations/captions_*.json
    assert both.split_sizes() == {"train": 2, "val": 2}
    assert [r.image_id for r in both.records] == ["1", "2", "101", "102"]
    assert both.problems.count("missing_image") == 2
    with pytest.raises(ValueError, match="split= is ambiguous"):
        load_corpus(tmp_path, split="train")
    with pytest.raises(ValueError, match="unknown split 'dev'; expected one of train, val, test"):
        load_corpus(val, split="dev")


def test_refuses_a_corpus_without_any_usable_image(tmp_path):
    path = _json(tmp_path / "annotations" / "captions_val2017.json", {
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
        "annotations": [{"image_id": 1, "caption": "x"}, {"image_id": 2, "caption": "y"}],
    })  # fmt: skip
    with pytest.raises(DataError) as info:
        load_corpus(path)
    message = str(info.value)
    assert message.startswith(f"{path}: no usable images (images looked for in {tmp_path / 'val2017'})")
    assert "missing_image: 2 image file not found (skipped), e.g. " in message


# --- malformed files ------------------------------------------------------------------------------


def test_broken_json_names_file_and_position(tmp_path):
    path = _write(tmp_path / "captions.json", '{\n  "images": [],\n    "annotations" [\n')
    with pytest.raises(DataError) as info:
        load_corpus(path)
    assert str(info.value) == f"{path}: not valid JSON (line 3, column 19: Expecting ':' delimiter)"
    with pytest.raises(DataError, match="not valid JSON"):
        load_corpus(path, format="coco")


def test_wrong_schema_is_refused_with_the_expected_keys(tmp_path):
    other = _json(tmp_path / "other.json", {"categories": []})
    with pytest.raises(DataError) as info:
        load_corpus(other)
    assert str(info.value) == (
        f"{other}: neither a COCO captions file ('images' and 'annotations') "
        "nor a Karpathy split file ('images' with 'sentences')"
    )
    karpathy = FIXTURES / "dataset_coco_karpathy_tiny.json"
    with pytest.raises(DataError) as info:
        load_corpus(karpathy, format="coco")
    assert str(info.value) == f"{karpathy}: expected a COCO captions file with 'images' and 'annotations'"
    with pytest.raises(DataError, match=r"expected a Karpathy split file with an 'images' list"):
        load_corpus(_json(tmp_path / "list.json", [1, 2]), format="karpathy")
    with pytest.raises(DataError, match="'images' and 'annotations' must be lists"):
        load_corpus(_json(tmp_path / "c.json", {"images": {}, "annotations": []}))


def test_missing_paths_and_bad_arguments(tmp_path):
    with pytest.raises(DataError, match=r"nope: no such file or directory$"):
        load_corpus(tmp_path / "nope")
    with pytest.raises(DataError, match="not a known data set folder"):
        load_corpus(tmp_path)
    with pytest.raises(DataError, match="unknown file type"):
        load_corpus(_write(tmp_path / "x.yaml", "a: 1"))
    with pytest.raises(DataError, match=r"not UTF-8 text"):
        load_corpus(_write(tmp_path / "latin.json", '{"a": "caf\xe9"}', encoding="latin-1"))
    with pytest.raises(ValueError, match="unknown format 'yaml'; expected one of auto, coco, karpathy, flickr8k"):
        load_corpus(tmp_path, format="yaml")


# --- Flickr8k -------------------------------------------------------------------------------------


def test_flickr_csv_with_commas_quotes_bom_crlf_and_blank_lines(tmp_path):
    lines = [
        "image,caption",
        "a.jpg,A dog , a ball , and grass .",
        'a.jpg,"A dog with a "" Fetch "" shirt , running ."',
        "",
        "b.jpg,A cat.",
        "b.jpg,  ",
        "no comma on this line",
        "c.jpg,In no split.",
        "d.jpg,Its file is missing.",
    ]
    root = _flickr(tmp_path, [], {"train": ["a.jpg", "d.jpg"], "dev": ["b.jpg", "ghost.jpg"], "test": ["a.jpg"]},
                   images=["a.jpg", "b.jpg", "c.jpg"])  # fmt: skip
    _write(root / "captions.txt", "\n".join(lines) + "\n", encoding="utf-8-sig", newline="\r\n")
    corpus = load_corpus(root)
    assert [(r.image_id, r.captions, r.split) for r in corpus.records] == [
        ("a.jpg", ("A dog , a ball , and grass .", 'A dog with a " Fetch " shirt , running .'), "train"),
        ("b.jpg", ("A cat.",), "val"),
        ("c.jpg", ("In no split.",), "unsplit"),
    ]
    assert corpus.records[0].path == root / "images" / "a.jpg"
    assert dict(corpus.problems.counts) == {
        "malformed": 1, "empty_caption": 1, "duplicate": 1, "split_unknown": 1, "missing_image": 1
    }  # fmt: skip
    assert corpus.problems.examples["malformed"] == ["captions.txt:7: 'no comma on this line'"]
    assert corpus.problems.examples["empty_caption"] == ["captions.txt:6"]
    assert corpus.problems.examples["duplicate"] == ["a.jpg listed in train and again in test"]
    assert corpus.problems.examples["split_unknown"] == ["ghost.jpg (Flickr_8k.devImages.txt)"]
    # The caption file itself is accepted too, and gives the same corpus.
    assert load_corpus(root / "captions.txt").records == corpus.records


def test_flickr_token_txt_as_in_the_original_release(tmp_path):
    _write(tmp_path / "Flickr8k.token.txt", "\n".join([
        "1000268201_693b08cb0e.jpg#0\tA child in a pink dress is climbing up a set of stairs in an entry way .",
        "1000268201_693b08cb0e.jpg#1\tA girl going into a wooden building , smiling .",
        "1000268201_693b08cb0e.jpg#1\tThe same key again .",
        "1001773457_577c3a7d70.jpg#0\tA black dog and a spotted dog are fighting",
        "a line without a tab",
        "2258277193_586949ec62.jpg.1#0\tAn entry for a file that does not exist .",
    ]))  # fmt: skip
    for name in ("1000268201_693b08cb0e.jpg", "1001773457_577c3a7d70.jpg"):
        _image(tmp_path / "Flicker8k_Dataset" / name)
    _write(tmp_path / "Flickr_8k.trainImages.txt", "1000268201_693b08cb0e.jpg\n")
    _write(tmp_path / "Flickr_8k.devImages.txt", "")
    _write(tmp_path / "Flickr_8k.testImages.txt", "1001773457_577c3a7d70.jpg\n")
    corpus = load_corpus(tmp_path)
    assert [(r.image_id, len(r.captions), r.split) for r in corpus.records] == [
        ("1000268201_693b08cb0e.jpg", 2, "train"),
        ("1001773457_577c3a7d70.jpg", 1, "test"),
    ]
    assert corpus.records[0].captions[1] == "A girl going into a wooden building , smiling ."
    assert dict(corpus.problems.counts) == {"duplicate": 1, "malformed": 1, "missing_image": 1}
    assert corpus.problems.examples["missing_image"] == [
        str(tmp_path / "Flicker8k_Dataset" / "2258277193_586949ec62.jpg.1")
    ]


def test_flickr_without_split_files_is_refused(tmp_path):
    _write(tmp_path / "captions.txt", "image,caption\na.jpg,x\n")
    with pytest.raises(DataError, match=r"split file Flickr_8k.trainImages.txt not found"):
        load_corpus(tmp_path)
    with pytest.raises(ValueError, match="split= only applies to COCO files"):
        load_corpus(tmp_path, split="train")


# --- Karpathy -------------------------------------------------------------------------------------


def test_karpathy_file_restval_and_tokens_only_sentences(tmp_path):
    karpathy = FIXTURES / "dataset_coco_karpathy_tiny.json"
    for image in json.loads(karpathy.read_text())["images"]:
        _image(tmp_path / image["filepath"] / image["filename"])
    corpus = load_corpus(karpathy, images_dir=tmp_path)
    assert corpus.source == "karpathy"
    assert [(r.image_id, r.split, len(r.captions)) for r in corpus.records] == [
        ("391895", "test", 2), ("522418", "restval", 2), ("184613", "val", 1), ("318556", "train", 1)
    ]  # fmt: skip
    assert corpus.records[0].path == tmp_path / "val2014" / "COCO_val2014_000000391895.jpg"
    assert corpus.records[0].captions[0] == "A man with a red helmet on a small moped on a dirt road."
    assert corpus.records[1].captions[1] == "a woman cutting a large white sheet cake"  # from tokens
    assert dict(corpus.problems.counts) == {"empty_caption": 1}
    assert [r.image_id for r in corpus.split("train")] == ["522418", "318556"]
    assert [r.image_id for r in corpus.split("train", restval_as_train=False)] == ["318556"]
    assert len(corpus.train_captions()) == 3 and len(corpus.train_captions(restval_as_train=False)) == 1
    assert corpus.to_references("test") == {"391895": list(corpus.records[0].captions)}


def test_karpathy_flickr_style_entries(tmp_path):
    _image(tmp_path / "a.jpg")
    _image(tmp_path / "b.jpg")
    sentence = {"tokens": ["a", "dog"], "raw": "A dog."}
    images = [
        {"filename": "a.jpg", "imgid": 0, "split": "train", "sentences": [sentence]},
        {"filename": "a.jpg", "imgid": 1, "split": "test", "sentences": [sentence]},
        {"filename": "b.jpg", "imgid": 2, "split": "holdout", "sentences": [sentence]},
        {"filename": "c.jpg", "imgid": 3, "split": "val", "sentences": []},
        {"imgid": 4, "split": "val", "sentences": [sentence]},
    ]
    corpus = load_corpus(_json(tmp_path / "dataset_flickr8k.json", {"images": images, "dataset": "flickr8k"}))
    assert corpus.records == [ImageRecord("a.jpg", tmp_path / "a.jpg", ("A dog.",), "train")]
    assert dict(corpus.problems.counts) == {"duplicate": 1, "malformed": 2, "no_captions": 1}
    assert corpus.problems.examples["malformed"] == [
        "b.jpg: unknown split 'holdout'",
        "images[4] lacks 'filename' or a 'sentences' list",
    ]


# --- corpus helpers, vocabulary, reporting -----------------------------------------------------------


def _toy_corpus(tmp_path: Path) -> CaptionCorpus:
    lines = ["image,caption"]
    lines += [f"train{i}.jpg,a dog runs on grass" for i in range(4)]
    lines += [f"val{i}.jpg,a cat sleeps" for i in range(3)]
    lines += [f"test{i}.jpg,a zanzibar ferry" for i in range(6)]
    names = [line.split(",")[0] for line in lines[1:]]
    splits = {s: [n for n in names if n.startswith(s.replace("dev", "val"))] for s in ("train", "dev", "test")}
    return load_corpus(_flickr(tmp_path, lines, splits, images=names))


def test_vocabulary_is_built_from_the_training_split_only(tmp_path):
    corpus = _toy_corpus(tmp_path)
    assert "zanzibar" not in Vocabulary.build(corpus.train_captions(), min_count=1)
    everything = [c for r in corpus.records for c in r.captions]
    assert "zanzibar" in Vocabulary.build(everything, min_count=5)  # so the check above means something


def test_subset_is_deterministic_per_split(tmp_path):
    corpus = _toy_corpus(tmp_path)
    small = corpus.subset(2)
    assert [r.image_id for r in small.records] == ["train0.jpg", "train1.jpg", "val0.jpg", "val1.jpg",
                                                    "test0.jpg", "test1.jpg"]  # fmt: skip
    sampled = corpus.subset(2, seed=3)
    assert sampled.records == corpus.subset(2, seed=3).records
    assert sampled.split_sizes() == {"train": 2, "val": 2, "test": 2}
    assert corpus.subset(100).records == corpus.records
    assert small.problems is corpus.problems and small.source == "flickr8k"
    with pytest.raises(ValueError, match="unknown split 'dev'; expected one of"):
        corpus.split("dev")


def test_verify_images_skips_corrupt_and_truncated_files(tmp_path):
    lines = ["image,caption", "good.jpg,fine", "garbage.jpg,not an image", "cut.jpg,truncated"]
    root = _flickr(tmp_path, lines, {"train": ["good.jpg", "garbage.jpg", "cut.jpg"]}, images=["good.jpg"])
    _write(root / "images" / "garbage.jpg", "hello")
    big = Image.effect_noise((256, 256), 64).convert("RGB")
    big.save(root / "images" / "cut.jpg", quality=95)
    data = (root / "images" / "cut.jpg").read_bytes()
    (root / "images" / "cut.jpg").write_bytes(data[: len(data) // 2])
    assert len(load_corpus(root)) == 3  # off by default: only existence is checked
    corpus = load_corpus(root, verify_images=True)
    assert [r.image_id for r in corpus.records] == ["good.jpg"]
    assert corpus.problems.count("unreadable_image") == 2
    assert corpus.problems.examples["unreadable_image"][1].startswith(f"{root / 'images' / 'cut.jpg'}: ")


def test_problems_are_logged_as_one_line_per_kind(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="training.data"):
        load_corpus(_coco_file(tmp_path))
    info, warning = caplog.records
    assert info.levelno == logging.INFO and "2 images, 3 captions (train 2)" in info.getMessage()
    assert warning.levelno == logging.WARNING
    assert warning.getMessage().splitlines()[1:] == [
        "unknown_image: 1 caption for an image id that is not in the image list (skipped), "
        "e.g. annotation 15 -> image 9",
        "empty_caption: 1 empty caption (skipped), e.g. annotation 13",
        "no_captions: 1 image with no captions (skipped), e.g. 3",
        f"missing_image: 1 image file not found (skipped), e.g. {tmp_path / 'train2017' / '000000000004.jpg'}",
    ]


def test_load_report_keeps_the_first_examples_and_merges():
    report = LoadReport(max_examples=2)
    for i in range(5):
        report.add("missing_image", f"img{i}")
    other = LoadReport(max_examples=2)
    other.add("missing_image", "other")
    other.add("duplicate", "dup")
    report.merge(other)
    assert dict(report.counts) == {"missing_image": 6, "duplicate": 1}
    assert report.examples["missing_image"] == ["img0", "img1"]
    assert report.total == 7
    assert LoadReport().summary() == "no problems"
    with pytest.raises(ValueError, match="unknown problem kind 'oops'"):
        report.add("oops", "x")
