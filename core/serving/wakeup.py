"""Reading a queue that another thread fills, from asyncio, without blocking the event loop.

The engine's thread (or any producer) pushes items and then calls a waker; the reader on the
event loop sleeps on an :class:`asyncio.Event` that the waker sets through
``call_soon_threadsafe``, the one thread-safe way into a running loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any


async def wakeable_items(
    take: Callable[[], Any],
    set_waker: Callable[[Callable[[], None] | None], None],
    heartbeat: float | None = None,
    on_loop_closed: Callable[[], None] | None = None,
) -> AsyncIterator[Any]:
    """What ``take()`` returns (it returns None while there is nothing), as producers push it.

    ``set_waker`` installs the function a producer calls after each push (and None when the reader
    leaves); None is yielded after ``heartbeat`` idle seconds, so a stream can send a keep-alive.
    ``on_loop_closed`` runs if a producer wakes a reader whose loop has closed. Close this generator
    (``contextlib.aclosing``) when leaving early, so the waker is taken away at once.
    """
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()

    def wake() -> None:
        try:
            loop.call_soon_threadsafe(ready.set)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            if on_loop_closed is not None:
                on_loop_closed()

    set_waker(wake)
    try:
        while True:
            ready.clear()  # before looking: an item pushed after the look sets it again
            item = take()
            if item is None:
                try:
                    await asyncio.wait_for(ready.wait(), heartbeat)
                except asyncio.TimeoutError:
                    yield None
                continue
            yield item
    finally:
        set_waker(None)
