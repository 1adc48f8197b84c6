"""Two replicas on one database: any of them serves any request of a conversation.

Two apps, each with its own models, engine, answers in progress and stop watcher (as two processes
behind a load balancer would have), share a database and the settings (the signing key, the API
keys). An answer streams from replica A; the stop or the delete goes to replica B, which never held
the job: A's watcher must find the change in the database and end the answer
(app.services.cancellation). A's engine is held at a known token (TokenGate) until the cancel has
arrived, so the test does not race the tiny model to the end of its answer; how long the poll takes
is measured in the report, not asserted here.

Two turns sent to A and B at the same moment must start one answer (the database settles it:
crud.begin_turn, migration 0004), and B follows an answer A generates from its row
(app.services.streaming.RowFollower).
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.db import crud
from app.db.models import Message
from app_testing import TokenGate, parse_sse, running_client
from waiting import HANG_GUARD, wait_until

ALICE = "alice-key-0123456789abcdef"
SECRET = "one-signing-key-for-every-replica-0123456789"
HEADERS = {"Authorization": f"Bearer {ALICE}"}


@pytest.fixture
def replicas(make_settings, database_url, tmp_path) -> Iterator[tuple[TestClient, TestClient]]:
    """Replicas A and B: separate apps and homes on one database, with the same key and signing key."""

    def replica(name: str):
        return running_client(make_settings(
            home=tmp_path / name, database_url=database_url, shared_database=True, classifier_enabled=False,
            api_keys={"alice": ALICE}, secret_key=SECRET, stop_poll_seconds=0.1,
        ))

    with replica("a") as a, replica("b") as b:
        yield a, b


@contextlib.contextmanager
def held_answer(a: TestClient, cid: str) -> Iterator[tuple[TokenGate, int, Iterator]]:
    """An answer streaming from A, its engine held after the third token; (gate, tokens so far, events)."""
    worker = a.app.state.models.slots["chat"].worker
    with TokenGate(worker, hold_at=3) as gate, \
            a.stream("POST", f"/api/v1/conversations/{cid}/messages", json={"content": "a long story"},
                     headers=HEADERS) as response:
        assert response.status_code == 200
        events = parse_sse(response.iter_lines())
        assert next(events)[0] == "start"
        yield gate, gate.wait_held(), events


def a_job(a: TestClient):
    (job,) = a.app.state.active.watched().values()
    return job


def test_a_stop_sent_to_b_ends_the_answer_a_generates(replicas):
    a, b = replicas
    cid = a.post("/api/v1/conversations", json={"temperature": 0.0, "max_new_tokens": 900}, headers=HEADERS).json()["id"]
    with held_answer(a, cid) as (gate, held_at, events):
        mid = b.get(f"/api/v1/conversations/{cid}", headers=HEADERS).json()
        assert mid["generating"] is True and mid["messages"][-1]["status"] == "streaming"
        # B refuses a second answer in the conversation A is answering, as A itself would.
        assert b.post(f"/api/v1/conversations/{cid}/messages", json={"content": "x"}, headers=HEADERS).status_code == 409
        job = a_job(a)
        asked = time.perf_counter()
        assert b.post(f"/api/v1/conversations/{cid}/stop", headers=HEADERS).json() == {"stopped": True}
        assert not b.app.state.active.watched()  # B never held the job: only the database carried the stop
        wait_until(job.cancelled.is_set, "replica A cancelling the answer stopped on replica B")
        print(f"\nstop on B -> cancel on A: {1000 * (time.perf_counter() - asked):.0f} ms")
        gate.release()
        rest = list(events)
    assert rest[-1][0] == "done"
    done = rest[-1][1]
    assert done["finish_reason"] == "cancelled" and done["completion_tokens"] == held_at == gate.tokens
    answer = b.get(f"/api/v1/conversations/{cid}", headers=HEADERS).json()
    assert answer["generating"] is False
    assert (answer["messages"][-1]["status"], answer["messages"][-1]["content"]) == ("interrupted", done["message"]["content"])
    assert answer["messages"][-1]["finish_reason"] == "cancelled"
    # The conversation goes on, on either replica: B answers the next message.
    b.patch(f"/api/v1/conversations/{cid}", json={"max_new_tokens": 6}, headers=HEADERS)
    with b.stream("POST", f"/api/v1/conversations/{cid}/messages", json={"content": "go on"}, headers=HEADERS) as r:
        assert list(parse_sse(r.iter_lines()))[-1][1]["message"]["status"] == "complete"


def test_a_delete_sent_to_b_ends_the_answer_a_generates(replicas):
    a, b = replicas
    cid = a.post("/api/v1/conversations", json={"temperature": 0.0, "max_new_tokens": 900}, headers=HEADERS).json()["id"]
    with held_answer(a, cid) as (gate, held_at, events):
        job = a_job(a)
        assert b.delete(f"/api/v1/conversations/{cid}", headers=HEADERS).status_code == 204
        wait_until(job.cancelled.is_set, "replica A cancelling the answer whose conversation B deleted")
        gate.release()
        rest = list(events)
    assert rest[-1][0] == "done" and rest[-1][1]["finish_reason"] == "cancelled"
    assert a.get(f"/api/v1/conversations/{cid}", headers=HEADERS).status_code == 404
    assert not a.app.state.active.watched()  # A is free: nothing left generating


def test_a_browser_signed_in_on_one_replica_is_signed_in_on_the_other(replicas):
    """The shared signing key: the session cookie and CSRF token A issued open B's API as the same user."""
    a, b = replicas
    page = a.get("/login?next=/")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    signed_in = a.post("/login", content=f"key={ALICE}&csrf_token={csrf}&next=/",
                       headers={"Content-Type": "application/x-www-form-urlencoded"}, follow_redirects=False)
    assert signed_in.status_code == 303
    csrf = re.search(r'<meta name="csrf-token" content="([^"]+)"', a.get("/").text).group(1)
    b.cookies.update(a.cookies)
    created = b.post("/api/v1/conversations", json={"title": "from B"}, headers={"X-CSRF-Token": csrf})
    assert created.status_code == 201, created.text
    listed = a.get("/api/v1/conversations", headers=HEADERS).json()["conversations"]
    assert [c["title"] for c in listed] == ["from B"]


