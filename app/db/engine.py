"""The database engine: SQLite in WAL mode with a busy timeout, or PostgreSQL (psycopg 3).

WAL lets readers run while one writer commits, and the busy timeout makes a
second writer wait instead of failing with "database is locked"; together with
short transactions that is what lets many streams write into one file.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 10_000


def _sqlite_file(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


class DatabaseDriverMissing(RuntimeError):
    """The URL names a database whose Python driver is not installed."""


def normalize_url(url: str) -> str:
    """``postgres://`` and ``postgresql://`` (what hosting services hand out) mean psycopg 3, the driver we
    ship in the ``postgres`` extra; SQLAlchemy's own default for them is psycopg2, which we do not."""
    parsed = make_url(url)
    if parsed.drivername in ("postgres", "postgresql"):
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    return url


def shown_url(url: str) -> str:
    """The URL as it may be printed or logged: the password masked."""
    return make_url(url).render_as_string(hide_password=True)


def make_engine(url: str) -> Engine:
    """Create an engine; for a SQLite file, create its folder and switch it to WAL."""
    url = normalize_url(url)
    path = _sqlite_file(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            pool_pre_ping=False,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
            # NORMAL is durable across application crashes in WAL mode; only a power
            # loss can drop the last commits.
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    try:
        # pre_ping: a replica outlives server restarts and idle-connection timeouts of a proxy.
        return create_engine(url, pool_pre_ping=True)
    except ModuleNotFoundError as exc:
        raise DatabaseDriverMissing(
            f"the database URL {shown_url(url)} needs the Python module {exc.name!r}, which is not installed; "
            "for PostgreSQL install psycopg 3 (pip install 'scratchgpt[postgres]') and use postgresql+psycopg://"
        ) from None


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
