"""A job's progress as a small JSON file another process can poll (``--progress-file PATH``).

``scratchgpt serve`` runs the missing fine-tunes as child processes and the web
service, which never imports ``training``, shows how far they are: the jobs
and the service share nothing but this file. Its fields:

``state``        queued | running | done | failed
``fraction``     0..1 of the job's steps done, or null before the first step
``eta_seconds``  estimated seconds left, or null while there is no rate to go by
``message``      one line for people ("epoch 2/5, step 300/700")
``log``          the job's log file, where the runner keeps one
``checkpoint``   the directory the job writes (the service loads it when done)
``role``         what the checkpoint is for the service: "chat" or "classifier"
``title``        the job's name for people ("spam classifier")
``order``        the job's turn among those its runner runs (0 first)
``updated_at``   Unix time of the last write; a running job rewrites it every
                 ``HEARTBEAT_SECONDS`` even between steps, so a reader can tell a
                 job that stopped without saying so (killed) from a slow one.

Every write replaces the file atomically (a temporary file, then ``os.replace``),
so a reader never sees half of one, and keeps the fields it does not set: the
runner writes ``log`` and ``title`` before the job starts, the job its progress.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

HEARTBEAT_SECONDS = 10.0
# Steps come many per second on a small job; the file is rewritten at most this often.
MIN_WRITE_SECONDS = 1.0
STATES = ("queued", "running", "done", "failed")


def read_status(path: Path) -> dict[str, Any]:
    """The status in ``path``, or {} when it is absent or not a JSON object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_status(path: Path, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into the status at ``path`` and replace the file at once; returns the new status."""
    if "state" in fields and fields["state"] not in STATES:
        raise ValueError(f"a job's state is one of {', '.join(STATES)}, not {fields['state']!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    status = {**read_status(path), **{k: str(v) if isinstance(v, Path) else v for k, v in fields.items()},
              "updated_at": time.time()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(status, indent=1), encoding="utf-8")
    os.replace(tmp, path)
    return status


class JobProgress:
    """What a training job reports while it runs; with no path, every call does nothing.

    ``step(done, total)`` estimates the time left from the rate since the first step
    reported, so a slow start (loading, caching activations) does not count as steps.
    A job that exits without :meth:`done` (an error, Ctrl-C) is reported failed on the way out.
    """

    def __init__(self, path: Path | None, *, title: str, role: str, checkpoint: Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._first: tuple[float, float] | None = None  # (time, fraction) of the first step reported
        self._last_write = 0.0
        self._finished = threading.Event()
        if self.path is None:
            return
        write_status(self.path, state="running", fraction=None, eta_seconds=None, message="starting",
                     title=title, role=role, checkpoint=checkpoint, pid=os.getpid())
        atexit.register(self._exit_unfinished)
        threading.Thread(target=self._heartbeat, name="progress-heartbeat", daemon=True).start()

    def stage(self, message: str) -> None:
        """A part of the job without steps to count (loading the base, caching activations)."""
        self._write(force=True, message=message)

    def step(self, done: int, total: int, message: str) -> None:
        if self.path is None or total <= 0:
            return
        now, fraction = time.time(), min(1.0, done / total)
        if self._first is None:
            self._first = (now, fraction)
        t0, f0 = self._first
        eta = None
        if fraction > f0:
            eta = math.ceil((now - t0) / (fraction - f0) * (1.0 - fraction))
        self._write(force=done >= total, fraction=round(fraction, 4), eta_seconds=eta, message=message)

    def done(self, checkpoint: Path) -> None:
        self._finish(state="done", fraction=1.0, eta_seconds=0, message="done", checkpoint=checkpoint)

    def failed(self, message: str) -> None:
        self._finish(state="failed", eta_seconds=None, message=message)

    def _finish(self, **fields: Any) -> None:
        if self.path is None:
            return
        self._finished.set()
        with self._lock:
            write_status(self.path, **fields)

    def _write(self, force: bool = False, **fields: Any) -> None:
        if self.path is None or self._finished.is_set():
            return
        now = time.time()
        if not force and now - self._last_write < MIN_WRITE_SECONDS:
            return
        with self._lock:
            write_status(self.path, **fields)
            self._last_write = now

    def _heartbeat(self) -> None:
        while not self._finished.wait(HEARTBEAT_SECONDS):
            self._write(force=True)

    def _exit_unfinished(self) -> None:
        if not self._finished.is_set():
            self.failed("the job stopped before it finished; its output says why")