# --- two turns at the same moment on two replicas ------------------------------------------------

# A turn's request on a replica: (method path, JSON body), by the way it starts; {name} is the replica's.
TURNS = {
    "send": ("/messages", {"content": "sent on {name}"}),
    "regenerate": ("/regenerate", None),
    "continue": ("/continue", None),
    "edit": ("/messages/{first}/edit", {"content": "edited on {name}"}),
}


@contextlib.contextmanager
def writing_together(monkeypatch) -> Iterator[None]:
    """Both replicas' turns reach their write (crud.begin_turn, the real one) before either writes:
    both have passed the busy check, which is the race the database has to settle. Without this the
    first request might commit before the second reads, and the check alone would refuse it."""
    together = threading.Barrier(2, timeout=HANG_GUARD)
    begin_turn = crud.begin_turn

    def begin_turn_together(*args, **kwargs):
        together.wait()
        return begin_turn(*args, **kwargs)

    monkeypatch.setattr(crud, "begin_turn", begin_turn_together)
    yield
    monkeypatch.setattr(crud, "begin_turn", begin_turn)


def conversation_rows(client: TestClient, cid: str) -> list[Message]:
    """Every stored message of the conversation, alternatives included, oldest first (from the shared database)."""
    with client.app.state.sessions() as session:
        return list(session.scalars(select(Message).where(Message.conversation_id == cid).order_by(Message.id)))


