"""Database: migrations apply, reverse and match the models; WAL; crash leftovers become "interrupted"."""

from __future__ import annotations

import sqlite3

from alembic import command
from sqlalchemy import inspect

from app.db import crud, make_engine, make_sessionmaker, upgrade
from app.db.migrate import alembic_config, current_revision
from app.db.models import STATUS_INTERRUPTED, STATUS_STREAMING

from app_testing import running_client


def test_migrations_upgrade_downgrade_and_match_models(tmp_path):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url)
    assert current_revision(url) == "0003"
    engine = make_engine(url)
    tables = set(inspect(engine).get_table_names())
    assert {"conversations", "messages", "alembic_version"} <= tables
    engine.dispose()
    config = alembic_config(url)
    command.check(config)  # the models and the migrations describe the same schema
    command.downgrade(config, "base")
    assert current_revision(url) is None
    upgrade(url)
    assert current_revision(url) == "0003"


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


def test_deleting_a_conversation_deletes_its_messages(tmp_path):
    url = f"sqlite:///{tmp_path / 'd.db'}"
    upgrade(url)
    sessions = make_sessionmaker(make_engine(url))
    with sessions() as s:
        c = crud.create_conversation(s, "alice", title="t")
        crud.add_message(s, c.id, "user", "hello")
        crud.delete_conversation(s, c)
        assert crud.list_messages(s, c.id) == []


def test_startup_marks_leftover_streaming_answers_interrupted(make_settings):
    settings = make_settings()
    upgrade(settings.database_url)
    sessions = make_sessionmaker(make_engine(settings.database_url))
    with sessions() as s:
        c = crud.create_conversation(s, "local", title="crashed")
        crud.add_message(s, c.id, "user", "question")
        answer = crud.add_message(s, c.id, "assistant", "half an ans", status=STATUS_STREAMING)
        conversation_id, answer_id = c.id, answer.public_id
    # A new server process starts on the same file (as after a kill -9).
    with running_client(settings) as client:
        body = client.get(f"/api/v1/conversations/{conversation_id}").json()
    statuses = {m["id"]: m["status"] for m in body["messages"]}
    assert statuses[answer_id] == STATUS_INTERRUPTED
    assert body["messages"][-1]["content"] == "half an ans"


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
