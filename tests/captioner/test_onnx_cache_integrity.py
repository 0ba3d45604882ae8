"""The ONNX export cache cannot be poisoned (issue 24, part 3): each finding of the audit, reproduced.

One real export (the tiny served model) makes a pristine cache; each test tampers with a copy of it. Where an
entry is refused and exported again, a stand-in copies the pristine export into place (the real exporter takes
half a minute here); one slow test lets the real exporter rebuild it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from captioner import Captioner, DecodingOptions, export_cache
from captioner import model as model_module
from captioner.checkpoint import CheckpointError
from captioner.cli import main
from captioner.onnx_export import GRAPH_FILES, MANIFEST_FILE, METADATA_FILE, write_manifest
from service.app import ModelLoadError, load_model
from service.settings import Settings
from tests.service.server import running_server
from tests.service.tiny_model import save_tiny_checkpoint

pytest.importorskip("onnxruntime")

POISON = "POISONED"
GREEDY = DecodingOptions(method="greedy")


@dataclass
class Pristine:
    checkpoint: Path
    entry: Path  # the checkpoint's export in a cache, made by the real exporter
    photos: list[Path]
    captions: list[str]  # the model's own greedy captions of the photos


def _photos(folder: Path) -> list[Path]:
    folder.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        path = folder / f"photo{i}.png"
        Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((320, 240), Image.BICUBIC).save(path)
        paths.append(path)
    return paths


def _captions(model: Captioner, photos: list[Path]) -> list[str]:
    return [result.captions[0].text for result in model.caption([str(p) for p in photos], GREEDY)]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    root = tmp_path_factory.mktemp("pristine")
    checkpoint = save_tiny_checkpoint(root / "tiny.pt")
    umask = os.umask(0)  # the most permissive umask: the export must still be writable by nobody but its owner
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("CAPTIONER_CACHE_DIR", str(root / "cache"))
            model = Captioner.from_checkpoint(checkpoint, backend="onnxruntime")
    finally:
        os.umask(umask)
    photos = _photos(root / "photos")
    assert model.export_dir is not None
    return Pristine(checkpoint, model.export_dir, photos, _captions(model, photos))


@pytest.fixture
def entry(pristine: Pristine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the pristine cache (modes kept) that CAPTIONER_CACHE_DIR points at; its entry for the checkpoint."""
    cache = tmp_path / "cache"
    shutil.copytree(pristine.entry.parent.parent, cache, symlinks=True)
    monkeypatch.setenv("CAPTIONER_CACHE_DIR", str(cache))
    return cache / "onnx" / pristine.entry.name


