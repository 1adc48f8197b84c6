"""Many streams writing into one SQLite database at once lose no message.

Two servers (two apps, two engines, two chat workers generating at the same time) share one
SQLite file, as ``scratchgpt serve --workers 2`` does, and answers are flushed every 10 ms so
writes collide as often as they can. What makes this work is in app/db: WAL, a busy timeout,
one short transaction per write and a retry when SQLite still says "locked".
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from app_testing import LiveServer, parse_sse

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see tests/conftest.py

CONVERSATIONS = 16
TURNS = 3
TOKENS = 12


def chat(url: str, index: int) -> tuple[str, list[tuple[str, str]]]:
    """One user: a conversation of TURNS questions; returns its id and the (question, streamed answer) pairs."""
    exchanges = []
    with httpx.Client(base_url=url, timeout=120) as client:
        created = client.post("/api/v1/conversations", json={"temperature": 0.8, "max_new_tokens": TOKENS})
        assert created.status_code == 201, created.text
        cid = created.json()["id"]
        for turn in range(TURNS):
            question = f"user {index} turn {turn}: what next?"
            with client.stream("POST", f"/api/v1/conversations/{cid}/messages",
                               json={"content": question, "seed": index * 10 + turn}) as response:
                assert response.status_code == 200, response.read()
                events = list(parse_sse(response.iter_lines()))
            assert events[-1][0] == "done", events[-1]
            streamed = "".join(data["text"] for event, data in events if event == "delta")
            assert events[-1][1]["message"]["content"] == streamed
            exchanges.append((question, streamed))
    return cid, exchanges


def test_concurrent_streams_from_two_servers_into_one_sqlite_file_lose_nothing(make_settings):
    settings = make_settings(stream_flush_seconds=0.01, classifier_enabled=False)
    with LiveServer(settings) as first, LiveServer(settings) as second:
        urls = [first.url, second.url]
        with ThreadPoolExecutor(CONVERSATIONS) as pool:
            results = list(pool.map(lambda i: chat(urls[i % 2], i), range(CONVERSATIONS)))

        with httpx.Client(base_url=first.url, timeout=30) as client:
            assert client.get("/api/v1/conversations", params={"limit": 500}).json()["total"] == CONVERSATIONS
            for cid, exchanges in results:
                messages = client.get(f"/api/v1/conversations/{cid}").json()["messages"]
                expected = [m for question, answer in exchanges for m in (("user", question), ("assistant", answer))]
                assert [(m["role"], m["content"]) for m in messages] == expected
                assert all(m["status"] == "complete" for m in messages)
                assert all(m["completion_tokens"] == TOKENS for m in messages if m["role"] == "assistant")


def test_parallel_writers_with_their_own_engines_lose_no_row(tmp_path):
    """Below the HTTP layer: 8 threads, each with its own engine, add and rewrite messages at once (each
    in a conversation of its own: a conversation has one streaming answer at a time, by a unique index)."""
    from app.db import crud, make_engine, make_sessionmaker, upgrade
    from app.db.models import STATUS_STREAMING

    url = f"sqlite:///{tmp_path / 'race.db'}"
    upgrade(url)
    writers, rows_each = 8, 40
    with make_sessionmaker(make_engine(url))() as session:
        cids = [crud.create_conversation(session, "local", title=f"race {w}").id for w in range(writers)]
    start = threading.Barrier(writers)
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        engine = make_engine(url)
        sessions = make_sessionmaker(engine)
        try:
            start.wait()
            for i in range(rows_each):
                with sessions() as session:
                    message = crud.add_message(session, cids[w], "assistant", "", status=STATUS_STREAMING)
                for step in range(3):  # a streaming answer's flushes
                    crud.write_message(sessions, message.id, content=f"w{w} m{i} step{step}")
                crud.write_message(sessions, message.id, content=f"w{w} m{i}", status="complete")
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    with make_sessionmaker(make_engine(url))() as session:
        stored = [m for cid in cids for m in crud.list_messages(session, cid)]
    assert sorted(m.content for m in stored) == sorted(f"w{w} m{i}" for w in range(writers) for i in range(rows_each))
    assert {m.status for m in stored} == {"complete"}
