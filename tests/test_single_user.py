"""Single-user mode: the local user sees and owns every model in the store, also those made by `merger run`."""

import json
import os
import subprocess
from pathlib import Path

import yaml

from tests.service_harness import BIN, Service


def run_locally(env: dict[str, str], path, weight: float) -> str:
    """`merger run` a linear merge of the tiny Gemma fine-tunes; its model id."""
    path.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": "gemma3-ft1", "parameters": {"weight": weight}},
        {"model": "gemma3-ft2", "parameters": {"weight": 1 - weight}}]}))
    out = subprocess.run([str(BIN / "merger"), "run", str(path), "--json"], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["id"]


def server_env(home: Path, model_root: Path, **extra: str) -> dict[str, str]:
    """A server's environment on its own store, jobs in SQLite; ``extra``: more settings."""
    env = {**os.environ, "MERGER_HOME": str(home), "MERGER_MODEL_ROOTS": str(model_root), **extra}
    for name in ("MERGER_DATABASE_URL", "MERGER_BROKER_URL", "MERGER_SINGLE_USER"):
        if name not in extra:
            env.pop(name, None)
    return env


def test_single_user_sees_and_owns_models_made_by_merger_run(tmp_path, model_root):
    env = server_env(tmp_path / "home", model_root, MERGER_SINGLE_USER="true")
    before = run_locally(env, tmp_path / "before.yaml", 0.3)
    (tmp_path / "logs").mkdir()
    service = Service(env, tmp_path / "logs")
    try:
        client = service.client(None)
        assert before in {m["id"] for m in client.get("/v1/models").json()}
        assert client.get(f"/v1/models/{before}").status_code == 200
        assert client.get("/api/models/local/before").json()["sha"] == before[:40]
        assert client.post(f"/v1/models/{before}/visibility", json={"public": True}).json()["public"] is True

        after = run_locally(env, tmp_path / "after.yaml", 0.6)  # made while the server runs
        assert {before, after} <= {m["id"] for m in client.get("/v1/models").json()}
        assert client.get("/local/after/resolve/main/config.json").status_code == 200
    finally:
        service.stop()
