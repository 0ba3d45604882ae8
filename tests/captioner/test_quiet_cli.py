"""A quiet command line: Ctrl-C is one line and exit 130; a first-use ONNX export is two lines, not a flood."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
from PIL import Image

from captioner import export_cache
from captioner.bulk import RecordFile, read_records
from captioner.checkpoint import CheckpointError
from captioner.model import export_checkpoint
from captioner.onnx_export import EXPORTER_LOGGERS, quiet_exporter
from tests.helpers import tiny_captioner
from tests.interrupt import ROOT, WORKING, interrupt, script, stand_in_command

KEPT = re.compile(r"captioner: interrupted: (\d+) records kept in (.+); run the same command again to resume\n")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("quiet") / "model.pt"
    tiny_captioner().save(path)  # 64-pixel crops: a few milliseconds an image
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Enough photos that a run is still going when Ctrl-C comes (copies of one: quick to make)."""
    folder = tmp_path_factory.mktemp("photos")
    first = folder / "photo0000.jpg"
    Image.new("RGB", (48, 40), (200, 120, 40)).save(first)
    for i in range(1, 600):
        shutil.copyfile(first, folder / f"photo{i:04d}.jpg")
    return folder


def _caption_command(checkpoint: Path, *args: str) -> list[str]:
    flags = ["--checkpoint", str(checkpoint), "--backend", "torch", "--method", "greedy", "--no-progress"]
    return [script("captioner"), "caption", *args, *flags, "--batch-size", "2", "--workers", "1"]


def _records_in(path: Path, at_least: int) -> bool:
    return path.exists() and len(read_records(path)) >= at_least


@pytest.mark.parametrize("suffix", [".jsonl", pytest.param(".csv", marks=pytest.mark.slow)])
def test_ctrl_c_in_a_bulk_run_keeps_whole_records_and_says_how_many(checkpoint, photos, tmp_path, suffix) -> None:
    out = tmp_path / f"captions{suffix}"
    run = interrupt(_caption_command(checkpoint, str(photos), "--output", str(out)), lambda o: _records_in(out, 4))
    assert run.returncode == 130, run.describe()
    assert run.before == [] and len(run.after) == 1, run.describe()
    match = KEPT.fullmatch(run.after[0])
    assert match and match.group(2) == str(out), run.describe()
    data = out.read_bytes()
    assert data.endswith(b"\n")  # nothing written in part
    records = read_records(out)
    assert 4 <= len(records) == int(match.group(1)) < 600, run.describe()
    assert all(r["caption"] if suffix == ".csv" else r["captions"][0]["text"] for r in records)
    if suffix == ".jsonl":
        assert len(data.splitlines()) == len(records)
        assert all(json.loads(line)["image"] for line in data.splitlines())
    # what the next run resumes from: every record kept, nothing cut away
    resumed = RecordFile(out)
    resumed.close()
    assert out.read_bytes() == data and resumed.done == {r["image"] for r in records}


def test_ctrl_c_while_captioning_to_the_terminal_is_one_line(checkpoint, photos) -> None:
    run = interrupt(_caption_command(checkpoint, str(photos)), lambda o: len(o.stdout) >= 2)
    assert run.returncode == 130, run.describe()
    assert run.before == [] and run.after == ["captioner: interrupted\n"], run.describe()
    assert 2 <= len(run.stdout) < 600


@pytest.mark.parametrize(
    ("command", "slow_stage"),
    [
        (["info", "default"], "captioner.model:Captioner.from_checkpoint"),
        (["export", "default", "{tmp}/model.pt"], "captioner.model:Captioner.from_checkpoint"),
        (["rules", "default", "{tmp}/model.pt", "--data", "{tmp}"], "captioner.checkpoint:load_checkpoint"),
        (["merge", "{tmp}/out.jsonl"], "captioner.bulk:merge_parts"),
    ],
    ids=["info", "export", "rules", "merge"],
)
def test_ctrl_c_in_every_subcommand_is_one_line(command, slow_stage, tmp_path) -> None:
    argv = [arg.format(tmp=tmp_path) for arg in command]
    console_script = stand_in_command(slow_stage, "training.data_commands:main", *argv)  # what `captioner` runs
    run = interrupt(console_script, lambda o: WORKING + "\n" in o.stdout)
    assert run.returncode == 130, run.describe()
    assert run.before == [] and run.after == ["captioner: interrupted\n"], run.describe()


# -- the exporter's output --------------------------------------------------------------------------


def _talk() -> None:
    """What the exporter's libraries do during an export."""
    logging.getLogger("onnxscript.optimizer").info("constant folding ...")
    logging.getLogger("onnx_ir.passes").warning("pass ...")
    warnings.warn("an exporter internal", UserWarning, stacklevel=1)
    print("[torch.onnx] Obtain model graph ...")


