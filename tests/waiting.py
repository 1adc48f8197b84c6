"""Waiting in tests without timing anything.

A test waits for the event it needs (a thread's Event, a row's status), never a fixed time, and
states no duration: how fast something happens is measured in bench/. The one time limit here,
HANG_GUARD, only turns a hang into a failure that names what never happened; a busy machine
stays far inside it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

HANG_GUARD = 120.0  # seconds

T = TypeVar("T")


def wait_until(condition: Callable[[], T], what: str, timeout: float = HANG_GUARD) -> T:
    """The first truthy value of ``condition()``, polled; fails naming ``what`` if it never comes."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what} never happened (hang guard: {timeout:.0f} s)"
        time.sleep(0.02)
    return value
