"""``captioner caption``'s inputs: glob patterns that end in a folder with link loops, manifest-relative paths."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import pytest
from PIL import Image

import captioner.bulk as bulk
from captioner.bulk import expand_inputs
from captioner.cli import main
from tests.helpers import tiny_captioner


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bulk_inputs") / "model.pt"
    tiny_captioner().save(path)
    return path


def _image(path: Path, shade: int = 0) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), (shade, 90, 160)).save(path, format="PNG" if path.suffix == ".png" else "JPEG")
    return str(path)


def _looped(root: Path) -> list[str]:
    """Three images, two links to the folder itself and one from a subfolder back up: glob never finishes here."""
    images = [_image(root / "x.jpg"), _image(root / "sub" / "y.jpg", 50), _image(root / "sub" / "deeper" / "z.png")]
    os.symlink(".", root / "a")
    os.symlink(".", root / "b")
    os.symlink("..", root / "sub" / "up")
    return sorted(images)


@pytest.mark.timeout(20)
def test_a_double_star_over_two_self_links_finishes_with_each_image_once(tmp_path, monkeypatch) -> None:
    images = _looped(tmp_path / "photos")
    photos = str(tmp_path / "photos")
    assert expand_inputs([f"{photos}/**/*.jpg"]).paths == [p for p in images if p.endswith(".jpg")]
    assert expand_inputs([f"{photos}/**"]).paths == images  # each folder matched gives its images
    assert expand_inputs([f"{photos}/**/", f"{photos}/*/*/*/*"]).paths == images
    monkeypatch.chdir(tmp_path / "photos")
    assert expand_inputs(["**/*.[jp][pn]g"]).paths == ["sub/deeper/z.png", "sub/y.jpg", "x.jpg"]


def test_a_pattern_matches_through_links_under_the_name_it_gives(tmp_path) -> None:
    shared = _image(tmp_path / "shared" / "s.jpg")
    photos = tmp_path / "photos"
    photos.mkdir()
    os.symlink(tmp_path / "shared", photos / "a")
    os.symlink(tmp_path / "shared", photos / "b")
    assert os.path.realpath(shared) == os.path.realpath(photos / "b" / "s.jpg")
    # one folder under two names: the pattern's own name for it is kept, and the image comes once
    assert expand_inputs([f"{photos}/[b]/*.jpg"]).paths == [f"{photos}/b/s.jpg"]
    assert expand_inputs([f"{photos}/**/*.jpg"]).paths == [f"{photos}/a/s.jpg"]


def _plain_tree(root: Path) -> None:
    """Folders without links, so that glob.glob itself finishes and is the reference."""
    names = ["a.jpg", "b.png", ".hidden.jpg", "notes.txt", "sub/c.jpg", "sub/.e.jpg", "sub/deep/d.jpg"]
    for name in [*names, ".cache/f.jpg", "other[1]/g.jpg", "x1/h.jpg", "x2/i.JPG", "x2/.dot/j.jpg"]:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


PATTERNS = [
    "*",
    "*.jpg",
    "**",
    "**/*.jpg",
    "**/",
    "*/",
    "sub/**",
    "sub/**/*.jpg",
    "**/deep/*.jpg",
    "**/**/*.jpg",
    ".*",
    ".*/*.jpg",
    "sub/.*",
    "**/.*",
    "?1/*",
    "x[12]/*",
    "x[!1]/*",
    "*/*.[jJ][pP][gG]",
    "other[[]1]/*.jpg",
    "s*/d*/",
    "sub/*/d.jpg",
    "sub//*.jpg",
    "./*.jpg",
    "*/../*.png",
    "a.jpg/*",
    "*.jpg/",
    "nothing/*.jpg",
    "x2/**/*.jpg",
]


@pytest.mark.parametrize("anchor", ["relative", "absolute"])
def test_patterns_match_what_glob_matches_where_it_finishes(tmp_path, monkeypatch, anchor) -> None:
    _plain_tree(tmp_path / "tree")
    monkeypatch.chdir(tmp_path / "tree")
    prefix = "" if anchor == "relative" else f"{tmp_path / 'tree'}/"
    for pattern in PATTERNS:
        reference = {p.rstrip(os.sep) or p for p in glob.glob(prefix + pattern, recursive=True)}
        found = bulk._glob(prefix + pattern)
        assert found == sorted(set(found)) and set(found) <= reference, pattern
        # the same files and folders; "*/../*.png" names each once, as the run would keep it anyway
        assert {os.path.realpath(p) for p in found} == {os.path.realpath(p) for p in reference}, pattern
        if ".." not in pattern:
            assert set(found) == reference, pattern
    # glob before 3.13 matches "**" below a file or a folder that is not there; here that names nothing
    assert bulk._glob("nothing/**") == bulk._glob("a.jpg/**") == []
    assert expand_inputs(["nothing/**", "a.jpg/**"]).missing == ["nothing/**", "a.jpg/**"]


def test_hidden_files_and_folders_match_only_a_pattern_that_starts_with_a_dot(tmp_path, monkeypatch) -> None:
    _image(tmp_path / "p.jpg")
    _image(tmp_path / ".q.jpg")
    _image(tmp_path / ".cache" / "r.jpg")
    monkeypatch.chdir(tmp_path)
    assert expand_inputs(["**/*.jpg"]).paths == ["p.jpg"]
    assert expand_inputs([".*.jpg", ".c*/*.jpg"]).paths == [".q.jpg", ".cache/r.jpg"]


@pytest.mark.parametrize("kind", [".txt", ".csv", ".jsonl"])
def test_manifest_paths_are_relative_to_the_manifest(tmp_path, monkeypatch, kind) -> None:
    lists = tmp_path / "lists"
    _image(lists / "photo.jpg")
    _image(lists / "sub" / "q.jpg")
    _image(lists / "more" / "r.png")
    absolute = _image(tmp_path / "abs.jpg")
    lines = ["photo.jpg", "sub/*.jpg", "more", absolute, "missing.jpg", "~/nope.jpg"]
    manifest = lists / f"m{kind}"
    if kind == ".csv":
        manifest.write_text("\n".join(["path", *lines, ""]))
    elif kind == ".jsonl":
        manifest.write_text("".join(json.dumps({"path": line}) + "\n" for line in [*lines, ""]))
    else:
        manifest.write_text("\n".join(["# photos", *lines]))
    (tmp_path / "elsewhere").mkdir()
    _image(tmp_path / "elsewhere" / "photo.jpg")  # the working folder's photo.jpg is not the one listed

    monkeypatch.chdir(tmp_path / "elsewhere")
    found = expand_inputs([], from_list=str(manifest))
    assert found.paths == [f"{lists}/photo.jpg", f"{lists}/sub/q.jpg", f"{lists}/more/r.png", absolute]
    assert found.missing == [f"{lists}/missing.jpg", f"{lists}/~/nope.jpg"]  # ~ is not expanded in a file

    # named as the manifest's path names its folder, so a run again from here finds the same names
    found = expand_inputs(["photo.jpg"], from_list=f"../lists/m{kind}")
    assert found.paths == ["photo.jpg", "../lists/photo.jpg", "../lists/sub/q.jpg", "../lists/more/r.png", absolute]

    monkeypatch.chdir(lists)  # a manifest in the working folder: its lines as they are
    for name in (f"m{kind}", f"./m{kind}"):
        assert expand_inputs([], from_list=name).paths == ["photo.jpg", "sub/q.jpg", "more/r.png", absolute]


def test_a_manifest_folder_name_is_not_a_pattern(tmp_path, monkeypatch) -> None:
    folder = tmp_path / "set [1]"
    _image(folder / "p.jpg")
    _image(tmp_path / "set 1" / "decoy.jpg")  # what "set [1]" would match as a pattern
    (folder / "list.txt").write_text("*.jpg\n")
    monkeypatch.chdir(tmp_path)
    assert expand_inputs([], from_list="set [1]/list.txt").paths == ["set [1]/p.jpg"]


def test_caption_a_looped_glob_and_a_manifest_elsewhere_then_resume(checkpoint, tmp_path, monkeypatch) -> None:
    images = _looped(tmp_path / "photos")
    _image(tmp_path / "lists" / "photo.jpg", 200)
    (tmp_path / "lists" / "m.csv").write_text("path\nphoto.jpg\n")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    out = tmp_path / "out.jsonl"
    argv = ["caption", f"{tmp_path}/photos/**/*.jpg", "--from-list", "../lists/m.csv", "--output", str(out)]
    argv += ["--checkpoint", str(checkpoint), "--backend", "torch", "--method", "greedy", "--workers", "0"]
    assert main(argv) == 0
    records = bulk.read_records(out)
    assert [r["image"] for r in records] == [*(p for p in images if p.endswith(".jpg")), "../lists/photo.jpg"]
    assert all(r["captions"][0]["text"] for r in records)
    assert main(argv) == 0  # a run again finds every image recorded under the same name: nothing to do
    assert bulk.read_records(out) == records