@pytest.mark.parametrize("turns", [("send", "send"), ("send", "regenerate"), ("continue", "continue"), ("edit", "edit")],
                         ids="-".join)
def test_two_turns_at_the_same_moment_on_two_replicas_start_one_answer(replicas, monkeypatch, turns):
    """A's turn and B's both pass the busy check and write together: one answer streams, the other
    turn is 409 with nothing of it stored. Both engines are held at their first token, so the
    winner is still streaming when the rows are counted."""
    a, b = replicas
    cid = a.post("/api/v1/conversations", json={"temperature": 0.0, "max_new_tokens": 3}, headers=HEADERS).json()["id"]
    with a.stream("POST", f"/api/v1/conversations/{cid}/messages", json={"content": "hello"}, headers=HEADERS) as r:
        first = list(parse_sse(r.iter_lines()))
    assert first[-1][1]["finish_reason"] == "length"  # cut by the token limit: it can be continued
    first_id = first[0][1]["user_message"]["id"]
    before = conversation_rows(a, cid)

    results: dict[str, dict] = {"a": {}, "b": {}}
    answered = {name: threading.Event() for name in results}

    def take_turn(name: str, client: TestClient, turn: str) -> None:
        path, body = TURNS[turn]
        body = body and {"content": body["content"].format(name=name)}
        with client.stream("POST", f"/api/v1/conversations/{cid}{path.format(first=first_id)}", json=body,
                           headers=HEADERS) as response:
            results[name]["status"] = response.status_code
            answered[name].set()
            if response.status_code == 200:
                results[name]["events"] = list(parse_sse(response.iter_lines()))
            else:
                results[name]["refusal"] = response.read().decode()

    gates = [TokenGate(c.app.state.models.slots["chat"].worker, hold_at=1) for c in (a, b)]
    with writing_together(monkeypatch), gates[0], gates[1]:
        threads = [threading.Thread(target=take_turn, args=(name, client, turn))
                   for name, client, turn in zip(results, (a, b), turns)]
        for thread in threads:
            thread.start()
        for event in answered.values():
            assert event.wait(HANG_GUARD), "a replica never answered its turn"
        statuses = {name: result["status"] for name, result in results.items()}
        assert sorted(statuses.values()) == [200, 409], statuses
        # The winner's answer is held at its first token: the database holds exactly one streaming answer.
        assert [m.status for m in conversation_rows(a, cid)].count("streaming") == 1
        for gate in gates:
            gate.release()
        for thread in threads:
            thread.join(HANG_GUARD)
    winner, loser = sorted(results, key=lambda name: statuses[name] != 200)
    assert results[winner]["events"][-1][0] == "done"
    assert "already being generated" in results[loser]["refusal"]

    rows = conversation_rows(b, cid)
    assert all(m.status != "streaming" for m in rows)
    # Nothing of the refused turn was stored: not its text, and no question left without an answer.
    assert not any(f"on {loser}" in m.content for m in rows)
    answered_ids = {m.parent_id for m in rows if m.role == "assistant"}
    assert all(m.id in answered_ids for m in rows if m.role == "user")
    new = {m.id for m in rows} - {m.id for m in before}
    expected_new = {"send": 2, "regenerate": 1, "continue": 0, "edit": 2}[turns[0 if winner == "a" else 1]]
    assert len(new) == expected_new
    # The conversation goes on: the loser's replica answers the next message.
    with (a if loser == "a" else b).stream("POST", f"/api/v1/conversations/{cid}/messages", json={"content": "next"},
                                           headers=HEADERS) as r:
        assert list(parse_sse(r.iter_lines()))[-1][0] == "done"


# --- following on B an answer that A generates -------------------------------------------------


