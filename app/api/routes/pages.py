"""The browser UI: the chat page and the spam-check page (Jinja2 templates, static JS and CSS).

Each page gives the browser its session and CSRF token (``app.ui.Pages``). With API keys
configured, a browser signs in with one at ``/login`` first: its session is then that key's user,
who sees the same conversations in the UI as through the API, and nobody without a key gets in.
"""

from __future__ import annotations

from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from app.api.deps import PagesDep, SettingsDep
from app.security import CSRF_HEADER, match_api_key

router = APIRouter(include_in_schema=False)


@router.get("/", response_class=HTMLResponse, response_model=None)
def chat_page(request: Request, pages: PagesDep) -> HTMLResponse | RedirectResponse:
    return pages.render(request, "chat.html", page="chat")


@router.get("/c/{conversation_id}", response_class=HTMLResponse, response_model=None)
def conversation_page(request: Request, pages: PagesDep, conversation_id: str) -> HTMLResponse | RedirectResponse:
    # The script reads the id from the URL and loads the conversation (404s are shown there).
    return pages.render(request, "chat.html", page="chat")


@router.get("/spam", response_class=HTMLResponse, response_model=None)
def spam_page(request: Request, pages: PagesDep) -> HTMLResponse | RedirectResponse:
    return pages.render(request, "spam.html", page="spam")


def _local_path(target: str | None) -> str:
    """Where to go after signing in: a path on this server, never another site."""
    return target if target and target.startswith("/") and not target.startswith("//") else "/"


@router.get("/login", response_class=HTMLResponse, response_model=None)
def login_page(request: Request, pages: PagesDep) -> HTMLResponse | RedirectResponse:
    return pages.render(request, "login.html", page="login", signed_in_only=False,
                        next=_local_path(request.query_params.get("next")), error=None)


@router.post("/login", response_class=HTMLResponse, response_model=None)
async def login(request: Request, pages: PagesDep, settings: SettingsDep) -> HTMLResponse | RedirectResponse:
    """Sign the browser in with an API key (a form post from the sign-in page, with its CSRF token)."""
    form = {k: v[0] for k, v in parse_qs((await request.body()).decode("utf-8", "replace")).items()}
    signer = pages.signer
    session_id = signer.verify(request.cookies.get(settings.session_cookie))
    target = _local_path(form.get("next"))
    if session_id is None or not signer.check_csrf(session_id, form.get("csrf_token") or request.headers.get(CSRF_HEADER)):
        response = pages.render(request, "login.html", page="login", signed_in_only=False, next=target,
                                error="Your session expired; try again.")
        response.status_code = 403
        return response
    keys = {user: key.get_secret_value() for user, key in settings.api_keys.items()}
    user = match_api_key(form.get("key", ""), keys) if keys else None
    if user is None:
        response = pages.render(request, "login.html", page="login", signed_in_only=False, next=target,
                                error="That key is not one of this server's API keys." if keys
                                else "This server has no API keys: nothing to sign in to.")
        response.status_code = 401 if keys else 400
        return response
    response = RedirectResponse(target, status_code=303)
    pages.set_session(response, signer.new_session(user)[1])  # a new id: the anonymous one is dropped
    return response


@router.post("/logout")
def logout(pages: PagesDep) -> RedirectResponse:
    response = RedirectResponse("/login", status_code=303)
    pages.set_session(response, pages.signer.new_session()[1])
    return response
