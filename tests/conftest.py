"""Shared test fixtures: offline Hub, the paper's data when present, tiny models built in-process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import SHARED_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The CROW paper's public data (``../shared/data``); tests using it skip cleanly when it is absent."""
    if not (SHARED_DATA / "poison_data").is_dir():
        pytest.skip(f"the CROW paper's data is not at {SHARED_DATA}")
    return SHARED_DATA
