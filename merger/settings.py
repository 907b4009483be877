"""Settings, read from the environment with the prefix ``MERGER_``."""

import os
from pathlib import Path
from typing import Annotated

from platformdirs import user_cache_dir, user_data_dir
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _default_home() -> Path:
    return Path(user_data_dir("merger", appauthor=False))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MERGER_", extra="ignore")

    home: Path = Field(default_factory=_default_home, description="Store root: models, staging, SQLite database")
    model_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Directories a recipe may read local models and adapters from (os.pathsep-separated in the env)",
    )
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default: SQLite under home")
    search_database_url: str | None = Field(
        default=None, description="SQLAlchemy URL of the black-box searches' Optuna studies; default: SQLite search.db under home")
    max_recipe_bytes: int = Field(default=256 * 1024, description="Largest recipe file accepted")
    hf_cache_dir: Path | None = Field(default=None, description="Hugging Face cache for org/name@rev references")
    device: str = Field(default="cpu", pattern=r"^(cpu|cuda(:\d+)?)$",
                        description="Where merges and evaluations compute: cpu, or cuda[:N] (used when available, else cpu)")
    tools_dir: Path = Field(default_factory=lambda: Path(user_cache_dir("merger", appauthor=False)) / "tools",
                            description="Where `merger setup-gguf` puts llama.cpp's GGUF converter")

    # the service (merger serve / merger worker)
    broker_url: str | None = Field(default=None, description="Celery broker, e.g. redis://host:6379/0; default: SQLite under home")
    single_user: bool = Field(default=False, description="Serve without tokens: every request acts as user 'local'")
    lease_seconds: float = Field(default=30.0, description="A running job's lease; renewed every third of it")
    reaper_interval: float = Field(default=10.0, description="How often the API re-enqueues jobs whose lease lapsed")
    queued_timeout: float = Field(default=600.0, description="A job queued this long is enqueued again (its message may be lost)")
    visibility_timeout: int = Field(default=6 * 3600, description="Redis redelivery timeout; longer than the longest job")
    max_body_bytes: int = Field(default=1024 * 1024, description="Largest request body the API reads (413 beyond)")

    # the CLI as a client of a server (merger submit / status / pull)
    server: str = Field(default="http://127.0.0.1:8000", description="The merger API the client commands talk to")
    token: str | None = Field(default=None, description="API token for the client commands")

    @field_validator("model_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            return [p for p in value.split(os.pathsep) if p]
        return value

    def model_post_init(self, __context: object) -> None:
        self.home = self.home.expanduser().resolve()
        self.tools_dir = self.tools_dir.expanduser().resolve()
        self.model_roots = [Path(r).expanduser().resolve() for r in self.model_roots]

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'merger.db'}"

    @property
    def resolved_search_database_url(self) -> str:
        """Optuna keeps its own tables and its own Alembic version table, so its studies live apart from lineage."""
        return self.search_database_url or f"sqlite:///{self.home / 'search.db'}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{self.home / 'broker.db'}"

    @property
    def uses_redis(self) -> bool:
        return self.resolved_broker_url.startswith(("redis://", "rediss://"))

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def staging_dir(self) -> Path:
        return self.home / "staging"
