"""The app factory: ``create_app(settings)`` builds a FastAPI app with its own database, models and metrics.

The lifespan applies the migrations, marks answers a previous process left "streaming" as
"interrupted", starts loading the models in a background thread, so the server answers
/health at once and /ready once the models have settled, and starts watching the background
fine-tunes (``app.services.jobs``), whose checkpoints it loads when they are done.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import re
from datetime import timedelta
from contextlib import asynccontextmanager
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.routes import classify, conversations, health, jobs, lab, messages, openai_compat, pages
from app.api.routes import lab_prompting, lab_tokenizers
from app.api.routes import models as chat_models
from app.api.routes import settings as chat_settings
from app.api.routes.openai_compat import OpenAIError
from app.db import crud, make_engine, make_sessionmaker, upgrade
from app.db.models import utcnow
from app.logs import AccessLogMiddleware
from app.metrics import Metrics, MetricsMiddleware
from app.openapi import install_openapi
from app.schemas import COMMON_RESPONSES
from app.security import (
    CSP,
    BodySizeLimitMiddleware,
    SecurityHeadersMiddleware,
    SessionSigner,
    TrackedSend,
    load_or_create_secret,
)
from app.services.cancellation import StopWatcher
from app.services.jobs import JobWatcher
from app.services.lab import LabRunner
from app.services.registry import ModelRegistry, ModelUnavailable
from app.services.streaming import ActiveGenerations
from app.services.workers import WorkerStopped
from app.settings import Settings
from app.ui import Pages

logger = logging.getLogger("scratchgpt.app")

VERSION = "0.1.0"


class DatabaseReadOnly(RuntimeError):
    """The startup could not write the database; the message says which and what to do."""


def _is_read_only(exc: DBAPIError) -> bool:
    orig = exc.orig
    return (
        str(getattr(orig, "sqlite_errorname", "")).startswith("SQLITE_READONLY")
        or getattr(orig, "sqlstate", None) == "25006"  # PostgreSQL: read_only_sql_transaction
        or "readonly database" in str(orig)
    )


def prepare_database(settings: Settings, sessions: sessionmaker[Session]) -> None:
    """Apply the migrations and mark answers a previous process left "streaming" as "interrupted".

    Both write, so a database this process may not write fails here, as ``DatabaseReadOnly``.
    """
    url = settings.resolved_database_url
    # Alone on the database, every answer still "streaming" is a previous run's; shared with other
    # replicas, only one whose lease lapsed is (app.services.cancellation).
    renewed_before = utcnow() - timedelta(seconds=settings.stream_lease_seconds) if settings.shared_database else None
    try:
        upgrade(url, migrations_dir=settings.migrations_dir)
        with sessions() as session:
            leftovers = crud.interrupt_streaming_messages(session, renewed_before=renewed_before)
    except DBAPIError as exc:
        if not _is_read_only(exc):
            raise
        shown = make_url(url).render_as_string(hide_password=True)
        raise DatabaseReadOnly(
            f"the database {shown} is read-only for this process ({exc.orig}); make it and its folder "
            "writable for this user, or set SCRATCHGPT_DATABASE_URL to a database it can write"
        ) from None
    if leftovers:
        logger.warning("answers left streaming by a previous run marked interrupted", extra={"count": leftovers})


def _startup_database(app: FastAPI) -> None:
    prepare_database(app.state.settings, app.state.sessions)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    await run_in_threadpool(_startup_database, app)
    if app.state.models.stopped:  # the same app started again (tests, embedding servers)
        app.state.models = ModelRegistry(app.state.settings, app.state.metrics)
    app.state.models.start_loading()
    app.state.stops.start()
    watching = asyncio.create_task(app.state.jobs.run(), name="job-watcher")
    logger.info("service started", extra={"database": app.state.engine.url.render_as_string(hide_password=True)})
    try:
        yield
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching
        app.state.active.cancel_all()
        await app.state.active.drain()  # the answers store their last state before the models go
        await run_in_threadpool(app.state.stops.close)
        await run_in_threadpool(app.state.models.stop)
        app.state.engine.dispose()


def _allowed_methods(app: FastAPI, request: Request) -> str:
    methods: set[str] = set()
    for route in app.router.routes:
        regex = getattr(route, "path_regex", None)
        if regex is not None and getattr(route, "methods", None) and regex.match(request.url.path):
            methods |= set(route.methods)
    return ", ".join(sorted(methods))


def _is_openai_path(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ModelUnavailable)
    async def model_unavailable(request: Request, exc: ModelUnavailable) -> JSONResponse:
        retry_after = exc.retry_after or (5 if exc.state == "loading" else None)
        headers = {"Retry-After": str(retry_after)} if retry_after else None
        if _is_openai_path(request):
            response = OpenAIError(503, exc.detail, type_="server_error", code=f"model_{exc.state}").response()
            response.headers.update(headers or {})
            return response
        return JSONResponse({"detail": exc.detail, "model": exc.role, "state": exc.state}, status_code=503,
                            headers=headers)

    @app.exception_handler(WorkerStopped)
    async def worker_stopped(request: Request, exc: WorkerStopped) -> JSONResponse:
        detail = f"the server is shutting down ({exc}); retry shortly"
        if _is_openai_path(request):
            return OpenAIError(503, detail, type_="server_error").response()
        return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):  # type: ignore[no-untyped-def]
        if exc.status_code == 405:
            # Starlette's Allow lists one route's methods; a path served by several routes needs all.
            exc = StarletteHTTPException(405, exc.detail, headers={"Allow": _allowed_methods(app, request)})
        if _is_openai_path(request):
            kind = "authentication_error" if exc.status_code == 401 else "invalid_request_error"
            response = OpenAIError(exc.status_code, str(exc.detail), type_=kind).response()
            if exc.headers:
                response.headers.update(exc.headers)
            return response
        return await http_exception_handler(request, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):  # type: ignore[no-untyped-def]
        if _is_openai_path(request):
            first = exc.errors()[0] if exc.errors() else {}
            where = ".".join(str(p) for p in first.get("loc", ())[1:])
            return OpenAIError(422, f"{where}: {first.get('msg', 'invalid request')}", param=where or None).response()
        # ensure_ascii: an echoed input may hold lone surrogates (pydantic rejects them as text),
        # which cannot be encoded as UTF-8; \u escapes can.
        body = json.dumps({"detail": jsonable_encoder(exc.errors())}, ensure_ascii=True)
        return Response(body, status_code=422, media_type="application/json")


class JsonServerErrors:
    """Answers an exception no handler took with a JSON 500 (OpenAI's shape under /v1/).

    Starlette's own catch-all sits outside every middleware, so its plain-text 500 went out
    without the security headers and uncounted; added first, this one is inside them all. The
    answer gives the request id, which the logged traceback carries.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tracked = TrackedSend(send)
        try:
            await self.app(scope, receive, tracked)
        except StarletteHTTPException:
            raise  # the body size limit's, for the middleware that raised it
        except Exception:
            if tracked.started:
                raise  # the status line is out: only dropping the connection can still say it failed
            request_id = scope.get("state", {}).get("request_id", "-")
            logger.exception("unhandled error", extra={"request_id": request_id, "path": scope.get("path")})
            detail = f"internal server error (request id {request_id}); the server log has the details"
            if scope.get("path", "").startswith("/v1/"):
                response: Response = OpenAIError(500, detail, type_="server_error").response()
            else:
                response = JSONResponse({"detail": detail}, status_code=500)
            await response(scope, receive, send)


def _install_docs(app: FastAPI) -> None:
    """Swagger UI at /docs from our pinned copy (static/vendor/, .ci/vendor-web), so it works offline.

    The page's CSP is the app's own plus exactly its one inline script (by hash). /redoc, where
    FastAPI apps usually have a second viewer, leads here.
    """

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        page = get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} API",
            swagger_js_url=f"/static/vendor/swagger-ui-bundle.js?v={app.state.pages.asset_version}",
            swagger_css_url=f"/static/vendor/swagger-ui.css?v={app.state.pages.asset_version}",
            swagger_favicon_url=f"/static/favicon.svg?v={app.state.pages.asset_version}",
            # The validator badge would fetch from validator.swagger.io.
            swagger_ui_parameters={"validatorUrl": None},
        )
        html = page.body.decode()
        hashes = " ".join(
            "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"
            for script in re.findall(r"<script>(.*?)</script>", html, flags=re.S)
        )
        csp = CSP.replace("script-src 'self'", f"script-src 'self' {hashes}")
        return HTMLResponse(html, headers={"Content-Security-Policy": csp})

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> RedirectResponse:
        return RedirectResponse("/docs")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service. Nothing heavy happens here: the lifespan migrates and loads models."""
    settings = settings or Settings()
    metrics = Metrics()
    app = FastAPI(
        title="scratchgpt",
        version=VERSION,
        description="Spam classification, streaming chat and an OpenAI-compatible API over models built from scratch.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        responses=COMMON_RESPONSES,
    )
    engine = make_engine(settings.resolved_database_url)
    secret = (
        settings.secret_key.get_secret_value().encode()
        if settings.secret_key is not None
        else load_or_create_secret(settings.secret_key_file)
    )
    # What routes reach through app.api.deps, and only there.
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.engine = engine
    app.state.sessions = make_sessionmaker(engine)
    app.state.models = ModelRegistry(settings, metrics)
    app.state.signer = SessionSigner(secret)
    app.state.active = ActiveGenerations()
    app.state.stops = StopWatcher(app.state.sessions, app.state.active, settings.stop_poll_seconds,
                                  settings.stream_lease_seconds)
    app.state.lab = LabRunner(lambda: app.state.models)  # the registry of the moment (a restart replaces it)
    app.state.pages = Pages(settings, app.state.signer)
    app.state.jobs = JobWatcher(settings.home / "jobs", lambda: app.state.models)

    _install_error_handlers(app)
    _install_docs(app)
    install_openapi(app, settings)
    for module in (health, classify, conversations, messages, chat_settings, openai_compat, pages, lab_tokenizers,
                   lab_prompting, chat_models, jobs):
        app.include_router(module.router)
    app.include_router(lab.router)
    app.include_router(lab.pages)  # the Lab's pages (not in the API schema)
    app.mount("/static", StaticFiles(directory=str(settings.static_dir)), name="static")

    # add_middleware wraps what is there, so the last one added is the outermost.
    app.add_middleware(JsonServerErrors)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(AccessLogMiddleware)
    return app
