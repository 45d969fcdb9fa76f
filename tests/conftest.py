"""Session-wide test setup."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_DATA_DIR = Path(__file__).resolve().parent.parent / "data"


@pytest.fixture(scope="session", autouse=True)
def streamllm_data_dir() -> Iterator[Path]:
    """The converted default model is cached once per machine in the repo's git-ignored data/ (or wherever
    STREAMLLM_DATA_DIR already points), not once per test."""
    previous = os.environ.get("STREAMLLM_DATA_DIR")
    path = Path(previous) if previous else REPO_DATA_DIR
    os.environ["STREAMLLM_DATA_DIR"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("STREAMLLM_DATA_DIR", None)
