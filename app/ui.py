"""The browser UI's plumbing: a page rendered from its template with the browser's session.

Rendering a page gives the browser its session (a signed random id in an HttpOnly cookie) and
puts the session's CSRF token in a ``<meta>`` tag for the scripts to send back; static file
URLs carry a hash of the files, so browsers fetch new versions after an upgrade.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from fastapi import HTTPException, Request
from fastapi.responses import HTMLResponse
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

    def render(self, request: Request, template: str, **context: object) -> HTMLResponse:
        settings, signer = self.settings, self.signer
        if not settings.ui_enabled:
            raise HTTPException(404, detail="the browser UI is switched off (SCRATCHGPT_UI_ENABLED=false)")
        session_id = signer.verify(request.cookies.get(settings.session_cookie))
        new_cookie = None
        if session_id is None:
            session_id, new_cookie = signer.new_session()
        response = self.templates.TemplateResponse(
            request,
            template,
            {"csrf_token": signer.csrf_token(session_id), "asset_version": self.asset_version, **context},
        )
        if new_cookie is not None:
            response.set_cookie(
                settings.session_cookie, new_cookie, max_age=SESSION_MAX_AGE, httponly=True, samesite="lax",
                secure=settings.cookie_secure, path="/",
            )
        response.headers["Cache-Control"] = "no-store"
        return response
