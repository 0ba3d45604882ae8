"""Bulk captioning: inputs (folders, globs, manifests), streamed resumable output, decoding threads, torchrun parts."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import captioner.bulk as bulk
from captioner import Captioner, DecodingOptions
from captioner.bulk import InputError, RecordFile, expand_inputs, merge_parts, part_path, read_manifest
from captioner.cli import main
from captioner.encoders import file_sha256
from tests.helpers import free_port, tiny_captioner

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bulk") / "model.pt"
    tiny_captioner().save(path)
    return path


def bulk_sha(path: Path) -> str:
    return file_sha256(path)[:12]


def _tree(root: Path, count: int = 5) -> list[str]:
    """``count`` images in a folder tree (one in a subfolder), a non-image file and a link loop."""
    (root / "sub").mkdir(parents=True)
    paths = []
    for i in range(count):
        path = root / ("sub" if i == count - 1 else ".") / f"img{i:02d}.{'png' if i % 2 else 'JPG'}"
        Image.new("RGB", (40 + i, 30), (40 * i % 255, 90, 160)).save(path, format="PNG" if i % 2 else "JPEG")
        paths.append(os.path.normpath(str(path)))
    (root / "notes.txt").write_text("not an image")
    os.symlink(root, root / "sub" / "loop")  # a folder link back up: walked once
    return sorted(paths)


def test_folders_globs_files_and_missing_inputs(tmp_path) -> None:
    images = _tree(tmp_path / "photos")
    odd = tmp_path / "photo.data"
    Image.new("RGB", (8, 8)).save(odd, format="PNG")
    found = expand_inputs(
        [str(tmp_path / "photos"), str(tmp_path / "photos" / "*.png"), str(odd), "nope.jpg", "none/*.jpg"]
    )
    assert [os.path.normpath(p) for p in found.paths] == [*images, str(odd)]  # sorted, recursive, each once
    assert found.missing == ["nope.jpg", "none/*.jpg"]


def test_manifests_text_csv_and_jsonl(tmp_path) -> None:
    (tmp_path / "list.txt").write_text("# photos\na.jpg\n\nb.jpg\n")
    assert read_manifest(str(tmp_path / "list.txt")) == ["a.jpg", "b.jpg"]
    with open(tmp_path / "list.csv", "w", newline="") as f:
        csv.writer(f).writerows([["id", "image", "alt"], ["1", "x.jpg", "old"], ["2", "y.jpg", ""]])
    assert read_manifest(str(tmp_path / "list.csv")) == ["x.jpg", "y.jpg"]
    assert read_manifest(str(tmp_path / "list.csv"), "id") == ["1", "2"]
    (tmp_path / "list.jsonl").write_text('{"file": "p.jpg"}\n{"file": "q.jpg", "n": 2}\n')
    assert read_manifest(str(tmp_path / "list.jsonl")) == ["p.jpg", "q.jpg"]
    with pytest.raises(InputError, match="no column 'url'"):
        read_manifest(str(tmp_path / "list.csv"), "url")
    (tmp_path / "bad.jsonl").write_text('{"path": "a"}\n[1, 2]\n')
    with pytest.raises(InputError, match="bad.jsonl:2: not a JSON object"):
        read_manifest(str(tmp_path / "bad.jsonl"))
    with pytest.raises(InputError, match="cannot read the list"):
        read_manifest(str(tmp_path / "missing.txt"))


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_record_cut_off_by_a_kill_is_dropped_and_the_rest_is_kept(tmp_path, suffix) -> None:
    out = tmp_path / f"out{suffix}"
    sink = RecordFile(out)
    sink.write([{"image": "a.jpg", "captions": [{"text": "a dog", "log_prob": -1.0, "score": -1.0}]}])
    sink.write([{"image": "b.jpg", "error": "truncated"}])
    sink.close()
    with open(out, "a") as f:  # a kill in the middle of the next record
        f.write('{"image": "c.jpg", "capt' if suffix == ".jsonl" else "c.jpg,a ca")
    again = RecordFile(out)
    assert again.done == {"a.jpg", "b.jpg"}
    again.write([{"image": "c.jpg", "captions": [{"text": "a cat", "log_prob": -2.0, "score": -2.0}]}])
    again.close()
    records = bulk.read_records(out)
    assert [r["image"] for r in records] == ["a.jpg", "b.jpg", "c.jpg"]
    if suffix == ".csv":
        assert records[2]["caption"] == "a cat" and records[1]["error"] == "truncated"


def test_an_output_file_this_command_did_not_write_is_refused(tmp_path) -> None:
    (tmp_path / "notes.jsonl").write_text("hello\n")
    with pytest.raises(InputError, match="not an output file of this command"):
        RecordFile(tmp_path / "notes.jsonl")
    with pytest.raises(InputError, match=r"\.jsonl or \.csv"):
        RecordFile(tmp_path / "out.txt")


def test_caption_a_folder_into_jsonl_then_run_again_and_resume(checkpoint, tmp_path, monkeypatch, capsys) -> None:
    images = _tree(tmp_path / "photos", count=7)
    (tmp_path / "photos" / "zz-broken.jpg").write_text("not a photo")  # sorted last: in the resumed run
    out = tmp_path / "out.jsonl"
    argv = ["caption", str(tmp_path / "photos"), "missing.jpg", "--output", str(out), "--checkpoint", str(checkpoint)]
    argv += ["--backend", "torch", "--method", "greedy", "--batch-size", "3", "--workers", "0"]

    # the first run dies after its first batch (as a kill would), leaving half a record behind
    real_stream = bulk.caption_stream

    def dies_after_one_batch(*args, **kwargs):
        stream = real_stream(*args, **kwargs)
        yield next(stream)
        with open(out, "a") as f:
            f.write('{"image": "')
        raise KeyboardInterrupt

    monkeypatch.setattr(bulk, "caption_stream", dies_after_one_batch)
    assert main(argv) == 130
    first = bulk.read_records(out)
    assert len(first) == 3  # one batch
    assert capsys.readouterr().err == (
        f"captioner: interrupted: 3 records kept in {out}; run the same command again to resume\n"
    )
    monkeypatch.setattr(bulk, "caption_stream", real_stream)

    assert main(argv) == 1  # the broken photo fails; the run goes on
    err = capsys.readouterr().err
    assert "zz-broken.jpg: not a recognised image format" in err and "3 images already in" in err
    assert "missing.jpg: no such file" in err
    records = bulk.read_records(out)
    names = [r["image"] for r in records]
    assert len(names) == len(set(names)) == 8 + 1  # no duplicates, no gaps
    assert [os.path.normpath(n) for n in names[:-1]] == sorted([*images, str(tmp_path / "photos" / "zz-broken.jpg")])
    options = {"method": "greedy", "max_length": 20, "min_confidence": 0.0}
    signature = {"model": f"model-{bulk_sha(checkpoint)}", "options": options}
    assert records[-1] == {"image": "missing.jpg", "error": "no such file: missing.jpg", **signature}  # last
    assert all({k: r[k] for k in ("model", "options")} == signature for r in records)  # each says what made it
    assert all(r["captions"][0]["text"] for r in records if "broken" not in r["image"] and "error" not in r)

    assert main(argv) == 0  # everything is in the file already: nothing to do, nothing new failed
    assert bulk.read_records(out) == records


def test_csv_output_with_several_captions_and_decoding_workers(checkpoint, tmp_path) -> None:
    _tree(tmp_path / "photos", count=5)
    out = tmp_path / "out.csv"
    pattern = str(tmp_path / "photos" / "**" / "*.[jpJP]*[gG]")  # through the link loop too: each file once
    argv = ["caption", pattern, "--output", str(out), "--checkpoint", str(checkpoint)]
    argv += ["--backend", "torch", "--method", "beam", "--beam-size", "3", "--num-captions", "2"]
    assert main([*argv, "--batch-size", "2", "--workers", "2"]) == 0  # decoded on threads
    rows = bulk.read_records(out)
    assert len(rows) == 5 and all(r["caption"] and len(r["captions"].split(" | ")) == 2 for r in rows)
    # the same captions as decoding in this process
    out0 = tmp_path / "out0.csv"
    assert main([*argv[:3], str(out0), *argv[4:], "--batch-size", "2", "--workers", "0"]) == 0
    assert [r["caption"] for r in bulk.read_records(out0)] == [r["caption"] for r in rows]


def test_command_line_mistakes_are_one_line(checkpoint, tmp_path, capsys) -> None:
    for argv, message in (
        (["caption", "--checkpoint", str(checkpoint)], "no images given"),
        (["caption", str(tmp_path), "--output", str(tmp_path / "o.txt")], ".jsonl or .csv"),
        (["caption", str(tmp_path), "--output", str(tmp_path / "o.jsonl"), "--json"], "--json prints"),
        (["caption", "--from-list", str(tmp_path / "none.txt")], "cannot read the list"),
        (["merge", str(tmp_path / "o.jsonl")], "no part files"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_merge_restores_the_input_order(tmp_path) -> None:
    out = tmp_path / "out.jsonl"
    for rank in range(3):
        sink = RecordFile(part_path(out, rank, 3))
        sink.write([{"image": f"{i}.jpg", "captions": []} for i in range(rank, 8, 3)])
        sink.close()
    merged, count = merge_parts(out)
    assert count == 8 and [r["image"] for r in bulk.read_records(merged)] == [f"{i}.jpg" for i in range(8)]
    part_path(out, 2, 3).unlink()
    with pytest.raises(InputError, match="2 of 3 part files"):
        merge_parts(out)


@pytest.mark.slow
def test_torchrun_two_processes_caption_their_shares_and_merge(checkpoint, tmp_path) -> None:
    images = _tree(tmp_path / "photos", count=7)
    out = tmp_path / "out.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
    ]
    command += ["-m", "captioner.cli", "caption", str(tmp_path / "photos"), "--output", str(out)]
    command += ["--checkpoint", str(checkpoint), "--backend", "torch", "--method", "greedy", "--workers", "0"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    shares = [bulk.read_records(part_path(out, rank, 2)) for rank in range(2)]
    assert [len(s) for s in shares] == [4, 3]  # every other image each
    merged = bulk.read_records(out)
    assert [os.path.normpath(r["image"]) for r in merged] == images
    assert "merged 7 records from 2 part files" in done.stderr
    json.dumps(merged)  # plain JSON records


RUN = bulk.RunSignature("model-0123456789ab", {"method": "greedy", "max_length": 20})
CAPTION = {"captions": [{"text": "a dog", "log_prob": -1.0, "score": -1.0}]}


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("notes.jsonl", b'{"note": "buy milk"}\n{"image": "a.jpg", "captions": []}\nlast line without a newline'),
        ("notes.jsonl", b"a note with no newline at all, 74 bytes long, which the old code cut to 32"),
        ("notes.jsonl", b'{"image": "a.jpg", "captions": [{"text": "a dog"}], "rating": 5}\n'),
        ("sheet.csv", b"image,label\na.jpg,cat\nb.jpg,do"),  # a foreign CSV with an image column
        ("sheet.csv", b"image,caption,log_prob,score,captions,error\na.jpg,,,,,\n"),  # a row of nothing
        ("notes.jsonl", b'{"image": "a.jpg", "captions": []}\n'),  # no caption, and it does not say it abstained
        ("sheet.csv", (",".join(bulk.CSV_FIELDS) + "\na.jpg,,,,,,m,{},,,false\n").encode()),  # the same in CSV
        ("latin1.csv", "image,caption\ncaf\u00e9.jpg,x\n".encode("latin-1")),
    ],
)
def test_a_file_that_is_not_this_commands_is_refused_and_left_byte_for_byte(tmp_path, name, content) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError, match="not an output file of this command .*left as it was"):
        RecordFile(path, RUN)
    assert path.read_bytes() == content


def test_a_whole_record_without_its_newline_is_kept(tmp_path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"image": "a.jpg", **CAPTION}))  # edited by hand, say: the newline went missing
    sink = RecordFile(out, RUN)
    sink.write([{"image": "b.jpg", **CAPTION}])
    sink.close()
    assert [r["image"] for r in bulk.read_records(out)] == ["a.jpg", "b.jpg"]
    assert sink.legacy == 1  # a.jpg's record says nothing of its model and options


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_records_of_another_model_or_other_options_are_refused(tmp_path, suffix) -> None:
    out = tmp_path / f"out{suffix}"
    sink = RecordFile(out, RUN)
    sink.write([{"image": "a.jpg", **CAPTION}])
    sink.close()
    before = out.read_bytes()
    beam = bulk.RunSignature(RUN.model, {"method": "beam", "max_length": 20, "beam_size": 3})
    with pytest.raises(InputError, match=r"1 records were made otherwise \(line \d: model model-0123456789ab, "):
        RecordFile(out, beam)
    with pytest.raises(InputError, match="this run: model other-000000000000"):
        RecordFile(out, bulk.RunSignature("other-000000000000", RUN.options))
    assert out.read_bytes() == before
    again = RecordFile(out, RUN)  # the same model and options: resumes
    assert again.done == {"a.jpg"}
    again.close()


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_retry_errors_takes_the_error_records_out_and_captions_them_again(tmp_path, suffix) -> None:
    out = tmp_path / f"out{suffix}"
    sink = RecordFile(out, RUN)
    sink.write([{"image": "a.jpg", **CAPTION}, {"image": "b.jpg", "error": "cannot read: I/O error"}])
    sink.close()
    kept = RecordFile(out, RUN)
    assert kept.done == {"a.jpg", "b.jpg"} and kept.errors == {"b.jpg"} and kept.retried == 0
    kept.close()
    retry = RecordFile(out, RUN, retry_errors=True)
    assert retry.done == {"a.jpg"} and retry.errors == set() and retry.retried == 1
    retry.write([{"image": "b.jpg", **CAPTION}])
    retry.close()
    records = bulk.read_records(out)
    assert [r["image"] for r in records] == ["a.jpg", "b.jpg"]  # one record each, the failure replaced
    assert not any(r.get("error") for r in records)


def test_an_output_file_from_before_records_were_signed_is_still_resumed(tmp_path) -> None:
    out = tmp_path / "old.csv"
    out.write_text("image,caption,log_prob,score,captions,error\na.jpg,a dog,-1.0,-1.0,,\n")
    sink = RecordFile(out, RUN)
    assert sink.done == {"a.jpg"} and sink.legacy == 1 and sink.upgraded
    sink.write([{"image": "b.jpg", **CAPTION}])
    sink.close()
    rows = bulk.read_records(out)
    assert list(rows[0]) == list(bulk.CSV_FIELDS)  # this version's columns: every row has the same ones
    assert rows[0] == {**dict.fromkeys(bulk.CSV_FIELDS, ""), "image": "a.jpg", "caption": "a dog"} | {
        "log_prob": "-1.0",
        "score": "-1.0",
    }  # its values kept, the new cells empty
    assert [r["image"] for r in rows] == ["a.jpg", "b.jpg"] and rows[1]["model"] == RUN.model


def test_a_foreign_output_file_is_byte_identical_after_the_refused_run(checkpoint, tmp_path, capsys) -> None:
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (48, 40), (10, 200, 90)).save(photo)
    notes = tmp_path / "notes.jsonl"
    notes.write_bytes(b"my notes\nthe last line, no newline")
    argv = ["caption", str(photo), "--output", str(notes), "--checkpoint", str(checkpoint), "--backend", "torch"]
    assert main(argv) == 2
    assert "not an output file of this command" in capsys.readouterr().err
    assert notes.read_bytes() == b"my notes\nthe last line, no newline"


def test_retry_errors_on_the_command_line(checkpoint, tmp_path, capsys) -> None:
    photo = tmp_path / "photo.jpg"
    out = tmp_path / "out.jsonl"
    argv = ["caption", str(photo), "--output", str(out), "--checkpoint", str(checkpoint), "--backend", "torch"]
    assert main(argv) == 1  # the photo is not there yet: an error record
    capsys.readouterr()
    Image.new("RGB", (48, 40), (10, 200, 90)).save(photo)
    assert main(argv) == 0  # skipped: its record (an error) is in the file
    err = capsys.readouterr().err
    assert "1 images already in" in err and "(1 of them as errors: --retry-errors captions those again)" in err
    assert main([*argv, "--retry-errors"]) == 0
    assert "1 error records taken out of" in capsys.readouterr().err
    (record,) = bulk.read_records(out)
    assert record["image"] == str(photo) and record["captions"][0]["text"]


# -- confidence, tags and abstention (issue 23) ----------------------------------------------------


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> Path:
    """A checkpoint whose captions come with a confidence and its images with tags."""
    path = tmp_path_factory.mktemp("bulk-calibrated") / "calibrated.pt"
    tiny_captioner(confidence=True, class_head=True).save(path)
    return path


def _run(model: Path, photos: Path, out: Path, *extra: str) -> int:
    argv = ["caption", str(photos), "--output", str(out), "--checkpoint", str(model), "--backend", "torch"]
    return main([*argv, "--batch-size", "2", "--workers", "0", *extra])


def _csv_tags(cell: str) -> list[tuple[str, float]]:
    return [(name, float(value)) for name, value in (tag.rsplit(":", 1) for tag in cell.split(";"))] if cell else []


def test_records_carry_each_captions_confidence_and_the_images_tags(calibrated, checkpoint, tmp_path) -> None:
    images = _tree(tmp_path / "photos", count=3)
    assert _run(calibrated, tmp_path / "photos", tmp_path / "out.jsonl", "--num-captions", "2") == 0
    assert _run(calibrated, tmp_path / "photos", tmp_path / "out.csv", "--num-captions", "2") == 0
    records, rows = bulk.read_records(tmp_path / "out.jsonl"), bulk.read_records(tmp_path / "out.csv")
    options = DecodingOptions(num_captions=2)
    expected = Captioner.from_checkpoint(calibrated).caption(images, options)  # the library, on the same files
    for record, row, result in zip(records, rows, expected, strict=True):
        assert [c["confidence"] for c in record["captions"]] == [round(c.confidence, 4) for c in result.captions]
        assert [(t["name"], t["confidence"], t["parents"]) for t in record["tags"]] == [
            (t.name, round(t.confidence, 4), list(t.parents)) for t in result.tags
        ]
        assert record["tags"] and record["abstained"] is False
        # the CSV row: the best caption's confidence, the tags as name:confidence;..., abstained false
        assert float(row["confidence"]) == record["captions"][0]["confidence"]
        assert _csv_tags(row["tags"]) == [(t["name"], t["confidence"]) for t in record["tags"]]
        assert row["abstained"] == "false" and row["caption"] == record["captions"][0]["text"]
    # neither a confidence model nor a class head: confidence null (an empty cell), no tags
    assert _run(checkpoint, tmp_path / "photos", tmp_path / "plain.jsonl") == 0
    assert _run(checkpoint, tmp_path / "photos", tmp_path / "plain.csv") == 0
    for record in bulk.read_records(tmp_path / "plain.jsonl"):
        assert record["captions"][0]["confidence"] is None and record["tags"] == [] and record["abstained"] is False
    for row in bulk.read_records(tmp_path / "plain.csv"):
        assert row["caption"] and row["confidence"] == "" and row["tags"] == "" and row["abstained"] == "false"


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_abstentions_are_records_not_errors_and_the_run_resumes(calibrated, tmp_path, capsys, suffix) -> None:
    images = _tree(tmp_path / "photos", count=3)
    out = tmp_path / f"out{suffix}"
    assert _run(calibrated, tmp_path / "photos", out, "--min-confidence", "1.0") == 0  # nothing failed
    assert capsys.readouterr().err == ""
    records = bulk.read_records(out)
    assert sorted(os.path.normpath(r["image"]) for r in records) == images  # every image has its record
    for record in records:
        assert "error" not in record or record["error"] == ""
        if suffix == ".jsonl":
            assert record["captions"] == [] and record["abstained"] is True and record["tags"]
            assert record["options"]["min_confidence"] == 1.0
        else:
            assert record["caption"] == "" and record["confidence"] == "" and record["abstained"] == "true"
            assert _csv_tags(record["tags"]) and json.loads(record["options"])["min_confidence"] == 1.0
    before = out.read_bytes()
    assert _run(calibrated, tmp_path / "photos", out, "--min-confidence", "1.0") == 0
    assert "3 images already in" in capsys.readouterr().err  # read back as this command's records: skipped
    assert out.read_bytes() == before


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_file_from_before_confidence_resumes_and_learns_the_new_fields(tmp_path, suffix) -> None:
    out = tmp_path / f"old{suffix}"
    old_options = {"method": "greedy", "max_length": 20}  # as records were signed before min_confidence
    if suffix == ".jsonl":
        old = {"image": "a.jpg", **CAPTION, "model": RUN.model, "options": old_options}
        out.write_text(json.dumps(old) + "\n")
    else:
        row = ["a.jpg", "a dog", "-1.0", "-1.0", "", "", RUN.model, json.dumps(old_options)]
        with open(out, "w", newline="") as f:
            csv.writer(f, lineterminator="\n").writerows([bulk.CSV_FIELDS[:8], row])  # the columns before tags
    today = bulk.RunSignature(RUN.model, DecodingOptions(method="greedy").to_dict())  # min_confidence 0.0
    with pytest.raises(InputError, match="1 records were made otherwise"):  # another bar is other options
        RecordFile(out, bulk.RunSignature(RUN.model, DecodingOptions(method="greedy", min_confidence=0.5).to_dict()))
    sink = RecordFile(out, today)
    assert sink.done == {"a.jpg"} and sink.legacy == 0 and sink.upgraded == (suffix == ".csv")
    sink.write([{"image": "b.jpg", "captions": [], "tags": [{"name": "dog", "confidence": 0.5, "parents": []}],
                 "abstained": True}])  # fmt: skip
    sink.close()
    again = RecordFile(out, today)  # both records read back, the old one and the abstention
    assert again.done == {"a.jpg", "b.jpg"} and again.errors == set()
    again.close()
    records = bulk.read_records(out)
    if suffix == ".csv":
        assert records[0]["caption"] == "a dog" and records[0]["abstained"] == ""  # kept as it was
        assert records[1]["abstained"] == "true" and records[1]["tags"] == "dog:0.5"
    else:
        assert records[0] == old and records[1]["abstained"] is True


def test_tag_names_hold_neither_csv_separator() -> None:
    from captioner.tags import load_tag_table

    names = load_tag_table().display_names
    assert len(names) > 100 and not [name for name in names if ":" in name or ";" in name]
