"""Fixtures: a tiny untrained checkpoint, apps over it, and real photos from ../shared/data when present."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from captioner import Captioner
from service.app import create_app
from service.settings import Settings
from tests.service.images import data_dir, real_photos
from tests.service.tiny_model import save_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", attention=True)


@pytest.fixture(scope="session")
def tiny_checkpoint_no_attention(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-plain.pt", attention=False)


@pytest.fixture(scope="session")
def calibrated_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint with an ImageNet head and a confidence model: its results carry tags and confidences."""
    return save_tiny_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "calibrated.pt", attention=False, class_head=True, confidence=True
    )


@pytest.fixture(scope="session")
def calibrated_client(calibrated_checkpoint: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(checkpoint=calibrated_checkpoint))) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def client(tiny_checkpoint: Path) -> Iterator[TestClient]:
    """The default service over the tiny checkpoint; shared, so assert on metric *differences*."""
    with TestClient(create_app(Settings(checkpoint=tiny_checkpoint))) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def model(client: TestClient) -> Captioner:
    """The very model object the shared client serves, for computing expected answers."""
    return client.app.state.loaded.model


@pytest.fixture
def photo() -> Path:
    photos = real_photos()
    if not photos:
        pytest.skip(f"no real photos under {data_dir()} (set CAPTIONER_DATA_DIR to the shared data folder)")
    return photos[0]
