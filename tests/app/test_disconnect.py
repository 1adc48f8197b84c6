"""Clients that go away or misbehave, against a real uvicorn on 127.0.0.1 (not the in-process TestClient).

- A client that closes its connection mid-answer (politely, or with a TCP reset): the answer goes
  on to its end on the server (issue 21: switching conversations must not lose it). The worker is
  held at a known token (app_testing.TokenGate) while the client leaves, so the tests see the
  server notice the client gone while the job is still running, instead of timing anything.
- Stalled and malformed clients (headers that never end, a body that never comes, a stream
  nobody reads, bytes that are not HTTP) hold only their own connection: other users' chats
  and classifications carry on.
"""

from __future__ import annotations

import contextlib
import socket
import struct

import httpx
import pytest

from app_testing import LiveServer, TokenGate, parse_sse
from waiting import HANG_GUARD, wait_until

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see tests/conftest.py

LONG = 900  # tokens asked for; the tiny model would need seconds to write them all


@pytest.fixture
def live(make_settings):
    with LiveServer(make_settings(default_temperature=0.0)) as server:
        yield server


def new_conversation(client: httpx.Client, max_new_tokens: int) -> str:
    response = client.post("/api/v1/conversations", json={"temperature": 0.0, "max_new_tokens": max_new_tokens})
    assert response.status_code == 201
    return response.json()["id"]


def answer_of(client: httpx.Client, cid: str) -> dict:
    return client.get(f"/api/v1/conversations/{cid}").json()["messages"][-1]


def chat_worker(live: LiveServer):
    return live.app.state.models.slots["chat"].worker


def raw_request(port: int, cid: str, text: str) -> bytes:
    body = ('{"content": "%s"}' % text).encode()
    return (
        f"POST /api/v1/conversations/{cid}/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a crashed client or a dropped network does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


SHORT = 60  # tokens of an answer that must run to its end after its client left


def leave_while_held(live: LiveServer, cid: str, gate: TokenGate, leave) -> None:
    """With the worker held at a token, the client leaves (``leave()``); the server notices (the
    answer loses its only follower) while the job is still held, and does not cancel it."""
    gate.wait_held()
    job = chat_worker(live).current
    answer = live.app.state.active.get(cid)
    leave()
    wait_until(lambda: not answer._followers, "the server noticing that the client left")
    assert not job.cancelled.is_set(), "a client that left cancelled the answer"
    gate.release()


def test_closing_the_stream_leaves_the_answer_going_to_its_end(live):
    """Issue 21: a client that stops reading (another conversation opened) must not lose the answer."""
    with httpx.Client(base_url=live.url, timeout=HANG_GUARD) as client, TokenGate(chat_worker(live), 6) as gate:
        cid = new_conversation(client, SHORT)
        received = ""
        connection = contextlib.ExitStack()
        response = connection.enter_context(
            client.stream("POST", f"/api/v1/conversations/{cid}/messages", json={"content": "a long story"}))
        events = parse_sse(response.iter_lines())  # kept open: leaving this loop must not close the stream
        for event, data in events:
            if event == "delta":
                received += data["text"]
                break
        leave_while_held(live, cid, gate, connection.close)
        answer = wait_until(lambda: (a := answer_of(client, cid))["status"] != "streaming" and a, "the answer finishing")
        assert answer["status"] == "complete" and answer["finish_reason"] == "length"
        assert answer["content"].startswith(received) and answer["completion_tokens"] == SHORT
        assert not live.app.state.active.is_active(cid)

        # The same conversation takes the next message at once, with the whole answer in its history.
        client.patch(f"/api/v1/conversations/{cid}", json={"max_new_tokens": 8})
        with client.stream("POST", f"/api/v1/conversations/{cid}/messages", json={"content": "go on"}) as r:
            events = list(parse_sse(r.iter_lines()))
        assert events[-1][0] == "done" and events[-1][1]["message"]["status"] == "complete"
        statuses = [m["status"] for m in client.get(f"/api/v1/conversations/{cid}").json()["messages"]]
        assert statuses == ["complete", "complete", "complete", "complete"]


def test_a_reset_connection_leaves_the_answer_going(live):
    with httpx.Client(base_url=live.url, timeout=HANG_GUARD) as client, TokenGate(chat_worker(live), 6) as gate:
        cid = new_conversation(client, SHORT)
        sock = socket.create_connection(("127.0.0.1", live.port))
        sock.sendall(raw_request(live.port, cid, "a long story"))
        seen = b""
        while seen.count(b"event: delta") < 1:
            chunk = sock.recv(4096)
            assert chunk, "server closed the stream early"
            seen += chunk
        assert seen.startswith(b"HTTP/1.1 200")
        leave_while_held(live, cid, gate, lambda: reset(sock))
        answer = wait_until(lambda: (a := answer_of(client, cid))["status"] != "streaming" and a, "the answer finishing")
        assert answer["status"] == "complete" and answer["completion_tokens"] == SHORT


def test_stalled_and_malformed_clients_do_not_stall_other_users(live):
    port = live.port
    bad: list[socket.socket] = []
    with httpx.Client(base_url=live.url, timeout=HANG_GUARD) as client:
        unread_cid = new_conversation(client, LONG)
        try:
            # Headers that never end (slowloris).
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /api/v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n")
            bad.append(s)
            # A body that never comes: 1000 bytes announced, 10 sent.
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /api/v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{\"text\": \"")
            bad.append(s)
            # A long answer nobody reads, through a tiny receive window.
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            s.connect(("127.0.0.1", port))
            s.sendall(raw_request(port, unread_cid, "talk for a long time"))
            bad.append(s)
            # Not HTTP at all (a TLS hello on the plain port): answered 400 and closed, nothing else.
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32) + b"\r\n\r\n")
            s.settimeout(HANG_GUARD)
            assert s.recv(64).startswith(b"HTTP/1.1 400")
            s.close()
            wait_until(lambda: live.app.state.active.is_active(unread_cid), "the unread answer starting")

            # Meanwhile everyone else is served.
            spam = client.post("/api/v1/classify", json={"text": "WINNER! Claim your prize"})
            assert spam.status_code == 200 and spam.json()["label"] in ("spam", "ham")
            # The one chat worker finishes the unread answer first (at full speed, into memory: a
            # reader that does not read costs others no more than one that does), then this one.
            other = new_conversation(client, 16)
            with client.stream("POST", f"/api/v1/conversations/{other}/messages", json={"content": "hi"}) as r:
                events = list(parse_sse(r.iter_lines()))
            assert events[-1][0] == "done" and events[-1][1]["completion_tokens"] == 16
            assert client.get("/health").status_code == 200
        finally:
            for s in bad:
                reset(s)
        # The reader that never read is gone: its answer runs to its end (issue 21) and its
        # conversation is free again.
        wait_until(lambda: not live.app.state.active.is_active(unread_cid), "the unread stream's release")
        answer = wait_until(lambda: (a := answer_of(client, unread_cid))["status"] != "streaming" and a,
                            "the unread answer settling")
        assert answer["status"] == "complete" and answer["content"]
        print(f"the unread answer ended {answer['status']} after {answer['completion_tokens']} tokens")
