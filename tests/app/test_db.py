"""Database, on SQLite and on a real PostgreSQL server (tests/postgres.py): migrations apply, reverse
and match the models; the crud and the streaming flushes; owner isolation; crash leftovers become
"interrupted" (at once when alone on the database, after their lease when replicas share it); WAL."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, select, update
from sqlalchemy.exc import IntegrityError

from app.db import crud, make_engine, make_sessionmaker, upgrade
from app.db.engine import DatabaseDriverMissing, normalize_url, shown_url
from app.db.migrate import alembic_config, current_revision
from app.db.models import STATUS_COMPLETE, STATUS_INTERRUPTED, STATUS_STREAMING, Message, utcnow
from app.services.cancellation import StopWatcher
from app.services.streaming import ActiveGenerations

from app_testing import parse_sse, running_client
from waiting import HANG_GUARD

REPO = Path(__file__).resolve().parents[2]

ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-0123456789abcdef00"


@pytest.fixture
def sessions(database_url):
    upgrade(database_url)
    engine = make_engine(database_url)
    yield make_sessionmaker(engine)
    engine.dispose()


def test_migrations_upgrade_downgrade_and_match_models(database_url):
    upgrade(database_url)
    head = ScriptDirectory.from_config(alembic_config(database_url)).get_current_head()
    assert current_revision(database_url) == head and head is not None
    engine = make_engine(database_url)
    assert engine.dialect.name == database_url.split(":")[0].split("+")[0]
    tables = set(inspect(engine).get_table_names())
    assert {"conversations", "messages", "alembic_version"} <= tables
    engine.dispose()
    config = alembic_config(database_url)
    command.check(config)  # the models and the migrations describe the same schema, on this database too
    command.downgrade(config, "base")
    assert current_revision(database_url) is None
    upgrade(database_url)
    assert current_revision(database_url) == head


def test_a_conversation_stored_before_penalties_decodes_without_them(tmp_path):
    url = f"sqlite:///{tmp_path / 'p.db'}"
    upgrade(url, revision="0001")
    engine = make_engine(url)
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "INSERT INTO conversations (id, owner, title, model, system_prompt, temperature, max_new_tokens) "
            "VALUES ('old', 'local', 't', 'm', '', 0.5, 10)")
    engine.dispose()
    upgrade(url, revision="0002")
    engine = make_engine(url)
    with make_sessionmaker(engine)() as session:
        old = crud.get_conversation(session, "local", "old")
        assert (old.repetition_penalty, old.frequency_penalty, old.presence_penalty) == (1.0, 0.0, 0.0)
    engine.dispose()


def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path):
    url = f"sqlite:///{tmp_path / 'w.db'}"
    upgrade(url)
    engine = make_engine(url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
    engine.dispose()
    # WAL is a property of the file: a plain sqlite3 connection sees it too.
    assert sqlite3.connect(tmp_path / "w.db").execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_postgres_urls_mean_psycopg_and_a_missing_driver_says_what_to_install():
    assert normalize_url("postgres://u:p@db:5432/app") == "postgresql+psycopg://u:p@db:5432/app"
    assert normalize_url("postgresql://u@db/app") == "postgresql+psycopg://u@db/app"
    assert normalize_url("postgresql+psycopg://u@db/app") == "postgresql+psycopg://u@db/app"
    assert normalize_url("sqlite:///x.db") == "sqlite:///x.db"
    with pytest.raises(DatabaseDriverMissing, match=r"not installed.*postgresql\+psycopg") as err:
        make_engine("postgresql+psycopg2://u:hunter2@db/app")  # psycopg2 is not ours to install
    assert "hunter2" not in str(err.value)


def test_crud_and_streaming_flushes(sessions):
    with sessions() as s:
        first = crud.create_conversation(s, "alice", title="first", temperature=0.2, top_k=None)
        second = crud.create_conversation(s, "alice", title="second")
        crud.create_conversation(s, "bob", title="bob's")
        crud.add_message(s, first.id, "user", "hello ✓ ünïcode")
        answer = crud.add_message(s, first.id, "assistant", "", status=STATUS_STREAMING, prompt_tokens=7)
        # Adding a message makes the conversation the most recently active.
        assert [c.title for c in crud.list_conversations(s, "alice")] == ["first", "second"]
        assert crud.count_conversations(s, "alice") == 2
        crud.update_conversation(s, second, {"title": "renamed", "max_new_tokens": 12})
        with pytest.raises(ValueError, match="no editable field 'owner'"):
            crud.update_conversation(s, second, {"owner": "bob"})
        first_id, answer_id = first.id, answer.id
    # The stream's flushes: each its own short transaction, from outside the request's session.
    crud.write_message(sessions, answer_id, content="Hel", completion_tokens=1)
    crud.write_message(sessions, answer_id, content="Hello", completion_tokens=2, status=STATUS_COMPLETE)
    with sessions() as s:
        user, stored = crud.list_messages(s, first_id)
        assert user.content == "hello ✓ ünïcode"
        assert (stored.content, stored.status, stored.completion_tokens, stored.prompt_tokens) == (
            "Hello", STATUS_COMPLETE, 2, 7)
        renamed = crud.get_conversation(s, "alice", second.id)
        assert (renamed.title, renamed.max_new_tokens, renamed.temperature) == ("renamed", 12, 0.7)
        # Owner isolation is in the query: another owner's id is simply not found.
        assert crud.get_conversation(s, "bob", first_id) is None
        assert [c.title for c in crud.list_conversations(s, "bob")] == ["bob's"]
        assert crud.list_conversations(s, "alice", limit=1, offset=1)[0].title == "first"


def test_deleting_a_conversation_deletes_its_messages(sessions):
    with sessions() as s:
        c = crud.create_conversation(s, "alice", title="t")
        crud.add_message(s, c.id, "user", "hello")
        crud.delete_conversation(s, c)
        assert crud.list_messages(s, c.id) == []
    # Ids are never reused: a message added later gets a new one.
    with sessions() as s:
        c = crud.create_conversation(s, "alice", title="t2")
        assert crud.add_message(s, c.id, "user", "again").id > 1


def test_the_database_holds_one_streaming_answer_per_conversation(sessions):
    """The partial unique index (migration 0004) refuses a second streaming row, which crud tells from
    other violations; begin_turn refuses a turn while an answer streams and stores none of it."""
    with sessions() as s:
        c = crud.create_conversation(s, "alice")
        question = crud.add_message(s, c.id, "user", "q")
        crud.add_message(s, c.id, "assistant", "", parent_id=question.id, status=STATUS_STREAMING)
        with pytest.raises(IntegrityError) as second:
            crud.add_message(s, c.id, "assistant", "", parent_id=question.id, status=STATUS_STREAMING)
        assert crud.is_one_streaming_violation(second.value)
        s.rollback()
        with pytest.raises(IntegrityError) as other:  # a public id taken: unique too, but another constraint
            crud.add_message(s, c.id, "user", "x", public_id=question.public_id)
        assert not crud.is_one_streaming_violation(other.value)
        s.rollback()
        # Only "streaming" rows, and only within one conversation, are limited.
        crud.add_message(s, c.id, "assistant", "done", parent_id=question.id, status=STATUS_COMPLETE)
        elsewhere = crud.create_conversation(s, "alice")
        crud.add_message(s, elsewhere.id, "assistant", "", status=STATUS_STREAMING)
        before = [(m.id, m.status) for m in s.scalars(select(Message).order_by(Message.id))]
        with pytest.raises(crud.AnswerStreaming):
            crud.begin_turn(s, c.id, user_content="a second question", parent=None, status=STATUS_STREAMING)
        assert [(m.id, m.status) for m in s.scalars(select(Message).order_by(Message.id))] == before


def test_0004_leaves_one_streaming_answer_per_conversation(database_url):
    """Rows that already break the index (the race it closes, or crashes) keep only the newest streaming."""
    upgrade(database_url, revision="0003")
    engine = make_engine(database_url)
    with engine.begin() as connection:
        connection.exec_driver_sql("INSERT INTO conversations (id, owner, title, model, system_prompt, temperature, "
                                   "max_new_tokens) VALUES ('c', 'local', 't', 'm', '', 0.5, 10)")
        for public_id in ("older", "newer"):
            connection.exec_driver_sql(
                "INSERT INTO messages (public_id, conversation_id, role, content, status, dropped_messages, "
                f"created_at, updated_at) VALUES ('{public_id}', 'c', 'assistant', '', 'streaming', 0, "
                "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)")
    upgrade(database_url)
    with make_sessionmaker(engine)() as s:
        statuses = {m.public_id: m.status for m in s.scalars(select(Message))}
    engine.dispose()
    assert statuses == {"older": STATUS_INTERRUPTED, "newer": STATUS_STREAMING}


def _leftover(sessions, owner: str, age: timedelta) -> tuple[str, int]:
    """A conversation whose answer a process left "streaming", last written ``age`` ago."""
    with sessions() as s:
        c = crud.create_conversation(s, owner, title="crashed")
        crud.add_message(s, c.id, "user", "question")
        answer = crud.add_message(s, c.id, "assistant", "half an ans", status=STATUS_STREAMING)
        s.execute(update(Message).where(Message.id == answer.id).values(updated_at=utcnow() - age))
        s.commit()
        return c.id, answer.id


def test_startup_marks_leftover_streaming_answers_interrupted(make_settings, database_url):
    settings = make_settings(database_url=database_url)
    upgrade(database_url)
    sessions = make_sessionmaker(make_engine(database_url))
    conversation_id, answer_id = _leftover(sessions, "local", timedelta(0))
    with sessions() as s:
        public_id = s.get(Message, answer_id).public_id
    # A new server process starts on the same database (as after a kill -9).
    with running_client(settings) as client:
        body = client.get(f"/api/v1/conversations/{conversation_id}").json()
    statuses = {m["id"]: m["status"] for m in body["messages"]}
    assert statuses[public_id] == STATUS_INTERRUPTED
    assert body["messages"][-1]["content"] == "half an ans"
    assert body["generating"] is False


def test_a_replica_starting_leaves_live_answers_alone_and_the_lapsed_ones_are_interrupted(make_settings, database_url):
    settings = make_settings(database_url=database_url, shared_database=True, stream_lease_seconds=60)
    upgrade(database_url)
    sessions = make_sessionmaker(make_engine(database_url))
    live_conversation, live = _leftover(sessions, "local", timedelta(seconds=1))  # another replica's, renewed just now
    _, dead = _leftover(sessions, "local", timedelta(minutes=5))  # a killed replica's
    with running_client(settings) as client:
        body = client.get(f"/api/v1/conversations/{live_conversation}").json()
        assert body["generating"] is True  # generated elsewhere: this replica says so too
        # ... and will not start a second answer in it.
        busy = client.post(f"/api/v1/conversations/{live_conversation}/messages", json={"content": "more"})
        assert busy.status_code == 409
    with sessions() as s:
        assert s.get(Message, live).status == STATUS_STREAMING
        assert s.get(Message, dead).status == STATUS_INTERRUPTED


def test_the_watcher_sweeps_answers_nobody_renews(sessions):
    """What a replica killed mid-answer leaves while the others go on: the next sweep interrupts it."""
    _, fresh = _leftover(sessions, "a", timedelta(seconds=1))
    _, lapsed = _leftover(sessions, "a", timedelta(seconds=31))
    watcher = StopWatcher(sessions, ActiveGenerations(), poll_seconds=0.25, lease_seconds=30)
    assert watcher.poll() == 0
    with sessions() as s:
        assert (s.get(Message, fresh).status, s.get(Message, lapsed).status) == (STATUS_STREAMING, STATUS_INTERRUPTED)


def test_the_service_end_to_end_with_two_owners(make_settings, database_url):
    """The API on this database: a streamed answer flushed and stored, stop, another owner's 404s, delete."""
    settings = make_settings(database_url=database_url, api_keys={"alice": ALICE, "bob": BOB},
                             classifier_enabled=False)
    alice, bob = {"Authorization": f"Bearer {ALICE}"}, {"Authorization": f"Bearer {BOB}"}
    with running_client(settings) as client:
        cid = client.post("/api/v1/conversations", json={"temperature": 0.0, "max_new_tokens": 16},
                          headers=alice).json()["id"]
        with client.stream("POST", f"/api/v1/conversations/{cid}/messages", json={"content": "hi"},
                           headers=alice) as response:
            events = list(parse_sse(response.iter_lines()))
        assert events[-1][0] == "done" and events[-1][1]["completion_tokens"] == 16
        text = "".join(d["text"] for e, d in events if e == "delta")
        stored = client.get(f"/api/v1/conversations/{cid}", headers=alice).json()
        assert [(m["role"], m["status"]) for m in stored["messages"]] == [("user", "complete"), ("assistant", "complete")]
        assert stored["messages"][1]["content"] == text

        assert client.get(f"/api/v1/conversations/{cid}", headers=bob).status_code == 404
        assert client.delete(f"/api/v1/conversations/{cid}", headers=bob).status_code == 404
        assert client.get("/api/v1/conversations", headers=bob).json()["total"] == 0
        assert client.post(f"/api/v1/conversations/{cid}/stop", headers=alice).json() == {"stopped": False}
        assert client.delete(f"/api/v1/conversations/{cid}", headers=alice).status_code == 204
        assert client.get(f"/api/v1/conversations/{cid}", headers=alice).status_code == 404


