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