@pytest.fixture
def exports(pristine: Pristine, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The folders exported into the cache; each export is a copy of what the real exporter wrote."""
    made: list[Path] = []

    def export(checkpoint: Path, sha: str, folder: Path) -> None:
        shutil.copytree(pristine.entry, folder)
        made.append(folder)

    monkeypatch.setattr(model_module, "export_checkpoint", export)
    return made


def _load(pristine: Pristine) -> Captioner:
    return Captioner.from_checkpoint(pristine.checkpoint, backend="onnxruntime")


def _poison_vocabulary(folder: Path, *, update_manifest: bool) -> None:
    """The audit's edit: every word of the vocabulary in captioner.json replaced (the special tokens kept)."""
    meta = json.loads((folder / METADATA_FILE).read_text())
    meta["vocab"] = [t if t.startswith("<") else f"{POISON}{i}" for i, t in enumerate(meta["vocab"])]
    (folder / METADATA_FILE).write_text(json.dumps(meta))
    if update_manifest:
        write_manifest(folder)


def _assert_rebuilt(pristine: Pristine, entry: Path, exports: list[Path], model: Captioner) -> None:
    """The entry was exported again, is a real folder again, and the model says what the checkpoint says."""
    assert exports == [entry]
    assert model.export_dir == entry and entry.is_dir() and not entry.is_symlink()
    captions = _captions(model, pristine.photos)
    assert captions == pristine.captions and POISON.lower() not in " ".join(captions).lower()
    # what was refused was set aside and deleted: only the entry and its lock file are left
    assert sorted(p.name for p in entry.parent.iterdir()) == sorted([entry.name, f".{entry.name}.lock"])


def test_the_exporter_writes_an_entry_only_its_owner_can_write_whatever_the_umask(pristine: Pristine) -> None:
    """The pristine export was made under umask 0: nothing in it may be writable by group or others."""
    paths = [pristine.entry, *pristine.entry.iterdir()]
    assert {p.name for p in paths[1:]} == {*GRAPH_FILES.values(), METADATA_FILE, MANIFEST_FILE}
    assert {stat.S_IMODE(p.stat().st_mode) & 0o022 for p in paths} == {0}
    assert stat.S_IMODE(pristine.entry.stat().st_mode) & 0o555 == 0o555  # still readable by all (a container's user)


def test_an_edited_vocabulary_is_refused_and_the_entry_exported_again(pristine, entry, exports, caplog) -> None:
    _poison_vocabulary(entry, update_manifest=False)
    with caplog.at_level(logging.WARNING, "captioner"):
        model = _load(pristine)
    _assert_rebuilt(pristine, entry, exports, model)
    assert f"{METADATA_FILE} does not match its sha256 in {MANIFEST_FILE}" in caplog.text
    assert json.loads((entry / METADATA_FILE).read_text())["vocab"] == list(model.vocab.tokens)


def test_even_an_accepted_entry_never_supplies_the_models_words(pristine, entry, exports, tmp_path) -> None:
    """Someone running as this user can rewrite the manifest too (outside the threat model): the entry then passes,
    but the vocabulary, rules and metadata still come from the checkpoint."""
    _poison_vocabulary(entry, update_manifest=True)
    model = _load(pristine)
    assert exports == [] and model.export_dir == entry  # accepted as it is
    assert _captions(model, pristine.photos) == pristine.captions
    # the poison is real: the same files, loaded as an export folder (which describes its own model), say it
    poisoned = Captioner.from_checkpoint(shutil.copytree(entry, tmp_path / "as-a-folder"), backend="onnxruntime")
    assert all(caption.lower().startswith(POISON.lower()) for caption in _captions(poisoned, pristine.photos))


def test_a_symlinked_entry_is_not_followed(pristine, entry, exports, tmp_path, caplog) -> None:
    elsewhere = tmp_path / "elsewhere"
    entry.rename(elsewhere)  # a complete, genuine export, reached through a link
    entry.symlink_to(elsewhere, target_is_directory=True)
    with caplog.at_level(logging.WARNING, "captioner"):
        model = _load(pristine)
    _assert_rebuilt(pristine, entry, exports, model)
    assert "the folder is a symbolic link" in caplog.text
    assert sorted(p.name for p in elsewhere.iterdir()) == sorted(p.name for p in entry.iterdir())  # left alone


@pytest.mark.parametrize("name", [GRAPH_FILES["encoder"], METADATA_FILE, MANIFEST_FILE])
def test_a_symlinked_file_in_the_entry_is_not_followed(pristine, entry, exports, tmp_path, name, caplog) -> None:
    """Even a link to a file with exactly the right bytes: the link could change after the check."""
    outside = tmp_path / name
    (entry / name).rename(outside)
    (entry / name).symlink_to(outside)
    with caplog.at_level(logging.WARNING, "captioner"):
        model = _load(pristine)
    _assert_rebuilt(pristine, entry, exports, model)
    assert f"{name} is a symbolic link" in caplog.text


def test_a_file_that_no_export_writes_refuses_the_entry(pristine, entry, exports, caplog) -> None:
    (entry / "extra.onnx").write_bytes((entry / GRAPH_FILES["encoder"]).read_bytes())
    with caplog.at_level(logging.WARNING, "captioner"):
        model = _load(pristine)
    _assert_rebuilt(pristine, entry, exports, model)
    assert "holds 'extra.onnx', which no export writes" in caplog.text


def test_an_entry_that_cannot_be_listed_is_refused_not_a_traceback(pristine, entry, exports, monkeypatch):
    """A folder without read permission (root, running these tests, could list any: the refusal is stood in)."""
    real_listdir = os.listdir

    def unreadable(path=".") -> list[str]:
        if isinstance(path, int):  # the entry, listed through its descriptor
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", unreadable)
    with pytest.raises(CheckpointError, match="cannot list the folder \\(Permission denied\\)"):
        _load(pristine)  # refused, exported again, and the new entry cannot be listed either
    assert exports == [entry]
    monkeypatch.setattr(os, "listdir", real_listdir)
    _assert_rebuilt(pristine, entry, exports, _load(pristine))


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_graph_paths_leaving_the_entry_are_refused(pristine, entry, exports, tmp_path, where, caplog) -> None:
    outside = tmp_path / "outside" / "encoder.onnx"
    outside.parent.mkdir()
    shutil.copy(entry / GRAPH_FILES["encoder"], outside)
    meta = json.loads((entry / METADATA_FILE).read_text())
    meta["graphs"]["encoder"] = os.path.relpath(outside, entry) if where == "relative" else str(outside)
    (entry / METADATA_FILE).write_text(json.dumps(meta))
    write_manifest(entry)  # consistent: only the paths are wrong
    with caplog.at_level(logging.WARNING, "captioner"):
        model = _load(pristine)
    _assert_rebuilt(pristine, entry, exports, model)
    assert "names graph files other than the export's own" in caplog.text
    # an export folder given directly: refused too, in one line
    folder = shutil.copytree(entry, tmp_path / "folder")
    (folder / METADATA_FILE).write_text(json.dumps(meta))
    write_manifest(folder)
    with pytest.raises(CheckpointError, match="names graph files other than the export's own") as refused:
        Captioner.from_checkpoint(folder, backend="onnxruntime")
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("bits", [stat.S_IWGRP, stat.S_IWOTH], ids=["group", "others"])
@pytest.mark.parametrize("target", ["the folder", GRAPH_FILES["decoder_step"], MANIFEST_FILE])
def test_an_entry_others_can_write_is_refused_and_exported_again(pristine, entry, exports, target, bits, caplog):
    path = entry if target == "the folder" else entry / target
    os.chmod(path, stat.S_IMODE(path.stat().st_mode) | bits)
    with caplog.at_level(logging.WARNING, "captioner"):
        model = _load(pristine)
    _assert_rebuilt(pristine, entry, exports, model)
    assert f"{target} is writable by group or others" in caplog.text


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="only root can give files to another user")
def test_an_entry_of_another_user_is_refused_and_one_of_root_accepted(pristine, entry, exports, monkeypatch, caplog):
    os.chown(entry / GRAPH_FILES["encoder"], 12345, 12345)
    with caplog.at_level(logging.WARNING, "captioner"):
        model = _load(pristine)
    _assert_rebuilt(pristine, entry, exports, model)
    assert f"{GRAPH_FILES['encoder']} is owned by uid 12345" in caplog.text
    # the Docker image's case: a root-owned cache read by the service's own user (uid 10001)
    monkeypatch.setattr(os, "getuid", lambda: 10001)
    assert _load(pristine).export_dir == entry and len(exports) == 1


