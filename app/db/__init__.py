"""Database: engine, tables, data functions and migrations."""

from app.db.engine import make_engine, make_sessionmaker
from app.db.migrate import MigrationError, upgrade

__all__ = ["make_engine", "make_sessionmaker", "upgrade", "MigrationError"]
