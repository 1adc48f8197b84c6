"""Clients that go away or misbehave, against a real uvicorn on 127.0.0.1 (not the in-process TestClient).

- A client that closes its connection mid-answer (politely, or with a TCP reset): the answer is
  kept, marked interrupted, and the model worker stops at its next token. The worker is held at a
  known token (app_testing.TokenGate) while the client leaves, so the tests wait for the server's
  own cancel and count the tokens after it (none) instead of timing anything.
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


def leave_while_held(live: LiveServer, gate: TokenGate, leave) -> int:
    """With the worker held at a token, the client leaves (``leave()``); the server's own cancel
    reaches the job while it is still held. Returns the tokens generated when it was held."""
    held_at = gate.wait_held()
    job = chat_worker(live).current
    leave()
    assert job.cancelled.wait(HANG_GUARD), "the server never cancelled the job of a client that left"
    gate.release()
    wait_until(lambda: chat_worker(live).current is None, "the worker dropping the job")
    assert job.completion_tokens == held_at  # it stopped at the next token
    return held_at


def test_closing_the_stream_interrupts_the_answer_and_frees_the_worker(live):
    with httpx.Client(base_url=live.url, timeout=HANG_GUARD) as client, TokenGate(chat_worker(live), 6) as gate:
        cid = new_conversation(client, LONG)
        received = ""
        connection = contextlib.ExitStack()
        response = connection.enter_context(
            client.stream("POST", f"/api/v1/conversations/{cid}/messages", json={"content": "a long story"}))
        events = parse_sse(response.iter_lines())  # kept open: leaving this loop must not close the stream
        for event, data in events:
            if event == "delta":
                received += data["text"]
                break
        held_at = leave_while_held(live, gate, connection.close)
        answer = wait_until(lambda: (a := answer_of(client, cid))["status"] != "streaming" and a, "the row settling")
        assert answer["status"] == "interrupted" and answer["finish_reason"] == "disconnected"
        assert answer["content"].startswith(received)  # everything sent was stored (and maybe a little more)
        assert answer["completion_tokens"] == held_at
        assert not live.app.state.active.is_active(cid)

        # The same conversation takes the next message at once, with the interrupted answer in its history.
        client.patch(f"/api/v1/conversations/{cid}", json={"max_new_tokens": 8})
        with client.stream("POST", f"/api/v1/conversations/{cid}/messages", json={"content": "go on"}) as r:
            events = list(parse_sse(r.iter_lines()))
        assert events[-1][0] == "done" and events[-1][1]["message"]["status"] == "complete"
        statuses = [m["status"] for m in client.get(f"/api/v1/conversations/{cid}").json()["messages"]]
        assert statuses == ["complete", "interrupted", "complete", "complete"]


def test_a_reset_connection_interrupts_the_answer(live):
    with httpx.Client(base_url=live.url, timeout=HANG_GUARD) as client, TokenGate(chat_worker(live), 6) as gate:
        cid = new_conversation(client, LONG)
        sock = socket.create_connection(("127.0.0.1", live.port))
        sock.sendall(raw_request(live.port, cid, "a long story"))
        seen = b""
        while seen.count(b"event: delta") < 1:
            chunk = sock.recv(4096)
            assert chunk, "server closed the stream early"
            seen += chunk
        assert seen.startswith(b"HTTP/1.1 200")
        held_at = leave_while_held(live, gate, lambda: reset(sock))
        answer = wait_until(lambda: (a := answer_of(client, cid))["status"] != "streaming" and a, "the row settling")
        assert answer["status"] == "interrupted" and answer["content"]
        assert answer["completion_tokens"] == held_at


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
        # The reader that never read is gone: its answer settles (interrupted, or complete if the
        # whole answer fitted in the socket buffers) and its conversation is free again.
        wait_until(lambda: not live.app.state.active.is_active(unread_cid), "the unread stream's release")
        answer = wait_until(lambda: (a := answer_of(client, unread_cid))["status"] != "streaming" and a,
                            "the unread answer settling")
        assert answer["status"] in ("interrupted", "complete") and answer["content"]
        print(f"the unread answer ended {answer['status']} after {answer['completion_tokens']} tokens")
