"""The offline jobs that make the service's models, as their status files report them.

``scratchgpt serve`` runs the missing fine-tunes as child processes; each keeps
``<home>/jobs/<name>.json`` up to date (written by ``training.progress``, whose
docstring lists the fields). The service never imports ``training``: it only
reads those files, once a second (:class:`JobWatcher`, started by the app's
lifespan), and acts on what they say:

- while a job that makes a missing model is queued or running, that model's
  requests answer 503 with the job's progress and a Retry-After
  (``ModelRegistry.set_training``);
- when a job is done, its checkpoint is loaded in its role without a restart
  (``ModelRegistry.load_model``);
- a failed job is reported with its log, and the rest of the service carries on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.services.registry import ModelRegistry

logger = logging.getLogger("scratchgpt.jobs")

POLL_SECONDS = 1.0
# A running job rewrites its file every 10 s (training.progress.HEARTBEAT_SECONDS); one silent for
# this long was killed without a word (its runner too, or it would have written the outcome).
STALE_SECONDS = 60.0
ACTIVE = ("queued", "running")


def read_jobs(jobs_dir: Path) -> dict[str, dict[str, Any]]:
    """Every job's status in ``jobs_dir``, by name (the file's stem), in the order they run (the runner's
    ``order``); unreadable files are left out (a job is writing it for the first time)."""
    jobs = {}
    for path in sorted(Path(jobs_dir).glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("state") in ("queued", "running", "done", "failed"):
            jobs[path.stem] = {"name": path.stem, **data}
    in_turn = sorted(jobs.values(), key=lambda job: (not isinstance(job.get("order"), int), job.get("order") or 0))
    return {job["name"]: job for job in in_turn}


def eta_text(seconds: float | None) -> str:
    if seconds is None:
        return "time left unknown yet"
    if seconds < 90:
        return f"about {max(1, math.ceil(seconds / 10) * 10)} s left"
    return f"about {round(seconds / 60)} min left"


def summary(job: dict[str, Any], details: bool = True) -> str:
    """One line for people: "spam classifier: training, 43%, about 2 min left"; ``details``: with
    the reason of a failure and the log's path."""
    title, state = job.get("title") or job["name"], job["state"]
    if state == "queued":
        return f"{title}: queued behind the jobs before it"
    if state == "running":
        fraction = job.get("fraction")
        if fraction is None:
            return f"{title}: preparing ({job.get('message') or 'starting'})"
        return f"{title}: training, {math.floor(fraction * 100)}%, {eta_text(job.get('eta_seconds'))}"
    if state == "done":
        if job.get("load_error"):
            return f"{title}: trained, but its checkpoint did not load" + (f": {job['load_error']}" if details else "")
        return f"{title}: trained; loading it" if job.get("awaiting_load") else f"{title}: ready"
    if not details:
        return f"{title}: failed"
    where = f" (log: {job['log']})" if job.get("log") else ""
    return f"{title}: failed: {job.get('message') or 'no reason given'}{where}"


def retry_after(job: dict[str, Any]) -> int:
    """Seconds a client should wait before asking again for the model this job makes."""
    eta = job.get("eta_seconds")
    if job["state"] == "running" and isinstance(eta, (int, float)):
        return int(min(600, max(5, eta)))
    return 5 if job["state"] == "done" else 30


class JobWatcher:
    """Polls the jobs' status files and keeps the registry in step with them."""

    def __init__(self, jobs_dir: Path, models: Callable[[], ModelRegistry], poll_seconds: float = POLL_SECONDS) -> None:
        self.jobs_dir = Path(jobs_dir)
        self.models = models  # the registry of the moment (a restarted app makes a new one)
        self.poll_seconds = poll_seconds
        self.jobs: dict[str, dict[str, Any]] = {}
        # Only a job that finishes while this service runs has a checkpoint to load: one done
        # before is already what the settings point at.
        self.started_at = time.time()
        self._outcomes: dict[tuple[str, float], dict[str, Any]] = {}  # (name, finished at) -> served / load_error

    async def run(self) -> None:
        while True:
            try:
                await self.scan()
            except Exception:  # a bad file or a failed load must not end the watching
                logger.exception("reading the jobs' status failed")
            await asyncio.sleep(self.poll_seconds)

    async def scan(self) -> None:
        jobs = await asyncio.to_thread(read_jobs, self.jobs_dir)
        now = time.time()
        for job in jobs.values():
            if job["state"] == "running" and now - float(job.get("updated_at") or 0) > STALE_SECONDS:
                silent = round(now - float(job.get("updated_at") or 0))
                job.update(state="failed", eta_seconds=None,
                           message=f"no word from it for {silent} s: it was stopped before it finished")
            if job["state"] == "done":
                outcome = self._outcomes.get((job["name"], job.get("updated_at")))
                if outcome is not None:
                    job.update(outcome)
                elif float(job.get("updated_at") or 0) >= self.started_at and job.get("role") and job.get("checkpoint"):
                    job["awaiting_load"] = True
        self.jobs = jobs
        self._tell_registry()
        for job in jobs.values():
            if job.get("awaiting_load"):
                await self._load(job)
        self._tell_registry()

    async def _load(self, job: dict[str, Any]) -> None:
        outcome: dict[str, Any]
        try:
            await self.models().load_model(job["role"], Path(job["checkpoint"]))
            outcome = {"served": True}
            logger.info("serving a fine-tuned checkpoint", extra={"job": job["name"], "model": job["role"],
                                                                  "path": job["checkpoint"]})
        except Exception as exc:
            logger.exception("a fine-tuned checkpoint did not load", extra={"job": job["name"], "path": job["checkpoint"]})
            outcome = {"load_error": f"{type(exc).__name__}: {exc}"}
        self._outcomes[(job["name"], job.get("updated_at"))] = outcome
        job.pop("awaiting_load")
        job.update(outcome)

    def _tell_registry(self) -> None:
        """For each role, the job making its model (first in run order), else one that failed, speaks for
        it in the registry: its requests then answer with that job's summary."""
        registry = self.models()
        for role in ("chat", "classifier"):
            mine = [j for j in self.jobs.values() if j.get("role") == role]
            pending = [j for j in mine if j["state"] in ACTIVE or j.get("awaiting_load")]
            failed = [j for j in mine if j["state"] == "failed" or j.get("load_error")]
            if pending:
                registry.set_training(role, summary(pending[0]), retry_after(pending[0]))
            elif failed:
                registry.set_training(role, summary(failed[0]), None)
            else:
                registry.set_training(role, None)

    @property
    def active(self) -> bool:
        return any(job["state"] in ACTIVE or job.get("awaiting_load") for job in self.jobs.values())

    def public(self, details: bool) -> list[dict[str, Any]]:
        """The jobs for ``/api/v1/jobs`` and ``/ready``; paths and messages only with ``details``."""
        shown = []
        for job in self.jobs.values():
            item = {"name": job["name"], "title": job.get("title") or job["name"], "role": job.get("role"),
                    "state": job["state"], "fraction": job.get("fraction"), "eta_seconds": job.get("eta_seconds"),
                    "updated_at": job.get("updated_at")}
            item["summary"] = summary(job, details)
            if details:
                item.update(message=job.get("message"), log=job.get("log"), checkpoint=job.get("checkpoint"))
            shown.append(item)
        return shown
