"""`scratchgpt serve`: the web service at once, and the fine-tunes it lacks as background jobs.

On a fresh machine the service has nothing to serve. This step obtains the base chat
model (SmolLM2-135M-Instruct, converted to our format) when it is missing, since
nothing can answer without it, and then starts the server. The fine-tuned
models come after, from the offline jobs run one after the other as child
processes of this command (:class:`JobRunner`): the spam classifier, then the
instruction-tuned chat model. Each job writes its progress to
``<home>/jobs/<name>.json`` (``training.progress``) and its output to
``<home>/jobs/<name>.log``; the service polls those files
(``app.services.jobs``) and loads each checkpoint once its job is done. So the
service still never imports ``training``: this module, in the CLI package, is
the one place where the two meet.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path

CHAT_MODEL = "smollm2-135m-instruct"
TUNED_CHAT_MODEL = "smollm2-135m-chat"
CLASSIFIER_NAME = "spam-classifier"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHARED_SPAM = SHARED_DATA / "sms_spam" / "SMSSpamCollection"
SHARED_INSTRUCT = SHARED_DATA / "instruction" / "instruction-data.json"
# Training beside a live service: the chat's decoding keeps the CPU first.
JOB_NICENESS = 10


def say(message: str) -> None:
    print(f"[scratchgpt] {message}", file=sys.stderr, flush=True)


def ensure_chat_model(chosen: str | None) -> Path:
    from core.paths import cache_dir
    from core.weights.download import download_model

    if chosen:
        return Path(chosen)
    path = cache_dir() / "models" / CHAT_MODEL
    if not (path / "config.json").is_file():
        say(f"chat model missing: obtaining {CHAT_MODEL} (about 100 MB)")
        path = Path(download_model(CHAT_MODEL))
    return path


# -- the offline jobs --------------------------------------------------------------


@dataclass
class Job:
    """One offline job as a child process: ``argv`` writes ``checkpoint`` and reports to ``status``."""

    name: str
    title: str  # for people: "spam classifier"
    role: str  # the service's name for what it makes: "classifier" or "chat"
    argv: list[str]
    checkpoint: Path
    status: Path
    log: Path
    hint: str = ""  # what to do when the job could not get its data


def _has_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file()


def finetune_command(job: str, jobs_dir: Path, name: str, base: Path, out: Path, data: Path | None,
                     *extra: str) -> list[str]:
    """``python -m scratchgpt finetune JOB ...`` reporting to ``<jobs_dir>/<name>.json``."""
    argv = [sys.executable, "-m", "scratchgpt", "finetune", job, "--base", str(base), "--out", str(out),
            "--progress-file", str(jobs_dir / f"{name}.json")]
    return argv + (["--data", str(data)] if data is not None else []) + list(extra)


def missing_jobs(home: Path, base: Path, *, spam_data: Path | None = None, instruct_data: Path | None = None,
                 classifier: bool = True, chat: bool = True) -> list[Job]:
    """The default fine-tunes whose checkpoints ``home`` lacks, in the order they run.

    Data: the file given, else the copy in ``../shared/data`` when there is one, else the
    job downloads the published file through ``core.weights.fetch`` (checksum, resume).
    """
    jobs_dir, models = home / "jobs", home / "models"
    planned = []
    if classifier:
        data = spam_data or (SHARED_SPAM if SHARED_SPAM.is_file() else None)
        out = models / CLASSIFIER_NAME
        planned.append(("spam", CLASSIFIER_NAME, "spam classifier", "classifier", out, data, (),
                        "give the SMSSpamCollection file (or its UCI zip) with `scratchgpt serve --spam-data FILE`"))
    if chat:
        data = instruct_data or (SHARED_INSTRUCT if SHARED_INSTRUCT.is_file() else None)
        out = models / TUNED_CHAT_MODEL
        # The test split's answers are for the developers' metrics; the user waits for the model.
        planned.append(("instruct", TUNED_CHAT_MODEL, "instruction model", "chat", out, data,
                        ("--no-test-responses",),
                        "give the book's instruction-data.json with `scratchgpt serve --instruct-data FILE`"))
    return [
        Job(name, title, role, finetune_command(job, jobs_dir, name, base, out, data, *extra), out,
            jobs_dir / f"{name}.json", jobs_dir / f"{name}.log", hint)
        for job, name, title, role, out, data, extra, hint in planned
        if not _has_checkpoint(out)
    ]


def _last_line(log: Path) -> str:
    try:
        with log.open(encoding="utf-8", errors="replace") as f:
            lines = deque((line.strip() for line in f if line.strip()), maxlen=1)
    except OSError:
        return ""
    return lines[0] if lines else ""


class JobRunner:
    """Runs ``jobs`` one after the other in child processes, on a thread beside the server.

    Before and after each child it writes the job's status itself (queued, then the
    exit's outcome with the log's last line), so a job that dies without a word is
    still reported; while it runs, the child reports its own progress.
    """

    def __init__(self, jobs: list[Job], niceness: int = JOB_NICENESS) -> None:
        self.jobs = jobs
        self.niceness = niceness
        self._child: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run_all, name="offline-jobs", daemon=True)

    def start(self) -> "JobRunner":
        from training.progress import write_status

        for order, job in enumerate(self.jobs):
            if job.log.exists():
                job.log.unlink()  # a previous run's output would be read as this run's reason
            write_status(job.status, state="queued", fraction=None, eta_seconds=None, title=job.title,
                         role=job.role, checkpoint=job.checkpoint, log=job.log, message="waiting for its turn",
                         order=order)
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Whether every job has ended (done or failed) within ``timeout``."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """End the running child (the server is going away) and report what did not run."""
        self._stopping.set()
        with self._lock:
            child = self._child
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout)
            except subprocess.TimeoutExpired:
                child.kill()
        self._thread.join(timeout)

    def _run_all(self) -> None:
        from training.progress import write_status

        for job in self.jobs:
            if self._stopping.is_set():
                write_status(job.status, state="failed", message="not run: the server stopped first; "
                             "`scratchgpt serve` starts it again")
                continue
            self._run(job)

    def _run(self, job: Job) -> None:
        from training.progress import write_status

        say(f"{job.title}: fine-tuning in the background (log: {job.log})")
        write_status(job.status, state="running", message="starting", pid=None)
        job.log.parent.mkdir(parents=True, exist_ok=True)
        try:
            with job.log.open("wb") as log:
                child = subprocess.Popen(job.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
                with self._lock:
                    self._child = child
                if self.niceness:
                    # After the start, not in it: a preexec_fn may deadlock a process with threads (the server's).
                    with contextlib.suppress(ProcessLookupError):  # it has ended already
                        os.setpriority(os.PRIO_PROCESS, child.pid,
                                       min(19, os.getpriority(os.PRIO_PROCESS, 0) + self.niceness))
                code = child.wait()
        except OSError as err:  # the interpreter or the log cannot be had: the job never started
            write_status(job.status, state="failed", eta_seconds=None, message=f"could not start: {err}")
            say(f"{job.title}: could not start ({err})")
            return
        finally:
            with self._lock:
                self._child = None
        if code == 0 and _has_checkpoint(job.checkpoint):
            write_status(job.status, state="done", fraction=1.0, eta_seconds=0, message="done",
                         checkpoint=job.checkpoint)
            say(f"{job.title}: done; the service loads {job.checkpoint}")
            return
        reason = _last_line(job.log) or f"exited with status {code}"
        if self._stopping.is_set() or code in (130, -signal.SIGINT, -signal.SIGTERM, -signal.SIGKILL):
            reason = "stopped before it finished (interrupted); `scratchgpt serve` starts it again"
        elif code == 0:
            reason = f"exited without writing {job.checkpoint}"
        elif "download" in reason.lower() and job.hint:
            reason = f"{reason}; {job.hint}"
        write_status(job.status, state="failed", eta_seconds=None, message=reason)
        carry_on = "" if self._stopping.is_set() else "; the service carries on without it"
        say(f"{job.title}: failed: {reason} (log: {job.log}){carry_on}")


# -- the command -------------------------------------------------------------------


def serve(args: argparse.Namespace) -> None:
    from app.server import serve as run_server
    from app.settings import Settings

    overrides: dict = {}
    jobs: list[Job] = []
    if args.chat_checkpoint:
        overrides["chat_checkpoint"] = Path(args.chat_checkpoint)
    if args.classifier_checkpoint:
        overrides["classifier_checkpoint"] = Path(args.classifier_checkpoint)
    if args.instruct_data is not None and not args.instruct_data.is_file():
        raise ValueError(f"--instruct-data {args.instruct_data}: no such file")
    if args.spam_data is not None and not args.spam_data.exists():
        raise ValueError(f"--spam-data {args.spam_data}: no such file")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError("--threads must be at least 1")
        overrides["torch_threads"] = args.threads
    if args.setup:
        base = ensure_chat_model(args.chat_checkpoint)  # a chosen chat model is the classifier's base too
        home = Settings().home
        # No chat override: the service serves its default list, the instruction-tuned model first
        # (put into service when its job finishes; until then the base answers new chats) and the base.
        if args.train:
            jobs = missing_jobs(home, base, spam_data=args.spam_data, instruct_data=args.instruct_data,
                                classifier=not args.classifier_checkpoint, chat=not args.chat_checkpoint)
    settings = Settings(**overrides)
    runner = JobRunner(jobs).start() if jobs else None
    if runner is not None:
        say(f"{len(jobs)} fine-tune(s) will run in the background: {', '.join(j.title for j in jobs)}; "
            f"progress on the pages, at /api/v1/jobs and in {jobs[0].status.parent}")
    say(f"serving on http://{args.host}:{args.port}/  (API docs at /docs)")
    try:
        run_server(settings, host=args.host, port=args.port, workers=args.workers)
    finally:
        if runner is not None:
            runner.stop()
