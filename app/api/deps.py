"""Dependencies as typed aliases, so every route reads like its contract.

This is the one module that reads the app's state (what ``app.main.create_app`` put on
``app.state``); routes ask for what they need here, by type.

Owners: a request is made by
- an API key's user (``Authorization: Bearer KEY`` or ``X-API-Key: KEY``), owner ``key:<user>``;
- a browser session (signed cookie set by the pages), owner ``session:<id>``; changes need the
  page's CSRF token in ``X-CSRF-Token``. With API keys configured a session opens nothing until
  it is signed in with a key at ``/login``, and is then that key's user, ``key:<user>``;
- nobody in particular, owner ``local``, allowed only when no API keys are configured
  (a single-user install on a laptop).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.db import crud
from app.db.models import Conversation
from app.metrics import Metrics
from app.security import CSRF_HEADER, SAFE_METHODS, match_api_key
from app.services.chat import ChatService
from app.services.jobs import JobWatcher
from app.services.lab import LabRunner
from app.services.registry import ModelRegistry
from app.services.streaming import ActiveGenerations
from app.settings import Settings
from app.ui import Pages

bearer_scheme = HTTPBearer(auto_error=False, description="An API key from SCRATCHGPT_API_KEYS")
api_key_scheme = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key from SCRATCHGPT_API_KEYS")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as session:
        yield session


def get_models(request: Request) -> ModelRegistry:
    return request.app.state.models


def get_active(request: Request) -> ActiveGenerations:
    return request.app.state.active


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_lab(request: Request) -> LabRunner:
    return request.app.state.lab


def get_pages(request: Request) -> Pages:
    return request.app.state.pages


def get_jobs(request: Request) -> JobWatcher:
    return request.app.state.jobs


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
ModelsDep = Annotated[ModelRegistry, Depends(get_models)]
ActiveDep = Annotated[ActiveGenerations, Depends(get_active)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
LabDep = Annotated[LabRunner, Depends(get_lab)]
PagesDep = Annotated[Pages, Depends(get_pages)]
JobsDep = Annotated[JobWatcher, Depends(get_jobs)]


def get_chat(
    request: Request, session: SessionDep, active: ActiveDep, metrics: MetricsDep, models: ModelsDep,
    settings: SettingsDep,
) -> ChatService:
    """The chat service over this request's session (the same one the route's conversation came from)."""
    return ChatService(session, request.app.state.sessions, active, metrics, models, settings)


ChatDep = Annotated[ChatService, Depends(get_chat)]


@dataclass(frozen=True)
class Owner:
    id: str
    via: str  # "api_key" | "session" | "local"


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(401, detail=detail, headers={"WWW-Authenticate": "Bearer"})


def _api_key_owner(request: Request, bearer: HTTPAuthorizationCredentials | None, header_key: str | None) -> Owner | None:
    presented = bearer.credentials if bearer is not None else header_key
    keys = {user: key.get_secret_value() for user, key in request.app.state.settings.api_keys.items()}
    # Without configured keys, clients that always send one (the openai library) are not turned away.
    if presented is None or not keys:
        return None
    user = match_api_key(presented, keys)
    if user is None:
        raise _unauthorized("invalid API key")
    return Owner(f"key:{user}", "api_key")


def get_owner(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
    header_key: Annotated[str | None, Depends(api_key_scheme)],
) -> Owner:
    owner = _api_key_owner(request, bearer, header_key)
    if owner is not None:
        return owner
    settings: Settings = request.app.state.settings
    cookie = request.cookies.get(settings.session_cookie)
    if cookie is not None and settings.ui_enabled:
        signer = request.app.state.signer
        session_id = signer.verify(cookie)
        if session_id is None:
            raise _unauthorized("your browser session is invalid or expired; reload the page")
        if request.method not in SAFE_METHODS and not signer.check_csrf(session_id, request.headers.get(CSRF_HEADER)):
            raise HTTPException(403, detail="missing or wrong CSRF token (send the page's token in X-CSRF-Token)")
        if settings.api_keys:
            # With keys, a browser is one of the keys' users, signed in at /login: the same owner, and so
            # the same conversations, as that user's API calls. An anonymous cookie opens nothing.
            user = signer.session_user(session_id)
            if user is None or user not in settings.api_keys:
                raise _unauthorized("sign in with your API key at /login, or send Authorization: Bearer <key>")
            return Owner(f"key:{user}", "session")
        return Owner(f"session:{session_id}", "session")
    if settings.api_keys:
        raise _unauthorized("an API key is required: send Authorization: Bearer <key>")
    return Owner("local", "local")


def key_owner(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
    header_key: Annotated[str | None, Depends(api_key_scheme)],
) -> Owner | None:
    """The presented API key's user, None when none was sent (a wrong key is still a 401)."""
    return _api_key_owner(request, bearer, header_key)


KeyOwnerDep = Annotated[Owner | None, Depends(key_owner)]


def require_api_access(request: Request, owner: KeyOwnerDep) -> Owner | None:
    """For the stateless OpenAI-compatible API: a valid key when keys are configured, else open.
    The key's owner, or None for a client without one (an open server)."""
    if owner is None and request.app.state.settings.api_keys:
        raise _unauthorized("an API key is required: send Authorization: Bearer <key>")
    return owner


ApiOwnerDep = Annotated[Owner | None, Depends(require_api_access)]


OwnerDep = Annotated[Owner, Depends(get_owner)]


def get_owned_conversation(conversation_id: str, session: SessionDep, owner: OwnerDep) -> Conversation:
    """The conversation in the path, if this owner has it; otherwise 404 (never 403: ids are not confirmed)."""
    conversation = crud.get_conversation(session, owner.id, conversation_id)
    if conversation is None:
        raise HTTPException(404, detail="conversation not found")
    return conversation


ConversationDep = Annotated[Conversation, Depends(get_owned_conversation)]
