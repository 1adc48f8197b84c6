"""Security plumbing: signed session cookies, CSRF tokens, API keys, headers and a request size limit.

- Browser owners are random session ids in an HMAC-signed cookie (HttpOnly, SameSite=Lax).
- Cookie-authenticated state changes need ``X-CSRF-Token``: an HMAC of the session id the page
  embeds in a ``<meta>`` tag. Another site can make the browser send the cookie but cannot read it.
- API keys are compared with ``hmac.compare_digest`` against every configured key, so the time
  taken does not depend on which key (or how much of one) matched. Keys never reach the logs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

# The app's own pages: scripts and styles from our origin only, no inline code.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def load_or_create_secret(path: Path) -> bytes:
    """The signing key kept at ``path``, created (mode 0600) on first use so sessions survive restarts."""
    path = Path(path)
    if path.is_file():
        data = path.read_bytes().strip()
        if len(data) < 32:
            raise ValueError(f"secret key file {path} is shorter than 32 bytes; delete it to make a new one")
        return data
    path.parent.mkdir(parents=True, exist_ok=True)
    data = secrets.token_urlsafe(48).encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        # link() fails if another process won the race; then everyone uses the winner's key.
        os.link(tmp, path)
    except FileExistsError:
        data = path.read_bytes().strip()
    finally:
        os.unlink(tmp)
    return data


SIGNED_IN = "~"  # separates a signed-in session's random id from its user (not in either alphabet)


class SessionSigner:
    """Issues and verifies ``<session id>.<hmac>`` cookie values and the CSRF token bound to each session."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def _mac(self, purpose: str, value: str) -> str:
        return _b64(hmac.new(self._secret, f"{purpose}:{value}".encode(), hashlib.sha256).digest())

    def new_session(self, user: str | None = None) -> tuple[str, str]:
        """A fresh session id and its cookie value; with ``user``, a session signed in as that
        API key's user (the name rides in the signed id, so it cannot be changed by the browser)."""
        session_id = secrets.token_urlsafe(18)
        if user is not None:
            session_id += SIGNED_IN + _b64(user.encode())
        return session_id, f"{session_id}.{self._mac('session', session_id)}"

    @staticmethod
    def session_user(session_id: str) -> str | None:
        """The user a session was signed in as, or None for an anonymous one."""
        if SIGNED_IN not in session_id:
            return None
        encoded = session_id.split(SIGNED_IN, 1)[1]
        try:
            return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
        except (ValueError, UnicodeDecodeError):
            return None

    def verify(self, cookie: str | None) -> str | None:
        if not cookie or cookie.count(".") != 1:
            return None
        session_id, mac = cookie.split(".")
        if not session_id or not hmac.compare_digest(mac, self._mac("session", session_id)):
            return None
        return session_id

    def csrf_token(self, session_id: str) -> str:
        return self._mac("csrf", session_id)

    def check_csrf(self, session_id: str, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(token, self.csrf_token(session_id))


def match_api_key(presented: str, keys: dict[str, str]) -> str | None:
    """The user whose key equals ``presented``, comparing against every key in constant time."""
    found: str | None = None
    presented_bytes = presented.encode()
    for user, key in keys.items():
        if hmac.compare_digest(presented_bytes, key.encode()):
            found = user
    return found


class SecurityHeadersMiddleware:
    """Adds CSP, nosniff, frame denial and referrer policy to every response that has not set its own."""

    HEADERS = {
        b"content-security-policy": CSP.encode(),
        b"x-content-type-options": b"nosniff",
        b"x-frame-options": b"DENY",
        b"referrer-policy": b"same-origin",
        b"cross-origin-opener-policy": b"same-origin",
        b"permissions-policy": b"camera=(), microphone=(), geolocation=()",
    }

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers += [(k, v) for k, v in self.HEADERS.items() if k not in present]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_wrapper)


class TrackedSend:
    """An ASGI ``send`` that records whether the response has started: after the status line is
    out, an error can no longer be answered with another response."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.started = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self.send(message)


class BodySizeLimitMiddleware:
    """Answers 413 when a request body exceeds ``max_bytes``, by its Content-Length or as it streams in."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _reject(self, send: Send) -> None:
        body = b'{"detail":"request body too large (limit %d bytes; SCRATCHGPT_MAX_REQUEST_BYTES)"}' % self.max_bytes
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = True
                if too_big:
                    await self._reject(send)
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge()
            return message

        tracked = TrackedSend(send)
        try:
            await self.app(scope, limited_receive, tracked)
        except _BodyTooLarge:
            if not tracked.started:
                await self._reject(send)


class _BodyTooLarge(HTTPException):
    # An HTTPException, so FastAPI's body reader re-raises it and the app answers 413 itself.
    def __init__(self) -> None:
        super().__init__(413, "request body too large (SCRATCHGPT_MAX_REQUEST_BYTES)")
