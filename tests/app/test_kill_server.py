"""A real server process killed with SIGKILL mid-answer loses nothing, and the conversation goes on.

The server is uvicorn in a subprocess, started the way production starts worker processes
(``app.server:app_from_environment``, settings from ``SCRATCHGPT_*``). While it streams a long
answer it is killed with SIGKILL: no handler, no ``finally``, no shutdown. What the streaming
code wrote before that (the user's message at once, the answer every ``stream_flush_seconds``)
must be in the SQLite file; the next start marks the answer "interrupted", and the next message
is answered with the interrupted answer in its history.

The training-side twin (a run killed during a checkpoint save) is tests/training/test_pretrain_kill.py.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from app_testing import free_port, parse_sse
from waiting import wait_until

pytestmark = pytest.mark.slow  # two server starts in fresh interpreters (torch import): ~10-20 s

REPO = Path(__file__).resolve().parents[2]


class ServerProcess:
    """uvicorn in its own process on 127.0.0.1; ``kill()`` is SIGKILL, as the OOM killer or a power cut."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._log_file = open(log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app.server:app_from_environment", "--factory",
             "--host", "127.0.0.1", "--port", str(self.port), "--no-access-log"],
            cwd=env["SCRATCHGPT_HOME"],  # not the repository: a developer's .env must not leak in
            env=env, stdout=self._log_file, stderr=subprocess.STDOUT,
        )

    def wait_ready(self) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                return httpx.get(f"{self.url}/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, f"the server's start (its log: {self.log})")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log_file.close()


def rows(db: Path, conversation_id: str) -> list[tuple[str, str, str]]:
    """(role, status, content) of each message, read straight from the SQLite file."""
    with sqlite3.connect(db) as connection:
        return connection.execute(
            "SELECT role, status, content FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,)
        ).fetchall()


def test_sigkill_mid_stream_keeps_the_question_and_the_partial_answer(tmp_path, chat_checkpoint, gpt2_tok):
    home = tmp_path / "home"
    home.mkdir()
    db = tmp_path / "app.db"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SCRATCHGPT_")},
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "SCRATCHGPT_HOME": str(home),
        "SCRATCHGPT_CHAT_CHECKPOINT": str(chat_checkpoint),
        "SCRATCHGPT_CLASSIFIER_ENABLED": "false",
        "SCRATCHGPT_DATABASE_URL": f"sqlite:///{db}",
        "SCRATCHGPT_DEVICE": "cpu",
        "SCRATCHGPT_STREAM_FLUSH_SECONDS": "0.05",
        "SCRATCHGPT_LOG_JSON": "false",
    }
    question = "Tell me a very long story about a lighthouse."
    server = ServerProcess(env, tmp_path / "server.log")
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=30) as client:
            cid = client.post("/api/v1/conversations", json={"temperature": 0.0, "max_new_tokens": 1000}).json()["id"]
            received = ""
            with client.stream("POST", f"/api/v1/conversations/{cid}/messages", json={"content": question}) as response:
                assert response.status_code == 200
                for event, data in parse_sse(response.iter_lines()):
                    assert event in ("start", "queued", "delta"), (event, data)  # killed long before the answer ends
                    received += data.get("text", "") if event == "delta" else ""
                    stored = rows(db, cid)
                    # Kill once a flush has put part of the answer in the file.
                    if len(stored) == 2 and stored[1][2] and len(received) > len(stored[1][2]) > 0:
                        server.kill()
                        break
                else:
                    raise AssertionError("no partial answer was written while streaming")
    finally:
        server.close()
    assert server.proc.returncode == -signal.SIGKILL

    # What the dead process left: the question, and the answer so far, still marked as streaming.
    (user_role, user_status, user_text), (answer_role, answer_status, partial) = rows(db, cid)
    assert (user_role, user_status, user_text) == ("user", "complete", question)
    assert (answer_role, answer_status) == ("assistant", "streaming")
    assert partial and received.startswith(partial)

    restarted = ServerProcess(env, tmp_path / "server.log")
    try:
        restarted.wait_ready()
        with httpx.Client(base_url=restarted.url, timeout=60) as client:
            conversation = client.get(f"/api/v1/conversations/{cid}").json()
            assert conversation["generating"] is False
            user, answer = conversation["messages"]
            assert (user["content"], user["status"]) == (question, "complete")
            assert (answer["content"], answer["status"]) == (partial, "interrupted")

            # The conversation continues: the next answer streams to the end, built on the interrupted one.
            client.patch(f"/api/v1/conversations/{cid}", json={"max_new_tokens": 12})
            with client.stream("POST", f"/api/v1/conversations/{cid}/messages", json={"content": "Go on."}) as response:
                events = list(parse_sse(response.iter_lines()))
            assert events[0][0] == "start" and events[-1][0] == "done"
            assert events[-1][1]["message"]["status"] == "complete"
            # Question, partial answer and follow-up are all in the prompt.
            history = len(gpt2_tok.encode(question)) + len(gpt2_tok.encode(partial)) + len(gpt2_tok.encode("Go on."))
            assert events[0][1]["prompt_tokens"] > history
            messages = client.get(f"/api/v1/conversations/{cid}").json()["messages"]
            assert [(m["role"], m["status"]) for m in messages] == [
                ("user", "complete"), ("assistant", "interrupted"), ("user", "complete"), ("assistant", "complete"),
            ]
    finally:
        restarted.close()
    assert "answers left streaming by a previous run marked interrupted" in (tmp_path / "server.log").read_text()
