import json

import pytest
from PIL import Image

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
