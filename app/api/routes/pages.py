"""The browser UI: the chat page and the spam-check page (Jinja2 templates, static JS and CSS).

Visiting a page gives the browser its session (a signed random id in an HttpOnly cookie) and
puts the session's CSRF token in a ``<meta>`` tag for the scripts to send back.
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse

router = APIRouter(include_in_schema=False)

SESSION_MAX_AGE = 400 * 24 * 3600  # the longest lifetime browsers accept


def _page(request: Request, template: str, **context: object) -> HTMLResponse:
    state = request.app.state
    settings = state.settings
    if not settings.ui_enabled:
        raise HTTPException(404, detail="the browser UI is switched off (SCRATCHGPT_UI_ENABLED=false)")
    session_id = state.signer.verify(request.cookies.get(settings.session_cookie))
    new_cookie = None
    if session_id is None:
        session_id, new_cookie = state.signer.new_session()
    response = state.templates.TemplateResponse(
        request,
        template,
        {"csrf_token": state.signer.csrf_token(session_id), "asset_version": state.asset_version, **context},
    )
    if new_cookie is not None:
        response.set_cookie(
            settings.session_cookie, new_cookie, max_age=SESSION_MAX_AGE, httponly=True, samesite="lax",
            secure=settings.cookie_secure, path="/",
        )
    response.headers["Cache-Control"] = "no-store"
    return response


@router.get("/", response_class=HTMLResponse)
def chat_page(request: Request) -> HTMLResponse:
    return _page(request, "chat.html", page="chat")


@router.get("/c/{conversation_id}", response_class=HTMLResponse)
def conversation_page(request: Request, conversation_id: str) -> HTMLResponse:
    # The script reads the id from the URL and loads the conversation (404s are shown there).
    return _page(request, "chat.html", page="chat")


@router.get("/spam", response_class=HTMLResponse)
def spam_page(request: Request) -> HTMLResponse:
    return _page(request, "spam.html", page="spam")
