"""The lineage database: models, their files, parent edges, the recipe cache and run records.

Any SQLAlchemy URL works; SQLite under ``MERGER_HOME`` is the default.
"""

from datetime import datetime, timezone

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Integer, String, create_engine, event, inspect
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; every datetime merger writes is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


class Base(DeclarativeBase):
    pass


class ModelRow(Base):
    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(64), primary_key=True, comment="sha256 of the file manifest")
    name: Mapped[str | None] = mapped_column(String(200), index=True)
    kind: Mapped[str] = mapped_column(String(20), default="model", comment="model | adapter")
    location: Mapped[str | None] = mapped_column(String(4096), comment="external directory; NULL = in the store")
    architecture: Mapped[str | None] = mapped_column(String(200))
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    recipe: Mapped[dict | None] = mapped_column(JSON, comment="normalized stage recipe that produced it")
    recipe_digest: Mapped[str | None] = mapped_column(String(64))
    versions: Mapped[dict | None] = mapped_column(JSON)
    origin: Mapped[dict | None] = mapped_column(JSON, comment="where an imported model came from")
    public: Mapped[bool] = mapped_column(Boolean, default=False, comment="visible to every user of the service")

    files: Mapped[list["FileRow"]] = relationship(
        back_populates="model", cascade="all, delete-orphan", order_by="FileRow.path", lazy="selectin"
    )
    parents: Mapped[list["EdgeRow"]] = relationship(
        foreign_keys="EdgeRow.child_id", back_populates="child", cascade="all, delete-orphan", order_by="EdgeRow.position",
        lazy="selectin",
    )


class FileRow(Base):
    __tablename__ = "model_files"

    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    path: Mapped[str] = mapped_column(String(1024), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))

    model: Mapped[ModelRow] = relationship(back_populates="files")


class EdgeRow(Base):
    __tablename__ = "edges"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    child_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    parent_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    relation: Mapped[str] = mapped_column(String(20), comment="merge | adapter | quantized | finetune")
    role: Mapped[str] = mapped_column(String(20), comment="base | donor | adapter")
    weight: Mapped[float | None] = mapped_column(Float)
    position: Mapped[int] = mapped_column(Integer, default=0)
    details: Mapped[dict | None] = mapped_column(JSON)

    child: Mapped[ModelRow] = relationship(foreign_keys=[child_id], back_populates="parents")
    parent: Mapped[ModelRow] = relationship(foreign_keys=[parent_id], lazy="joined", innerjoin=True)


class CacheRow(Base):
    __tablename__ = "recipe_cache"

    key: Mapped[str] = mapped_column(String(64), primary_key=True, comment="sha256 of stage recipe + input ids + versions")
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class FileHashRow(Base):
    __tablename__ = "file_hashes"

    file_key: Mapped[str] = mapped_column(String(300), primary_key=True, comment="host:device:inode")
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))


class RunRow(Base):
    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    stage: Mapped[str] = mapped_column(String(200))
    cache_key: Mapped[str] = mapped_column(String(64), index=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    cache_hit: Mapped[bool] = mapped_column(Boolean)
    seconds: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class EvaluationRow(Base):
    """One metric of one model on one data file; the key makes a re-evaluation with the same inputs free."""

    __tablename__ = "evaluations"

    cache_key: Mapped[str] = mapped_column(String(64), primary_key=True, comment="sha256 of model id, metric, data, settings, runtime, versions")
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    metric: Mapped[str] = mapped_column(String(40), comment="perplexity | task_accuracy | multiple_choice | lm_eval")
    dataset: Mapped[str] = mapped_column(String(1024), comment="the data file as given (a label)")
    dataset_sha256: Mapped[str] = mapped_column(String(64))
    limit: Mapped[int | None] = mapped_column(Integer)
    settings: Mapped[dict] = mapped_column(JSON, comment="everything else that shapes the value: window, dtype")
    runtime: Mapped[str] = mapped_column(String(40), comment="transformers | transformers-gguf | llama.cpp")
    values: Mapped[dict] = mapped_column(JSON)
    tokens_per_second: Mapped[float | None] = mapped_column(Float)
    seconds: Mapped[float] = mapped_column(Float)
    versions: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class UserRow(Base):
    __tablename__ = "users"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class TokenRow(Base):
    __tablename__ = "tokens"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True, comment="tokens are stored hashed")
    user: Mapped[str] = mapped_column(ForeignKey("users.name", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class GrantRow(Base):
    """A user may see a model: a job of theirs produced it (owner), or used it as an input."""

    __tablename__ = "model_grants"

    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    user: Mapped[str] = mapped_column(ForeignKey("users.name", ondelete="CASCADE"), primary_key=True)
    owner: Mapped[bool] = mapped_column(Boolean, default=False, comment="may change the model's visibility")


class JobRow(Base):
    """A submitted recipe. The database, not the broker, is the source of truth for jobs."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(ForeignKey("users.name"), index=True)
    state: Mapped[str] = mapped_column(String(20), index=True, comment="queued | running | succeeded | failed | cancelled")
    recipe: Mapped[dict] = mapped_column(JSON)
    recipe_name: Mapped[str] = mapped_column(String(200))
    force: Mapped[bool] = mapped_column(Boolean, default=False)
    queue: Mapped[str] = mapped_column(String(20), default="cpu")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=utcnow, comment="its last broker message")
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    stage: Mapped[str | None] = mapped_column(String(200))
    done: Mapped[int] = mapped_column(Integer, default=0)
    total: Mapped[int] = mapped_column(Integer, default=0)
    model_id: Mapped[str | None] = mapped_column(ForeignKey("models.id"))
    error_code: Mapped[str | None] = mapped_column(String(40))
    error_message: Mapped[str | None] = mapped_column(String(4000))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), comment="database lease (no Redis)")


def add_unless_exists(s: Session, row: Base) -> bool:
    """Insert ``row`` unless its primary key exists, also when another process inserts it concurrently."""
    if s.get(type(row), inspect(row).identity or _primary_key(row)) is not None:
        return False
    try:
        with s.begin_nested():
            s.add(row)
    except IntegrityError:
        return False
    return True


def _primary_key(row: Base) -> tuple:
    return tuple(getattr(row, c.key) for c in inspect(type(row)).primary_key)


def make_sessionmaker(url: str) -> sessionmaker:
    engine = create_engine(url, future=True)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    from merger import migrations

    migrations.upgrade(engine)
    return sessionmaker(engine, expire_on_commit=False)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


__all__ = ["Base", "ModelRow", "FileRow", "EdgeRow", "CacheRow", "FileHashRow", "RunRow", "EvaluationRow", "UserRow", "TokenRow", "GrantRow", "JobRow",
           "make_sessionmaker", "Engine"]
