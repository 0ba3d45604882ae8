import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image

from captioner import Captioner, DecodingOptions
from captioner.checkpoint import FORMAT, CheckpointError, load_checkpoint, save_checkpoint
from tests.helpers import tiny_captioner


def _images():
    noise = np.random.default_rng(0).integers(0, 256, (70, 70, 3), dtype=np.uint8)
    return [Image.new("RGB", (80, 60), c) for c in ("red", "navy", "white")] + [Image.fromarray(noise)]


@pytest.mark.parametrize("attention", [False, True])
def test_save_load_gives_identical_captions(tmp_path, attention):
    model = tiny_captioner(attention=attention, cell="gru")
    model.metadata["note"] = "hello"
    path = tmp_path / "model.pt"
    model.save(path)
    loaded = Captioner.from_checkpoint(path)
    assert loaded.config == model.config
    assert loaded.vocab == model.vocab
    assert loaded.encoder.preprocess == model.encoder.preprocess
    assert loaded.metadata["note"] == "hello"
    for options in (
        DecodingOptions(method="beam", num_captions=3),
        DecodingOptions(method="sample", seed=3, num_captions=2),
    ):
        a = model.caption(_images(), options)
        b = loaded.caption(_images(), options)
        assert [[c.text for c in r.captions] for r in a] == [[c.text for c in r.captions] for r in b]
        assert [r.captions[0].log_prob for r in a] == pytest.approx([r.captions[0].log_prob for r in b], abs=1e-5)


def test_checkpoint_is_plain_data_for_weights_only_loading(tmp_path):
    path = tmp_path / "model.pt"
    tiny_captioner().save(path)
    data = torch.load(path, weights_only=True)
    assert data["format"] == FORMAT and data["format_version"] == 1
    assert isinstance(data["vocab"], list) and isinstance(data["config"], dict)
    assert data["encoder"]["name"] == "resnet18"
    assert data["encoder_state"] is not None  # random weights cannot be re-created: they travel in the file
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in data["decoder_state"])


def test_package_encoder_weights_are_not_copied_but_verified(tmp_path):
    from captioner import EncoderConfig, Vocabulary

    model = Captioner.build(
        EncoderConfig("efficientnet_lite0"),
        Vocabulary.build(["a dog"], min_count=1),
        embed_dim=8,
        hidden_dim=8,
    )
    path = tmp_path / "lite.pt"
    model.save(path, half=True)
    data = torch.load(path, weights_only=True)
    assert data["encoder_state"] is None
    assert data["decoder_state"]["head.weight"].dtype == torch.float16
    assert path.stat().st_size < 1_000_000
    Captioner.from_checkpoint(path)
    data["encoder"]["weights_sha256"] = "0" * 64
    torch.save(data, path)
    with pytest.raises(CheckpointError, match="differ from those the model was trained with"):
        Captioner.from_checkpoint(path)


def test_compiled_prefixes_are_stripped(tmp_path):
    model = tiny_captioner()
    payload = model.state_payload()
    payload["decoder_state"] = {f"_orig_mod.{k}": v for k, v in payload["decoder_state"].items()}
    from captioner.checkpoint import clean_state_dict

    payload["decoder_state"] = clean_state_dict(payload["decoder_state"])
    save_checkpoint(tmp_path / "m.pt", payload)
    Captioner.from_checkpoint(tmp_path / "m.pt")


def test_corrupt_checkpoints_give_one_line_errors(tmp_path):
    good = tmp_path / "good.pt"
    tiny_captioner().save(good)
    blob = good.read_bytes()
    cases = {
        "truncated.pt": blob[: len(blob) // 3],
        "random.pt": b"\x00garbage" * 100,
        "empty.pt": b"",
        "text.pt": b"hello\n",  # the legacy unpickler reads 'h' as a memo lookup: a KeyError
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match="not a readable checkpoint") as info:
            load_checkpoint(tmp_path / name)
        assert "\n" not in str(info.value)
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a captioner checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    data = torch.load(good, weights_only=True)
    data["format_version"] = 99
    torch.save(data, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="format version 99 is not supported"):
        load_checkpoint(tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    data = torch.load(good, weights_only=True)
    data["decoder_state"].pop("head.weight")
    torch.save(data, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="does not match this model code"):
        Captioner.from_checkpoint(tmp_path / "mismatch.pt")


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    model = tiny_captioner()
    model.save(path)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        model.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_saved_file_has_the_umask_permissions_not_owner_only(tmp_path):
    # a checkpoint mounted into the Docker image is read by another user: mkstemp's 0600 would lock it out
    old = os.umask(0o022)
    try:
        tiny_captioner().save(tmp_path / "model.pt")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "model.pt").stat().st_mode) == 0o644


def test_caption_accepts_paths_bytes_and_pil(tmp_path):
    model = tiny_captioner()
    image = _images()[3]
    path = tmp_path / "noise.png"
    image.save(path)
    results = model.caption([image, path, path.read_bytes(), str(path)], method="greedy")
    assert len({r.captions[0].text for r in results}) == 1
    single = model.caption(image, method="greedy")
    assert single[0].captions[0].text == results[0].captions[0].text


def test_ctrl_c_while_a_checkpoint_is_written_waits_for_the_file(tmp_path, monkeypatch) -> None:
    """A Ctrl-C inside torch.save once broke the zip writer (a RuntimeError traceback, the step lost): now the file
    is finished and put in place first, then the KeyboardInterrupt is raised."""
    import os
    import signal

    import torch

    from captioner.checkpoint import load_checkpoint, save_checkpoint
    from tests.helpers import tiny_captioner

    real_save = torch.save

    def save_interrupted(obj, f) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C arrives in the middle of the write
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", save_interrupted)
    payload = tiny_captioner().state_payload()
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "m.pt", payload)
    assert load_checkpoint(tmp_path / "m.pt")["vocab"] == payload["vocab"]  # complete and in place
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary file left
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C works as before afterwards
