"""Schema migrations: a database made by the release before migrations upgrades with its rows intact, and
the models in merger/db.py are exactly what the revisions build (a schema change without a revision fails)."""

import hashlib
from datetime import datetime, timezone
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import MetaData, create_engine, insert, inspect

from merger import migrations
from merger.db import Base, JobRow
from merger.service.auth import user_for_token
from merger.store import Store
from tests.test_store_and_cache import postgres_url  # noqa: F401 - a fixture

DATA = Path(__file__).parent / "data"
CREATED = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)
TOKEN = "mrg_previous-release-token"
MODEL = "ab" * 32
ROWS = {  # one row in each table that lineage and jobs need, as the previous release wrote them
    "models": dict(id=MODEL, name="old-merge", kind="model", size_bytes=10, created_at=CREATED, public=False,
                   recipe={"merge_method": "linear"}),
    "model_files": dict(model_id=MODEL, path="model.safetensors", size=10, sha256="cd" * 32),
    "users": dict(name="alice", created_at=CREATED),
    "tokens": dict(sha256=hashlib.sha256(TOKEN.encode()).hexdigest(), user="alice", created_at=CREATED),
    "model_grants": dict(model_id=MODEL, user="alice", owner=True),
    "jobs": dict(id="0" * 32, owner="alice", state="queued", recipe={"merge_method": "linear"}, recipe_name="old", force=False,
                 queue="cpu", created_at=CREATED, done=0, total=0, cancel_requested=False, attempts=0),
}


def previous_release(url: str, dialect: str) -> None:
    """The previous release's schema (its DDL, captured in tests/data) with ROWS in it."""
    engine = create_engine(url)
    with engine.begin() as connection:
        for statement in (DATA / f"schema-0.1.0.{dialect}.sql").read_text().split(";\n"):
            if statement.strip():
                connection.exec_driver_sql(statement)
        tables = MetaData()
        tables.reflect(connection)
        for name, row in ROWS.items():
            connection.execute(insert(tables.tables[name]).values(row))
    engine.dispose()


def check_upgraded(url: str, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MERGER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MERGER_DATABASE_URL", url)
    from merger.settings import Settings

    store = Store(Settings())
    engine = store.session.kw["bind"]
    with engine.connect() as connection:
        assert migrations.current(connection) == migrations.head()
    model = store.get(MODEL)
    assert model.name == "old-merge" and [f.path for f in model.files] == ["model.safetensors"]
    with store.session() as s:
        assert user_for_token(s, TOKEN) == "alice"
    with store.session() as s:
        job = s.get(JobRow, "0" * 32)
    assert job.state == "queued" and job.enqueued_at is not None  # filled by revision 0002
    engine.dispose()


def test_a_sqlite_database_of_the_previous_release_upgrades(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    previous_release(url, "sqlite")
    check_upgraded(url, tmp_path, monkeypatch)


def test_a_postgresql_database_of_the_previous_release_upgrades(tmp_path, monkeypatch, postgres_url):  # noqa: F811
    previous_release(postgres_url, "postgresql")
    check_upgraded(postgres_url, tmp_path, monkeypatch)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_the_models_are_what_the_revisions_build(database, tmp_path, request):
    """Every revision from an empty database, then autogenerate's comparison with merger/db.py finds nothing."""
    url = f"sqlite:///{tmp_path / 'empty.db'}" if database == "sqlite" else request.getfixturevalue("postgres_url")
    engine = create_engine(url)
    with engine.begin() as connection:
        command.upgrade(migrations.config(connection), "head")
        assert inspect(connection).has_table("models")
        differences = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), Base.metadata)
    engine.dispose()
    assert differences == [], "merger/db.py differs from the migrations: add a revision (merger/migrations/README.md)"
