import os
from pathlib import Path

import pytest

from merger.settings import Settings
from merger.store import Store
from tests.tiny_models import make_family


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> Path:
    """One model root holding tiny Gemma 3 and Llama families (base, ft1, ft2)."""
    root = tmp_path_factory.mktemp("models")
    for arch in ("gemma3", "llama"):
        make_family(root, arch)
    return root.resolve()


@pytest.fixture
def settings(tmp_path, model_root, monkeypatch) -> Settings:
    monkeypatch.setenv("MERGER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MERGER_MODEL_ROOTS", str(model_root))
    monkeypatch.delenv("MERGER_DATABASE_URL", raising=False)
    return Settings()


@pytest.fixture
def store(settings) -> Store:
    return Store(settings)


# --- the service ---------------------------------------------------------------------------------------------

def _redis_url() -> str:
    """MERGER_TEST_REDIS_URL (DB 11 by default); each pytest-xdist worker takes the next DB index."""
    url = os.environ.get("MERGER_TEST_REDIS_URL", "redis://127.0.0.1:6379/11")
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    base, _, db = url.rpartition("/")
    return f"{base}/{int(db or 0) + int(worker.removeprefix('gw'))}"


REDIS_URL = _redis_url()


@pytest.fixture(scope="session")
def slow_models(model_root) -> Path:
    """A family ("slow-base", "slow-ft1", "slow-ft2") large enough that a TIES merge takes seconds."""
    from tests.tiny_models import SLOW_SIZES

    make_family(model_root, "llama", prefix="slow", **SLOW_SIZES)
    return model_root


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """The real Redis at MERGER_TEST_REDIS_URL (its own DB index, flushed), or a private redis-server."""
    from tests.service_harness import redis_answers, start_private_redis

    proc = None
    url = REDIS_URL
    if not redis_answers(url):
        url, proc = start_private_redis(tmp_path_factory.mktemp("redis"))
    yield url
    if proc:
        proc.terminate()
        proc.wait()


@pytest.fixture(params=["redis", "embedded"])
def service(request, tmp_path, model_root, slow_models):
    """The API and its workers as real processes: on Redis, or on the embedded SQLite broker."""
    import redis

    from tests.service_harness import Service

    env = {**os.environ, "MERGER_HOME": str(tmp_path / "home"), "MERGER_MODEL_ROOTS": str(model_root),
           "MERGER_LEASE_SECONDS": "3", "MERGER_REAPER_INTERVAL": "1"}
    env.pop("MERGER_DATABASE_URL", None)
    env.pop("MERGER_BROKER_URL", None)
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        redis.Redis.from_url(url).flushdb()
        env["MERGER_BROKER_URL"] = url
    logs = tmp_path / "logs"
    logs.mkdir()
    svc = Service(env, logs)
    svc.mode = request.param
    yield svc
    svc.stop()
    if request.param == "redis":
        redis.Redis.from_url(env["MERGER_BROKER_URL"]).flushdb()
