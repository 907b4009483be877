"""Schema migrations (Alembic) of the lineage database; ``upgrade`` brings any database to the newest schema.

A new database is created at the head revision; a database made before migrations existed (tables but no
``alembic_version``) is stamped as the baseline, revision 0001, then upgraded. How to add a revision:
README.md in this package.
"""

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, inspect, text

if TYPE_CHECKING:  # Alembic is imported only when a database is not at the newest revision already
    from alembic.config import Config

BASELINE = "0001"
_LOCK = 0x6D657267  # PostgreSQL advisory lock: one process migrates at a time ("merg")


def config(connection: Connection | None = None) -> "Config":
    """Alembic's configuration for this package, without an alembic.ini on disk."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent))
    cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(config()).get_current_head()


def current(connection: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine) -> None:
    """Bring the database to the head revision (a no-op when it is there)."""
    if _stored_revision(engine) == _newest_file_revision():
        return  # the common case, answered without Alembic
    from alembic import command

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


def _newest_file_revision() -> str:
    """The newest revision as the file names number them (``versions/NNNN_what.py``, revision "NNNN")."""
    return max(p.name.split("_", 1)[0] for p in (Path(__file__).parent / "versions").glob("[0-9][0-9][0-9][0-9]_*.py"))


def _stored_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return None
        return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
