"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def scratchgpt_home() -> Path:
    return Path(os.environ.get("SCRATCHGPT_HOME", Path.home() / ".cache" / "scratchgpt"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data sets in ../shared/data (only on our machines and in CI)."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF file; `.ci/run` obtains it with `scratchgpt download`."""
    candidates = [os.environ.get("SCRATCHGPT_SMOLLM2_GGUF"), scratchgpt_home() / "downloads" / SMOLLM2_GGUF_NAME]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    pytest.skip("SmolLM2 GGUF not found: run `scratchgpt download smollm2-135m-instruct` or set SCRATCHGPT_SMOLLM2_GGUF")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (opt in with ``pytestmark = pytest.mark.usefixtures(...)``).

    Tiny models gain nothing from a second thread, and on a busy two-core machine an OpenMP team
    waiting for a parked core made such tests many times slower (45 ms a step with two, 1 ms with one).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