def test_a_changed_graph_is_refused_and_exported_again(pristine, entry, exports, caplog) -> None:
    graph = entry / GRAPH_FILES["decoder_step"]
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte inside the weights
    graph.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, "captioner"):
        model = _load(pristine)
    _assert_rebuilt(pristine, entry, exports, model)
    assert f"{GRAPH_FILES['decoder_step']} does not match its sha256 in {MANIFEST_FILE}" in caplog.text


def test_another_checkpoints_entry_renamed_into_place_is_refused(pristine, entry, exports, caplog) -> None:
    meta = json.loads((entry / METADATA_FILE).read_text())
    meta["source"]["sha256"] = "f" * 64  # as a genuine entry of another checkpoint records
    (entry / METADATA_FILE).write_text(json.dumps(meta))
    write_manifest(entry)
    with caplog.at_level(logging.WARNING, "captioner"):
        model = _load(pristine)
    _assert_rebuilt(pristine, entry, exports, model)
    assert "made from another checkpoint (sha256 ffffffffffffffff" in caplog.text


def test_a_symlinked_lock_file_is_replaced_not_followed(pristine, entry, exports, tmp_path) -> None:
    shutil.rmtree(entry)  # a first use: the lock is taken
    lock = entry.parent / f".{entry.name}.lock"
    lock.unlink(missing_ok=True)
    victim = tmp_path / "victim"
    victim.write_text("not yours")
    lock.symlink_to(victim)
    model = _load(pristine)
    assert exports == [entry] and _captions(model, pristine.photos) == pristine.captions
    assert lock.is_file() and not lock.is_symlink() and victim.read_text() == "not yours"