def test_the_exporters_libraries_are_quiet_during_an_export_and_restored_after(caplog, capsys) -> None:
    caplog.set_level(logging.INFO)  # a root logger that shows INFO, as captioner-serve's does
    logging.getLogger("onnx_ir").setLevel(logging.INFO)  # a level set beforehand comes back afterwards
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with quiet_exporter():
                _talk()
        assert caught == [] and caplog.records == [] and capsys.readouterr().out == ""
        assert logging.getLogger("onnx_ir").level == logging.INFO
        assert all(logging.getLogger(name).level in (logging.NOTSET, logging.INFO) for name in EXPORTER_LOGGERS)
        with pytest.warns(UserWarning, match="an exporter internal"):
            _talk()
        assert len(caplog.records) == 2 and "Obtain model graph" in capsys.readouterr().out
    finally:
        logging.getLogger("onnx_ir").setLevel(logging.NOTSET)


def test_debug_logging_of_the_captioner_lets_the_exporter_talk(caplog, capsys) -> None:
    caplog.set_level(logging.INFO)
    captioner_log = logging.getLogger("captioner")
    previous = captioner_log.level
    captioner_log.setLevel(logging.DEBUG)  # what --verbose sets
    try:
        with pytest.warns(UserWarning, match="an exporter internal"), quiet_exporter():
            _talk()
    finally:
        captioner_log.setLevel(previous)
    assert [r.name for r in caplog.records] == ["onnxscript.optimizer", "onnx_ir.passes"]
    assert "Obtain model graph" in capsys.readouterr().out


def test_a_new_export_clears_the_folders_of_exports_that_never_finished(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CAPTIONER_CACHE_DIR", str(tmp_path / "cache"))
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    folder = export_cache.cached_export_dir(checkpoint)
    folder.parent.mkdir(parents=True)
    abandoned = folder.parent / f".{folder.name}.k3j2x.tmp"  # as export_onnx names its temporary folder
    (abandoned / "encoder.onnx").parent.mkdir()
    (abandoned / "encoder.onnx").write_bytes(b"half")
    other = folder.parent / ".v1-0123456789abcdef.k3j2x.tmp"  # another checkpoint's, maybe being written now
    other.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    link = folder.parent / f".{folder.name}.link.tmp"
    link.symlink_to(outside, target_is_directory=True)
    exported = []
    monkeypatch.setattr(export_cache, "_export_into_cache", lambda *args: exported.append(args))
    with pytest.raises(CheckpointError, match="not exported yet"):  # the stand-in export wrote nothing to check
        export_cache.ensure_exported(checkpoint, export_checkpoint)
    assert len(exported) == 1
    assert not abandoned.exists() and other.is_dir() and outside.is_dir()


# -- a first-use export, end to end (an export takes about as long for a tiny model as for the real one)


def _first_use(checkpoint: Path, photo: Path, cache: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    command = [script("captioner"), "caption", str(photo), "--checkpoint", str(checkpoint), "--backend", "onnxruntime"]
    return subprocess.run(
        [*command, *flags],
        cwd=ROOT,
        env={**os.environ, "CAPTIONER_CACHE_DIR": str(cache)},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_a_first_use_export_is_two_lines_and_verbose_shows_the_exporter(checkpoint, photos, tmp_path) -> None:
    photo = photos / "photo0000.jpg"
    quiet = _first_use(checkpoint, photo, tmp_path / "cache")
    assert quiet.returncode == 0, quiet.stderr
    lines = quiet.stderr.splitlines()
    assert len(lines) == 2, quiet.stderr
    assert lines[0].startswith("captioner.export_cache: exporting model.pt to ONNX for onnxruntime (first use only")
    assert re.fullmatch(r"captioner.export_cache: exported in \d+ s; later runs load it from the cache", lines[1])
    assert quiet.stdout.startswith(str(photo))
    again = _first_use(checkpoint, photo, tmp_path / "cache")  # the cache: silent
    assert again.returncode == 0 and again.stderr == "" and again.stdout == quiet.stdout

    verbose = _first_use(checkpoint, photo, tmp_path / "fresh", "--verbose")
    assert verbose.returncode == 0, verbose.stderr
    talk = [line for line in verbose.stderr.splitlines() if line.startswith(("onnx_ir", "onnxscript"))]
    assert len(talk) > 20, verbose.stderr
    assert "ONNX export check passed" in verbose.stderr  # the captioner's debug lines too
    assert verbose.stdout == quiet.stdout
