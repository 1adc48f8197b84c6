"""Stops and deletes that reach an answer another process generates (web replicas, uvicorn workers).

Any replica may receive the stop or the delete of a conversation whose answer another replica is
generating. The receiver changes the database, which every replica shares: a stop marks the answer's
row "interrupted" (``crud.stop_streaming``), a delete removes it. Each process polls the rows of
the answers it generates (:class:`StopWatcher`, every ``stop_poll_seconds``, 0.25 s by default: one
indexed read of a handful of primary keys) and cancels the job whose row is no longer "streaming";
the answer then ends as a local stop does, at the engine's next step.

Why a status row polled, not PostgreSQL ``LISTEN/NOTIFY``: the same code serves SQLite (a single
host, ``--workers`` > 1) and PostgreSQL; a poll cannot miss a message (a notification sent while a
replica reconnects is lost, so it would need the poll anyway); it holds no connection of its own
per replica, which a pooler such as PgBouncer in transaction mode would not allow for LISTEN; and
the row is the truth the UI reads anyway. Its costs: a read per replica every poll while it generates
something (none while it generates nothing), and a stop that lands within ``stop_poll_seconds`` plus
one engine step instead of at once.

The same watcher keeps the answers' leases: it renews the rows it generates every fifth of
``stream_lease_seconds``, and marks "interrupted" any streaming row nobody renewed for a whole lease,
which is what a replica killed mid-answer leaves behind while the others go on serving (its
restart cannot tell its own leftovers from a live replica's answers; ``app.main.prepare_database``).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from datetime import timedelta

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from app.db import crud
from app.db.models import utcnow
from app.services.streaming import ActiveGenerations

logger = logging.getLogger("scratchgpt.chat")

RENEWALS_PER_LEASE = 5


class StopWatcher:
    """Cancels this process's answers whose rows another process stopped or deleted; keeps their leases."""

    def __init__(self, sessions: sessionmaker[Session], active: ActiveGenerations, poll_seconds: float,
                 lease_seconds: float) -> None:
        self.sessions = sessions
        self.active = active
        self.poll_seconds = poll_seconds
        self.lease_seconds = lease_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # The first round renews and sweeps at once (a lease that lapsed while this process was down).
        self._renewed = self._swept = -math.inf

    def poll(self) -> int:
        """One round: cancel the stopped, renew the live, sweep the abandoned; returns how many were cancelled."""
        watched = self.active.watched()
        cancelled = 0
        now = time.monotonic()
        with self.sessions() as session:
            if watched:
                live = crud.still_streaming(session, watched)
                for message_id, job in watched.items():
                    if message_id not in live and not job.done:
                        job.cancel()
                        cancelled += 1
                        logger.info("answer stopped through the database", extra={"message_id": message_id})
                if live and now - self._renewed >= self.lease_seconds / RENEWALS_PER_LEASE:
                    crud.renew_streaming(session, live)
                    self._renewed = now
            if now - self._swept >= self.lease_seconds:
                self._swept = now
                lapsed = crud.interrupt_streaming_messages(
                    session, renewed_before=utcnow() - timedelta(seconds=self.lease_seconds))
                if lapsed:
                    logger.warning("answers whose process stopped renewing them marked interrupted",
                                   extra={"count": lapsed})
        return cancelled

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll()
            except SQLAlchemyError as exc:  # the database away for a moment: the next round tries again
                logger.warning("stop watcher could not read the database", extra={"error": str(exc)})

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="stop-watcher", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
