"""Where scratchgpt keeps what it downloads, converts and compiles on this machine.

One root, ``$SCRATCHGPT_HOME`` or ``~/.cache/scratchgpt``, so that a user can
move or wipe everything the project caches with one variable. Weights, the
compiled kernels and inductor's cache all live under it.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The root of scratchgpt's cache: ``$SCRATCHGPT_HOME`` or ``~/.cache/scratchgpt``."""
    env = os.environ.get("SCRATCHGPT_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "scratchgpt"


def downloads_dir() -> Path:
    """Where raw downloads are kept (``<cache>/downloads``)."""
    return cache_dir() / "downloads"


def models_dir() -> Path:
    """Where converted checkpoints are kept (``<cache>/models``)."""
    return cache_dir() / "models"
