"""The browser UI's plumbing: a page rendered from its template with the browser's session.

Rendering a page gives the browser its session (a signed random id in an HttpOnly cookie) and
puts the session's CSRF token in a ``<meta>`` tag for the scripts to send back; static file
URLs carry a hash of the files, so browsers fetch new versions after an upgrade.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from urllib.parse import quote

from fastapi import HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from app.security import SessionSigner
from app.settings import Settings

SESSION_MAX_AGE = 400 * 24 * 3600  # the longest lifetime browsers accept


def asset_version(static_dir: Path) -> str:
    """A short hash of the static files, appended to their URLs so browsers fetch new versions."""
    digest = hashlib.sha256()
    for path in sorted(static_dir.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


class Pages:
    """Renders the UI's pages; one per app (``app.state.pages``)."""

    def __init__(self, settings: Settings, signer: SessionSigner) -> None:
        self.settings = settings
        self.signer = signer
        self.templates = Jinja2Templates(directory=str(settings.templates_dir))
        self.asset_version = asset_version(settings.static_dir)

    def render(self, request: Request, template: str, *, signed_in_only: bool = True,
               **context: object) -> HTMLResponse | RedirectResponse:
        """The page, with the browser's session (a new one if it has none) and its CSRF token.

        With API keys configured, a page other than the sign-in page (``signed_in_only=False``)
        sends a browser that is not signed in to ``/login`` first."""
        settings, signer = self.settings, self.signer
        if not settings.ui_enabled:
            raise HTTPException(404, detail="the browser UI is switched off (SCRATCHGPT_UI_ENABLED=false)")
        session_id = signer.verify(request.cookies.get(settings.session_cookie))
        user = signer.session_user(session_id) if session_id else None
        if signed_in_only and settings.api_keys and user not in settings.api_keys:
            return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)
        new_cookie = None
        if session_id is None:
            session_id, new_cookie = signer.new_session()
        response = self.templates.TemplateResponse(
            request,
            template,
            {"csrf_token": signer.csrf_token(session_id), "asset_version": self.asset_version,
             "signed_in_as": user if settings.api_keys else None, **context},
        )
        if new_cookie is not None:
            self.set_session(response, new_cookie)
        response.headers["Cache-Control"] = "no-store"
        return response

    def set_session(self, response: Response, cookie: str) -> None:
        response.set_cookie(
            self.settings.session_cookie, cookie, max_age=SESSION_MAX_AGE, httponly=True, samesite="lax",
            secure=self.settings.cookie_secure, path="/",
        )
