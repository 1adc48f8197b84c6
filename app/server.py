"""Running the service with uvicorn: ``serve(settings, host, port, workers)`` (what ``scratchgpt serve`` calls)."""

from __future__ import annotations

import json
import logging
import os

import uvicorn
from fastapi import FastAPI

from app.logs import configure_logging
from app.main import create_app
from app.settings import Settings

# Settings built by the CLI reach worker processes through this variable.
SETTINGS_ENV = "SCRATCHGPT__SERVE_SETTINGS"
# sysexits.h EX_NOPERM. Not uvicorn's 3 for any failed startup: a supervisor can be told not to
# restart on this one (systemd RestartPreventExitStatus=77), since a restart cannot fix it.
EXIT_DATABASE_READ_ONLY = 77

logger = logging.getLogger("scratchgpt.app")


def app_from_environment() -> FastAPI:
    """Factory for uvicorn worker processes (``--workers > 1``): settings from the parent, else from env."""
    raw = os.environ.get(SETTINGS_ENV)
    settings = Settings.model_validate(json.loads(raw)) if raw else Settings()
    configure_logging(settings.log_level, settings.log_json)
    return create_app(settings)


def _settings_json(settings: Settings) -> str:
    data = settings.model_dump(mode="json")
    data["api_keys"] = {user: key.get_secret_value() for user, key in settings.api_keys.items()}
    data["secret_key"] = settings.secret_key.get_secret_value() if settings.secret_key else None
    return json.dumps(data)


def _prepare_database(settings: Settings) -> None:
    """The startup's database work, done once before uvicorn starts, so a database this process
    cannot write stops it with one line and ``EXIT_DATABASE_READ_ONLY`` instead of a traceback."""
    from app.db import make_engine, make_sessionmaker
    from app.main import DatabaseReadOnly, prepare_database

    engine = make_engine(settings.resolved_database_url)
    try:
        prepare_database(settings, make_sessionmaker(engine))
    except DatabaseReadOnly as exc:
        logger.error(f"cannot start: {exc}")
        raise SystemExit(EXIT_DATABASE_READ_ONLY) from None
    finally:
        engine.dispose()


def serve(settings: Settings | None = None, host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    """Serve until interrupted. Each worker process loads its own copy of the models."""
    settings = settings or Settings()
    configure_logging(settings.log_level, settings.log_json)
    _prepare_database(settings)
    common = dict(host=host, port=port, log_config=None, proxy_headers=True, timeout_graceful_shutdown=10)
    if workers <= 1:
        uvicorn.run(create_app(settings), **common)
        return
    # Worker processes must build their own app, so pass an import string and the settings by env.
    # They share the database as replicas do: a worker's restart must not end its siblings' answers.
    settings = settings.model_copy(update={"shared_database": True})
    os.environ[SETTINGS_ENV] = _settings_json(settings)
    uvicorn.run("app.server:app_from_environment", factory=True, workers=workers, **common)


# The name scratchgpt/serve.py calls.
run = serve