def test_an_answer_generated_on_a_is_followed_on_b(replicas):
    a, b = replicas
    cid = a.post("/api/v1/conversations", json={"temperature": 0.0, "max_new_tokens": 40}, headers=HEADERS).json()["id"]
    assert b.get(f"/api/v1/conversations/{cid}/answer", headers=HEADERS).status_code == 204  # nothing runs anywhere
    with held_answer(a, cid) as (gate, _, events), \
            b.stream("GET", f"/api/v1/conversations/{cid}/answer", headers=HEADERS) as followed:
        assert followed.status_code == 200 and not b.app.state.active.watched()  # B follows; it generates nothing
        on_b = parse_sse(followed.iter_lines())
        start = next(on_b)
        gate.release()
        on_a = list(events)
        on_b = [start, *on_b]
    stored = a.get(f"/api/v1/conversations/{cid}", headers=HEADERS).json()["messages"][-1]
    assert stored["status"] == "complete" and stored["content"]
    assert on_b[0][0] == "start" and on_b[0][1]["assistant_message_id"] == stored["id"]
    assert "".join(data["text"] for event, data in on_b if event == "delta") == stored["content"]
    assert {event for event, _ in on_b[1:-1]} <= {"delta"}
    (_, done_b), (_, done_a) = on_b[-1], on_a[-1]
    assert on_b[-1][0] == "done" and set(done_b) == set(done_a)
    assert done_b["message"]["content"] == done_a["message"]["content"] == stored["content"]
    assert done_b["finish_reason"] == done_a["finish_reason"]
    assert b.get(f"/api/v1/conversations/{cid}/answer", headers=HEADERS).status_code == 204


def test_a_stop_on_b_ends_bs_following_with_the_text_a_wrote_last(replicas):
    """A stop marks the row "interrupted" before A writes its last text: B's follower waits for that write."""
    a, b = replicas
    cid = a.post("/api/v1/conversations", json={"temperature": 0.0, "max_new_tokens": 900}, headers=HEADERS).json()["id"]
    with held_answer(a, cid) as (gate, held_at, events), \
            b.stream("GET", f"/api/v1/conversations/{cid}/answer", headers=HEADERS) as followed:
        on_b = parse_sse(followed.iter_lines())
        assert next(on_b)[0] == "start"
        job = a_job(a)
        assert b.post(f"/api/v1/conversations/{cid}/stop", headers=HEADERS).json() == {"stopped": True}
        wait_until(job.cancelled.is_set, "replica A cancelling the answer stopped on replica B")
        gate.release()
        on_a = list(events)
        on_b = list(on_b)
    stored = b.get(f"/api/v1/conversations/{cid}", headers=HEADERS).json()["messages"][-1]
    assert stored["status"] == "interrupted" and stored["finish_reason"] == "cancelled"
    assert on_b[-1][0] == "done" and on_b[-1][1]["finish_reason"] == "cancelled"
    assert on_b[-1][1]["message"]["content"] == on_a[-1][1]["message"]["content"] == stored["content"]
    assert "".join(data["text"] for event, data in on_b if event == "delta") == stored["content"]
    assert on_b[-1][1]["completion_tokens"] == held_at


def test_deleting_the_conversation_ends_bs_following_with_an_error(replicas):
    a, b = replicas
    cid = a.post("/api/v1/conversations", json={"temperature": 0.0, "max_new_tokens": 900}, headers=HEADERS).json()["id"]
    with held_answer(a, cid) as (gate, _, events), \
            b.stream("GET", f"/api/v1/conversations/{cid}/answer", headers=HEADERS) as followed:
        on_b = parse_sse(followed.iter_lines())
        assert next(on_b)[0] == "start"
        job = a_job(a)
        assert b.delete(f"/api/v1/conversations/{cid}", headers=HEADERS).status_code == 204
        wait_until(job.cancelled.is_set, "replica A cancelling the answer whose conversation B deleted")
        gate.release()
        list(events)
        rest = list(on_b)
    assert rest[-1][0] == "error" and "deleted" in rest[-1][1]["detail"]
    assert rest[-1][1]["message"]["status"] == "streaming"  # the row as B last read it
