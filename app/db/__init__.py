"""Database: engine, tables, data functions and migrations.

It imports SQLAlchemy, Alembic and ``app.settings`` (for where the migrations are); nothing
else of the app, so services and routes build on it and never the other way round.
"""

from app.db.engine import make_engine, make_sessionmaker
from app.db.migrate import MigrationError, upgrade

__all__ = ["make_engine", "make_sessionmaker", "upgrade", "MigrationError"]
