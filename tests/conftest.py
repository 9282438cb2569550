"""Shared pytest fixtures: paths to fixtures and the shared test photos, tiny components built once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep every test offline and quiet, whatever the machine's environment says.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHARED_TESTDATA = Path(os.environ.get("BOLID_SHARED_TESTDATA", ROOT.parent / "shared" / "testdata"))


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def shared_testdata() -> Path:
    """The shared real-photo folder (not redistributable, so not in the repo); skips when absent."""
    if not SHARED_TESTDATA.is_dir():
        pytest.skip(f"shared test photos not found at {SHARED_TESTDATA}")
    return SHARED_TESTDATA


@pytest.fixture(scope="session")
def tiny_pipe():
    from bolid.kits.tiny import tiny_sdxl_pipeline

    return tiny_sdxl_pipeline()


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """Identity-grouped shards written by the real datapipe (tiny kit) from a generated photo folder.

    Six identities of five 192x256 photos each (synthetic figures), so that train, validation and test
    each hold at least one person.
    """
    from datapipe.__main__ import main as datapipe_main
    from demo.synthetic import synthetic_photo

    root = tmp_path_factory.mktemp("tiny-shards")
    photos = root / "photos"
    for i in range(6):
        folder = photos / f"person-{i}"
        folder.mkdir(parents=True)
        for j in range(5):
            synthetic_photo(192, 256, seed=100 * i + j, figures=1).save(folder / f"{j}.jpg", quality=90)
    out = root / "shards"
    config = ROOT / "configs" / "shards" / "tiny.yaml"
    argv = ["build", "--config", str(config), "--in", str(photos), "--out", str(out), "--workers", "0"]
    assert datapipe_main(argv) == 0
    return out
