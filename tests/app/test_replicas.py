"""Two replicas on one database: any of them serves any request of a conversation.

Two apps, each with its own models, engine, answers in progress and stop watcher (as two processes
behind a load balancer would have), share a database and the settings (the signing key, the API
keys). An answer streams from replica A; the stop or the delete goes to replica B, which never held
the job: A's watcher must find the change in the database and end the answer
(app.services.cancellation). A's engine is held at a known token (TokenGate) until the cancel has
arrived, so the test does not race the tiny model to the end of its answer; how long the poll takes
is measured in the report, not asserted here.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from app_testing import TokenGate, parse_sse, running_client
from waiting import wait_until

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
