"""Fitting caption confidence (training.calibration, ``captioner calibrate``, the end of ``captioner-train``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from captioner import Captioner
from captioner.text import tokenize
from tests.helpers import make_flickr_folder, require_data, tiny_captioner
from training.calibration import CalibrationError, CalibrationSettings, calibrate, expected_calibration_error
from training.data import load_corpus
from training.data_commands import main as captioner_main
from training.metrics import compute_cider_d


def test_expected_calibration_error_by_hand() -> None:
    p = np.array([0.05, 0.15, 0.12, 0.95, 0.85])
    y = np.array([0, 1, 0, 1, 1])
    # bins: [0, 0.1): {0.05 -> 0}; [0.1, 0.2): {0.15, 0.12 -> 1, 0}; [0.8, 0.9): {0.85 -> 1}; [0.9, 1]: {0.95 -> 1}
    expected = 0.2 * 0.05 + 0.4 * abs(0.135 - 0.5) + 0.2 * 0.15 + 0.2 * 0.05
    assert expected_calibration_error(p, y) == pytest.approx(expected)
    assert expected_calibration_error(np.array([1.0, 0.0]), np.array([1, 0])) == 0.0


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="coordinates"):
        CalibrationSettings(coordinates=9, components=8)
    with pytest.raises(ValueError, match="domain_alpha"):
        CalibrationSettings(domain_alpha=0.0)


def test_too_little_data_or_nothing_to_learn_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tiny = tiny_captioner(size=None)
    tiny.save(tmp_path / "tiny.pt")
    small = make_flickr_folder(tmp_path / "small", per_split=(24, 8, 2))
    assert captioner_main(["calibrate", str(tmp_path / "tiny.pt"), str(tmp_path / "out.pt"), "--data", str(small)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "more than 64 training photos" in err
    # enough photos, but an untrained model's captions all fall short of the target
    shapes = make_flickr_folder(tmp_path / "shapes", per_split=(70, 20, 2))
    with pytest.raises(CalibrationError, match="all 20 held-out captions fall short of CIDEr-D 0.5"):
        calibrate(tiny, load_corpus(shapes), CalibrationSettings(reference_photos=70))
    assert not (tmp_path / "out.pt").exists()


def _flickr_subset(root: Path, flickr: Path, train: int, val: int) -> Path:
    """A Flickr8k-layout folder with the first ``train`` / ``val`` photos of the real splits (images linked)."""
    splits = flickr / "splits"
    names = {
        "train": (splits / "Flickr_8k.trainImages.txt").read_text().split()[:train],
        "dev": (splits / "Flickr_8k.devImages.txt").read_text().split()[:val],
    }
    (root / "splits").mkdir(parents=True)
    for split, files in names.items():
        (root / "splits" / f"Flickr_8k.{split}Images.txt").write_text("\n".join(files) + "\n")
    (root / "splits" / "Flickr_8k.testImages.txt").write_text("")
    wanted = set(names["train"]) | set(names["dev"])
    lines = (flickr / "captions.txt").read_text().splitlines()
    (root / "captions.txt").write_text("\n".join([lines[0], *(x for x in lines[1:] if x.split(",")[0] in wanted)]))
    (root / "images").symlink_to(flickr / "images")
    return root


@pytest.mark.slow
def test_calibrate_fits_the_default_model_on_real_held_out_photos(tmp_path: Path, capsys) -> None:
    flickr = require_data("flickr8k")
    data = _flickr_subset(tmp_path / "data", flickr, train=120, val=60)
    out = tmp_path / "calibrated.pt"
    argv = ["calibrate", "default", str(out), "--data", str(data), "--backend", "torch", "--no-progress"]
    assert captioner_main(argv) == 0
    said = capsys.readouterr().out
    assert "fitted on 60 held-out photos" in said and "CIDEr-D >= 0.5" in said
    model = Captioner.from_checkpoint(out)
    confidence = model.confidence_model
    assert confidence is not None
    assert confidence.fitted_on["held_out_photos"] == 60 and confidence.fitted_on["reference_photos"] == 120
    assert confidence.fitted_on["cross_validated"]["folds"] >= 2
    assert len(confidence.domain_residuals) == 60
    # the captions are the bundled model's, now with confidences that differ between photos
    default = Captioner.from_checkpoint(None)
    corpus = load_corpus(data)
    photos = [r.path for r in corpus.split("val")[:8]]
    before, after = default.caption(photos), model.caption(photos)
    assert [r.captions[0].text for r in before] == [r.captions[0].text for r in after]
    confidences = [r.captions[0].confidence for r in after]
    assert all(c is not None and 0.0 < c < 1.0 for c in confidences)
    assert len({round(c, 4) for c in confidences if c is not None}) > 1
    # the more confident half of the held-out photos scores higher CIDEr-D than the less confident half
    held = corpus.split("val")
    results = model.caption([r.path for r in held])
    cider = compute_cider_d([r.captions[0].tokens for r in results], [[tokenize(c) for c in r.captions] for r in held])
    order = np.argsort([-(r.captions[0].confidence or 0.0) for r in results])
    assert cider[order[:30]].mean() > cider[order[30:]].mean()
    # and the whole checkpoint went along: the source's metadata, plus where its confidence came from
    assert model.metadata["confidence_from"] == {"data": "data"}
    assert json.dumps(model.metadata["training"]) == json.dumps(default.metadata["training"])
