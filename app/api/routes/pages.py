"""The browser UI: the chat page and the spam-check page (Jinja2 templates, static JS and CSS).

Each page gives the browser its session and CSRF token (``app.ui.Pages``).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from app.api.deps import PagesDep

router = APIRouter(include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
def chat_page(request: Request, pages: PagesDep) -> HTMLResponse:
    return pages.render(request, "chat.html", page="chat")


@router.get("/c/{conversation_id}", response_class=HTMLResponse)
def conversation_page(request: Request, pages: PagesDep, conversation_id: str) -> HTMLResponse:
    # The script reads the id from the URL and loads the conversation (404s are shown there).
    return pages.render(request, "chat.html", page="chat")


@router.get("/spam", response_class=HTMLResponse)
def spam_page(request: Request, pages: PagesDep) -> HTMLResponse:
    return pages.render(request, "spam.html", page="spam")
