"""Alembic environment for scratchgpt's database.

Configured from ``app.db.migrate.alembic_config`` (URL and script location set in
code) or from the repository's ``alembic.ini``; ``render_as_batch`` makes ALTERs
work on SQLite by copying the table.
"""

from __future__ import annotations

from alembic import context

from app.db.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from app.settings import Settings

    return Settings().resolved_database_url


def run_migrations_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _migrate(connection) -> None:
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        # A batch ALTER copies the table and drops the old one; with foreign keys on, that drop
        # cascades into the tables pointing at it (a conversation's rebuild would delete its
        # messages). SQLite's own procedure for altering tables: keys off, alter, check, keys on.
        # The PRAGMA is ignored inside a transaction, so it goes before the migration's.
        ours = not connection.in_transaction()
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        if ours:  # the PRAGMA began SQLAlchemy's transaction: end it, or the migration's would nest in it
            connection.commit()
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
        if sqlite:
            broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise RuntimeError(f"the migration left rows pointing at nothing: {broken[:5]}")
    if sqlite:
        connection.exec_driver_sql("PRAGMA foreign_keys=ON")
        if ours:
            connection.commit()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")  # app.db.migrate.upgrade passes its own
    if connection is not None:
        _migrate(connection)
        return
    from app.db.engine import make_engine

    engine = make_engine(_url())
    with engine.connect() as connection:
        _migrate(connection)
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
