"""The skip mark for tests of our C++ kernels (core/fast/csrc), which compile on first use."""

from __future__ import annotations

import pytest

from core.fast.kernels import FastPathError


def needs_kernels(load, what: str) -> pytest.MarkDecorator:
    """Build the kernels now (about 30 s once, then cached); where they cannot be built here
    (no C++ compiler, no AVX-512), skip the module and say why."""
    try:
        load()
    except FastPathError as err:
        return pytest.mark.skip(reason=f"{what} unavailable: {err}")
    return pytest.mark.skipif(False, reason="")
