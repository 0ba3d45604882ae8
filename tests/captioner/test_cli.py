import json

import pytest
from PIL import Image

from captioner import Captioner, DecodingOptions
from captioner.cli import main
from tests.helpers import tiny_captioner


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "model.pt"
    tiny_captioner().save(path)
    return path


@pytest.fixture
def images(tmp_path):
    paths = []
    for i, colour in enumerate(("red", "green")):
        p = tmp_path / f"img{i}.jpg"
        Image.new("RGB", (50, 40), colour).save(p)
        paths.append(str(p))
    return paths


def test_caption_prints_one_line_per_image(checkpoint, images, capsys):
    assert main(["caption", *images, "--checkpoint", str(checkpoint), "--method", "greedy"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == images


def test_json_output_with_several_captions(checkpoint, images, capsys):
    argv = [
        "caption",
        *images,
        "--checkpoint",
        str(checkpoint),
        "--method",
        "sample",
        "--num-captions",
        "3",
        "--seed",
        "1",
        "--json",
    ]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out) == first  # same seed, same captions
    assert [r["image"] for r in first["results"]] == images
    assert all(len(r["captions"]) == 3 for r in first["results"])
    assert first["options"]["method"] == "sample"


def test_missing_and_unreadable_images_do_not_stop_the_rest(checkpoint, images, tmp_path, capsys):
    bad = tmp_path / "notes.jpg"
    bad.write_text("this is text")
    code = main(["caption", str(tmp_path / "nope.jpg"), images[0], str(bad), "--checkpoint", str(checkpoint)])
    out, err = capsys.readouterr()
    assert code == 1
    assert out.strip().split("\t")[0] == images[0]
    assert err.count("\n") == 2 and "no such file" in err and "not a recognised image" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--temperature", "0", "--method", "sample"], "temperature must be in"),
        (["--beam-size", "0"], "beam_size must be an integer in [1, 20]"),
        (["--top-p", "2"], "top_p must be in (0, 1]"),
        (["--method", "sample", "--beam-size", "5"], "method sample does not use beam_size"),
        (["--method", "greedy", "--temperature", "0.5", "--top-k", "3"], "does not use temperature, top_k"),
        (["--min-confidence", "1.5"], "min_confidence must be in [0.0, 1.0], got 1.5"),
        (["--min-confidence", "-0.1"], "min_confidence must be in [0.0, 1.0], got -0.1"),
    ],
)
def test_invalid_options_exit_2_with_one_line(checkpoint, images, extra, message, capsys):
    assert main(["caption", images[0], "--checkpoint", str(checkpoint), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("content", [b"nope", b"# A README\n\nsome text, not a model\n", b"PK\x03\x04broken zip"])
def test_bad_checkpoint_is_one_line(images, tmp_path, capsys, content):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    for command in (["caption", images[0], "--checkpoint", str(bad), "--backend", "torch"], ["info", str(bad)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "not a readable checkpoint" in err and err.count("\n") == 1
        assert "weights_only" not in err  # never torch's advice to load it unsafely


def test_info_describes_the_checkpoint(checkpoint, capsys):
    assert main(["info", str(checkpoint)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["encoder"]["name"] == "resnet18" and info["vocab_size"] > 4


@pytest.mark.slow
def test_export_writes_a_smaller_model_only_copy(checkpoint, images, tmp_path, capsys):
    import torch

    target = tmp_path / "exported.pt"
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({"metrics": {"test": {"CIDEr": 0.5}}}))
    assert main(["export", str(checkpoint), str(target), "--half", "--metadata", str(extra)]) == 0
    data = torch.load(target, weights_only=True)
    assert "training" not in data
    assert data["metadata"]["metrics"]["test"] == {"CIDEr": 0.5}
    assert data["decoder_state"]["head.weight"].dtype == torch.float16
    assert target.stat().st_size < checkpoint.stat().st_size
    capsys.readouterr()
    assert main(["caption", images[0], "--checkpoint", str(target), "--method", "greedy"]) == 0
    assert main(["export", str(tmp_path / "missing.pt"), str(tmp_path / "x.pt")]) == 2


# -- confidence, tags and abstention (issue 23) ----------------------------------------------------


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A checkpoint whose captions come with a confidence and its images with tags."""
    path = tmp_path_factory.mktemp("cli-calibrated") / "calibrated.pt"
    tiny_captioner(confidence=True, class_head=True).save(path)
    return path


def _caption_json(capsys, *argv) -> dict:
    assert main(["caption", *argv, "--backend", "torch", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_gives_each_caption_its_confidence_and_each_image_its_tags(calibrated, images, capsys):
    options = DecodingOptions(method="beam", beam_size=3, num_captions=2)
    document = _caption_json(capsys, *images, "--checkpoint", str(calibrated), "--num-captions", "2")
    expected = Captioner.from_checkpoint(calibrated).caption(images, options)  # the library, on the same files
    for record, result in zip(document["results"], expected, strict=True):
        assert record["abstained"] is False
        assert [c["confidence"] for c in record["captions"]] == [round(c.confidence, 4) for c in result.captions]
        assert all(0 < c["confidence"] < 1 for c in record["captions"])
        assert record["tags"] == [
            {"name": t.name, "confidence": round(t.confidence, 4), "parents": list(t.parents)} for t in result.tags
        ]
        assert record["tags"]  # the class head gives some
    assert document["options"]["min_confidence"] == 0.0


def test_min_confidence_one_abstains_and_keeps_the_tags(calibrated, images, capsys):
    argv = [images[0], "--checkpoint", str(calibrated)]
    captioned = _caption_json(capsys, *argv)["results"][0]
    document = _caption_json(capsys, *argv, "--min-confidence", "1.0")  # an abstention is no failure: exit 0
    (record,) = document["results"]
    assert record["captions"] == [] and record["abstained"] is True
    assert record["tags"] == captioned["tags"] and record["tags"]
    assert document["options"]["min_confidence"] == 1.0
    # at a bar under its confidence the same caption is kept
    bar = captioned["captions"][0]["confidence"] - 0.01
    kept = _caption_json(capsys, *argv, "--min-confidence", str(bar))["results"][0]
    assert kept["captions"] == captioned["captions"] and kept["abstained"] is False


def test_without_a_confidence_model_confidence_is_null_and_without_a_head_no_tags(checkpoint, images, capsys):
    (record,) = _caption_json(capsys, images[0], "--checkpoint", str(checkpoint))["results"]
    assert record["captions"] and all(c["confidence"] is None for c in record["captions"])
    assert record["tags"] == [] and record["abstained"] is False


def test_text_lines_show_confidence_tags_and_abstention(calibrated, checkpoint, images, capsys):
    (record,) = _caption_json(capsys, images[0], "--checkpoint", str(calibrated))["results"]
    best, tags = record["captions"][0], record["tags"]
    tag_words = ", ".join(f"{t['name']} {t['confidence']:.2f}" for t in tags)
    argv = ["caption", images[0], "--checkpoint", str(calibrated), "--backend", "torch"]
    assert main(argv) == 0
    assert capsys.readouterr().out == (
        f"{images[0]}\t{best['text']} (confidence {best['confidence']:.2f})\ttags: {tag_words}\n"
    )
    assert main([*argv, "--min-confidence", "1"]) == 0
    abstained = f"{images[0]}\t(abstained: no caption reached confidence 1.0)\ttags: {tag_words}\n"
    assert capsys.readouterr().out == abstained  # said plainly, in the captions' place, the tags still there
    # neither a confidence model nor a class head: the line is as it always was
    assert main(["caption", images[0], "--checkpoint", str(checkpoint), "--backend", "torch"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert len(line.split("\t")) == 2 and "confidence" not in line


def test_min_confidence_without_a_confidence_model_is_one_line_before_any_output(checkpoint, images, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    for extra in ([], ["--json"], ["--output", str(out)]):
        argv = ["caption", images[0], "--checkpoint", str(checkpoint), "--backend", "torch", "--min-confidence", "0.5"]
        assert main([*argv, *extra]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1
        assert captured.err.startswith("captioner: error: min_confidence needs a model with a confidence calibration")
    assert not out.exists()  # refused before the output file was opened


def test_min_confidence_flag_states_its_range(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["caption", "--help"])
    assert exited.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--min-confidence MIN_CONFIDENCE abstain below this caption confidence; a number in [0.0, 1.0]" in help_text


def test_info_says_whether_captions_come_with_confidence_and_tags(calibrated, checkpoint, capsys):
    assert main(["info", str(calibrated)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["class_head"] is True
    assert info["confidence_model"] == {
        "target": "test: made up",
        "signals": ["mean_log_prob", "feature_residual"],
        "fitted_on": {"data": "random"},
    }
    assert main(["info", str(checkpoint)]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["class_head"] is False and plain["confidence_model"] is None
