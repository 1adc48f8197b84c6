"""Alembic, configured in code so migrations run from the app and from ``scratchgpt db upgrade``.

No ``alembic.ini`` is needed: the script location and the URL are set here. The
repository's ``alembic.ini`` exists only so developers can run ``alembic revision``.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext

from app.db.engine import make_engine, normalize_url
from app.settings import asset_dir

DEFAULT_MIGRATIONS_DIR = asset_dir("migrations")
MIGRATION_LOCK = 0x5C7A7C9  # an arbitrary key of PostgreSQL's advisory locks, ours alone


class MigrationError(RuntimeError):
    """The migration scripts are missing or a migration failed."""


def alembic_config(database_url: str, migrations_dir: Path | None = None) -> Config:
    script_location = Path(migrations_dir or DEFAULT_MIGRATIONS_DIR)
    if not (script_location / "env.py").is_file():
        raise MigrationError(
            f"Alembic scripts not found at {script_location}; run from a source checkout "
            "or set SCRATCHGPT_MIGRATIONS_DIR to the project's migrations/ folder"
        )
    config = Config()
    config.set_main_option("script_location", str(script_location))
    # configparser interpolation treats % specially (URL-encoded passwords).
    config.set_main_option("sqlalchemy.url", normalize_url(database_url).replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head", migrations_dir: Path | None = None) -> None:
    """Bring the database at ``database_url`` to ``revision`` (creating a SQLite file if needed)."""
    config = alembic_config(database_url, migrations_dir)
    engine = make_engine(database_url)  # creates the SQLite folder and sets WAL
    try:
        with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                # Replicas starting together would each run the migrations: the first takes this lock,
                # the others wait for its commit (PostgreSQL's DDL is transactional) and find nothing to do.
                connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    finally:
        engine.dispose()


def current_revision(database_url: str) -> str | None:
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
