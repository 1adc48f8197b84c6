"""The app factory: ``create_app(settings)`` builds a FastAPI app with its own database, models and metrics.

The lifespan applies the migrations, marks answers a previous process left "streaming" as
"interrupted", and starts loading the models in a background thread, so the server answers
/health at once and /ready once the models have settled.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
from contextlib import asynccontextmanager
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.routes import classify, conversations, health, lab, messages, openai_compat, pages
from app.api.routes import lab_prompting, lab_tokenizers
from app.api.routes.openai_compat import OpenAIError
from app.db import crud, make_engine, make_sessionmaker, upgrade
from app.logs import AccessLogMiddleware
from app.metrics import Metrics, MetricsMiddleware
from app.openapi import install_openapi
from app.registry import ModelRegistry, ModelUnavailable
from app.schemas import COMMON_RESPONSES
from app.security import BodySizeLimitMiddleware, SecurityHeadersMiddleware, SessionSigner, load_or_create_secret
from app.settings import Settings
from app.streaming import ActiveGenerations
from app.workers import WorkerStopped

logger = logging.getLogger("scratchgpt.app")

VERSION = "0.1.0"
SWAGGER_CDN = "https://cdn.jsdelivr.net"


def _asset_version(settings: Settings) -> str:
    """A short hash of the static files, appended to their URLs so browsers fetch new versions."""
    digest = hashlib.sha256()
    for path in sorted(settings.static_dir.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def _startup_database(app: FastAPI) -> None:
    settings: Settings = app.state.settings
    upgrade(settings.resolved_database_url, migrations_dir=settings.migrations_dir)
    with app.state.sessions() as session:
        leftovers = crud.interrupt_streaming_messages(session)
    if leftovers:
        logger.warning("answers left streaming by a previous run marked interrupted", extra={"count": leftovers})


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    await run_in_threadpool(_startup_database, app)
    if app.state.models.stopped:  # the same app started again (tests, embedding servers)
        app.state.models = ModelRegistry(app.state.settings, app.state.metrics)
    app.state.models.start_loading()
    logger.info("service started", extra={"database": app.state.engine.url.render_as_string(hide_password=True)})
    try:
        yield
    finally:
        app.state.active.cancel_all()
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
        headers = {"Retry-After": "5"} if exc.state == "loading" else None
        if _is_openai_path(request):
            return OpenAIError(503, exc.detail, type_="server_error", code=f"model_{exc.state}").response()
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


def _install_docs(app: FastAPI) -> None:
    """Swagger UI at /docs with a CSP that allows its CDN and exactly its one inline script (by hash)."""

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        page = get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} API")
        html = page.body.decode()
        hashes = " ".join(
            "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"
            for script in re.findall(r"<script>(.*?)</script>", html, flags=re.S)
        )
        csp = (
            f"default-src 'self'; script-src 'self' {SWAGGER_CDN} {hashes}; style-src 'self' {SWAGGER_CDN}; "
            "img-src 'self' data: https://fastapi.tiangolo.com; connect-src 'self'; object-src 'none'; "
            "base-uri 'none'; frame-ancestors 'none'"
        )
        return HTMLResponse(html, headers={"Content-Security-Policy": csp})


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
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.engine = engine
    app.state.sessions = make_sessionmaker(engine)
    app.state.models = ModelRegistry(settings, metrics)
    app.state.signer = SessionSigner(secret)
    app.state.active = ActiveGenerations()
    app.state.templates = Jinja2Templates(directory=str(settings.templates_dir))
    app.state.asset_version = _asset_version(settings)

    _install_error_handlers(app)
    _install_docs(app)
    install_openapi(app, settings)
    for module in (health, classify, conversations, messages, openai_compat, pages, lab_tokenizers, lab_prompting):
        app.include_router(module.router)
    app.include_router(lab.router)
    app.include_router(lab.pages)  # the Lab's pages (not in the API schema)
    app.mount("/static", StaticFiles(directory=str(settings.static_dir)), name="static")

    # add_middleware wraps what is there, so the last one added is the outermost.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(AccessLogMiddleware)
    return app
