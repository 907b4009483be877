"""Schema migrations (Alembic) of the lineage database; ``upgrade`` brings any database to the newest schema.

A new database is created at the head revision; a database made before migrations existed (tables but no
``alembic_version``) is stamped as the baseline, revision 0001, then upgraded. How to add a revision:
README.md in this package.
"""

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text

BASELINE = "0001"
_LOCK = 0x6D657267  # PostgreSQL advisory lock: one process migrates at a time ("merg")


def config(connection: Connection | None = None) -> Config:
    """Alembic's configuration for this package, without an alembic.ini on disk."""
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent))
    cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    return ScriptDirectory.from_config(config()).get_current_head()


def current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine) -> None:
    """Bring the database to the head revision (a no-op when it is there)."""
    target = head()
    with engine.connect() as connection:
        if current(connection) == target:
            return
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK})
        revision = current(connection)
        if revision == target:
            return
        cfg = config(connection)
        if revision is None and inspect(connection).has_table("models"):
            command.stamp(cfg, BASELINE)  # made by the release before migrations
        elif revision is None:
            from merger.db import Base

            Base.metadata.create_all(connection)  # a new database: the models are the head schema
            command.stamp(cfg, target)
            return
        command.upgrade(cfg, target)