@pytest.mark.slow  # four fresh interpreters importing the app
def test_replicas_starting_together_on_postgres_migrate_once(postgres_cluster):
    """Every replica's start applies the migrations: four processes started at once on an empty
    PostgreSQL database all succeed (one migrates, the others wait on its lock and find it done)."""
    url = postgres_cluster.database()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    script = "import sys; from app.db import upgrade; upgrade(sys.argv[1])"
    starts = [subprocess.Popen([sys.executable, "-c", script, url], env=env, stderr=subprocess.PIPE, text=True)
              for _ in range(4)]
    failures = [err for p in starts if (err := p.communicate(timeout=HANG_GUARD)[1]) and p.returncode != 0]
    assert failures == []
    assert current_revision(url) == ScriptDirectory.from_config(alembic_config(url)).get_current_head()


def test_db_upgrade_prints_the_url_without_its_password(tmp_path, capsys):
    from scratchgpt.cli import main

    assert "s3cret" not in shown_url("postgresql+psycopg://web:s3cret@db:5432/scratchgpt")
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    main(["db", "upgrade", "--database-url", url])
    assert f"database at {url} is at the latest migration" in capsys.readouterr().out


def test_0003_gives_existing_messages_random_public_ids_and_their_questions(tmp_path):
    """Rows written before 0003 keep working: each gets a random public id, and each answer points
    to the question before it (so regenerating it later keeps it as an alternative)."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    config = alembic_config(url)
    command.upgrade(config, "0001")
    db = sqlite3.connect(tmp_path / "old.db")
    db.execute("INSERT INTO conversations (id, owner, title, model, system_prompt, temperature, max_new_tokens) "
               "VALUES ('c1', 'local', 't', 'm', '', 0.7, 16)")
    for role, content in [("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2")]:
        db.execute("INSERT INTO messages (conversation_id, role, content, status) VALUES ('c1', ?, ?, 'complete')",
                   (role, content))
    db.commit()
    db.close()
    upgrade(url)
    sessions = make_sessionmaker(make_engine(url))
    with sessions() as s:
        messages = crud.list_messages(s, "c1")
        assert [m.content for m in messages] == ["q1", "a1", "q2", "a2"]
        assert len({m.public_id for m in messages}) == 4 and all(len(m.public_id) == 32 for m in messages)
        assert [m.parent_id for m in messages] == [None, messages[0].id, None, messages[2].id]
        assert all(m.selected for m in messages)
    # The rebuilt table still never reuses an id, and going back keeps every selected message.
    db = sqlite3.connect(tmp_path / "old.db")
    assert "AUTOINCREMENT" in db.execute("SELECT sql FROM sqlite_master WHERE name = 'messages'").fetchone()[0]
    db.close()
    command.downgrade(config, "0001")
    db = sqlite3.connect(tmp_path / "old.db")
    assert [r[0] for r in db.execute("SELECT content FROM messages ORDER BY id")] == ["q1", "a1", "q2", "a2"]
    assert "AUTOINCREMENT" in db.execute("SELECT sql FROM sqlite_master WHERE name = 'messages'").fetchone()[0]