def test_a_lock_file_linked_again_after_its_removal_is_one_line(
    pristine, entry, exports, tmp_path, monkeypatch, capsys
):
    """The link appears between the check for one and the lock's open: the open refuses it (ELOOP), in one line,
    from the library, the command line and the service's start-up."""
    import filelock

    shutil.rmtree(entry)
    lock = entry.parent / f".{entry.name}.lock"
    lock.unlink(missing_ok=True)
    real_lock = filelock.FileLock

    def linked_just_before(path: str, *args, **kwargs):
        if not os.path.lexists(path):
            os.symlink(tmp_path / "victim", path)
        return real_lock(path, *args, **kwargs)

    monkeypatch.setattr(filelock, "FileLock", linked_just_before)
    with pytest.raises(CheckpointError) as raised:
        _load(pristine)
    message = str(raised.value)
    assert "Too many levels of symbolic links" in message and str(lock) in message and "\n" not in message
    lock.unlink()  # each attempt below meets the link the same way: put there just before the lock's open
    argv = ["caption", str(pristine.photos[0]), "--checkpoint", str(pristine.checkpoint), "--backend", "onnxruntime"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Too many levels of symbolic links" in err
    lock.unlink()
    with pytest.raises(ModelLoadError, match="Too many levels of symbolic links") as failed:
        load_model(Settings(checkpoint=str(pristine.checkpoint), backend="onnxruntime"))
    assert "\n" not in str(failed.value)
    assert exports == [] and not (tmp_path / "victim").exists()


def test_a_refused_entry_in_a_cache_that_cannot_be_written_is_one_line(pristine, entry, monkeypatch, capsys) -> None:
    """A read-only volume (the rename that sets a refused entry aside fails): the error names the entry and why."""

    def read_only(folder: Path) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(folder))

    monkeypatch.setattr(export_cache, "_set_aside", read_only)
    os.chmod(entry, 0o777)
    with pytest.raises(CheckpointError) as raised:
        _load(pristine)
    message = str(raised.value)
    assert f"the cached ONNX export {entry} was refused (the folder is writable by group or others" in message
    assert "set CAPTIONER_CACHE_DIR to a writable folder" in message and "\n" not in message
    argv = ["caption", str(pristine.photos[0]), "--checkpoint", str(pristine.checkpoint), "--backend", "onnxruntime"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{entry} was refused" in err


def test_an_export_folder_given_directly_has_its_manifest_checked(pristine, tmp_path) -> None:
    """No checkpoint to bind it to, and the user's own choice: owners and modes are not checked, the digests are."""
    folder = shutil.copytree(pristine.entry, tmp_path / "export")
    os.chmod(folder, 0o777)
    assert _captions(Captioner.from_checkpoint(folder, backend="onnxruntime"), pristine.photos) == pristine.captions
    cases = {
        METADATA_FILE: lambda: _poison_vocabulary(folder, update_manifest=False),
        GRAPH_FILES["encoder"]: lambda: (folder / GRAPH_FILES["encoder"]).write_bytes(b"\x08" * 100),
    }
    for name, tamper in cases.items():
        tamper()
        with pytest.raises(CheckpointError, match=f"{name} does not match its sha256 in {MANIFEST_FILE}"):
            Captioner.from_checkpoint(folder, backend="onnxruntime")
        shutil.copy(pristine.entry / name, folder / name)
    (folder / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"incomplete \\(missing {MANIFEST_FILE}\\)"):
        Captioner.from_checkpoint(folder, backend="onnxruntime")
    meta = json.loads((folder / METADATA_FILE).read_text())
    (folder / METADATA_FILE).write_text(json.dumps({**meta, "format_version": 1}))  # made before the manifest
    with pytest.raises(CheckpointError, match="format version 1 is not supported.*export the checkpoint again"):
        Captioner.from_checkpoint(folder, backend="onnxruntime")


@pytest.mark.slow
def test_a_changed_encoder_is_exported_again_by_the_real_exporter(pristine, entry, caplog) -> None:
    import onnx
    from onnx import numpy_helper

    graph = entry / GRAPH_FILES["encoder"]
    model = onnx.load(str(graph))
    weight = next(w for w in model.graph.initializer if numpy_helper.to_array(w).ndim == 4)
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) + 0.5, weight.name))
    onnx.save(model, str(graph))
    tampered = graph.read_bytes()
    with caplog.at_level(logging.INFO, "captioner"):
        loaded = _load(pristine)
    assert f"{GRAPH_FILES['encoder']} does not match its sha256" in caplog.text and "exported in" in caplog.text
    assert _captions(loaded, pristine.photos) == pristine.captions
    assert graph.read_bytes() != tampered


@pytest.mark.slow
def test_a_server_on_a_poisoned_cache_captions_with_the_models_own_words(pristine, entry) -> None:
    """The audit's exact case, through a real captioner-serve process: only captioner.json edited in the entry."""
    _poison_vocabulary(entry, update_manifest=False)
    env = {"CAPTIONER_CACHE_DIR": str(entry.parent.parent), "CAPTIONER_BACKEND": "onnxruntime"}
    with running_server(pristine.checkpoint, env, timeout=300) as server, httpx.Client(base_url=server.url) as client:
        assert client.get("/model", timeout=30).json()["backend"] == "onnxruntime"
        for photo, expected in zip(pristine.photos, pristine.captions, strict=True):
            files = {"image": (photo.name, photo.read_bytes(), "image/png")}
            response = client.post("/caption", params={"method": "greedy"}, files=files, timeout=60)
            assert response.status_code == 200, response.text
            assert response.json()["captions"][0]["text"] == expected
    assert "refused the cached ONNX export" in server.log and "Traceback" not in server.log
    assert json.loads((entry / METADATA_FILE).read_text())["vocab"] == list(_load(pristine).vocab.tokens)
