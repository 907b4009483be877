"""The `merger` command never shows a traceback: a user's mistake or a dead server is a short message naming
the file, field or server. Each case runs the real console script."""

import os
import subprocess

import pytest
import yaml

from tests.service_harness import BIN, Service, free_port
from tests.test_service import linear


def merger(*args: str, env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run([str(BIN / "merger"), *map(str, args)], env=env, capture_output=True, text=True, timeout=300)
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    return done


@pytest.fixture
def env(tmp_path, model_root) -> dict:
    env = {**os.environ, "MERGER_HOME": str(tmp_path / "home"), "MERGER_MODEL_ROOTS": f"{model_root}{os.pathsep}{tmp_path}"}
    for name in ("MERGER_DATABASE_URL", "MERGER_BROKER_URL", "MERGER_SERVER", "MERGER_TOKEN"):
        env.pop(name, None)
    return env


def test_recipe_files_that_cannot_be_read(tmp_path, env):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(linear(0.5).encode() + b"# caf\xe9\n")
    missing = tmp_path / "missing.yaml"
    for command in ("validate", "submit"):  # `run` reads recipes as `validate` does
        done = merger(command, latin1, env=env)
        assert done.returncode == 2 and f"{latin1}: not UTF-8 text (byte " in done.stderr, done.stderr
        done = merger(command, missing, env=env)
        assert done.returncode == 1 and f"{missing}: cannot read recipe: No such file or directory" in done.stderr, done.stderr


def test_a_dead_server(tmp_path, env):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(linear(0.5))
    dead = f"http://127.0.0.1:{free_port()}"
    for args in (("submit", recipe), ("status", "0" * 32), ("pull", "abcdef12", tmp_path / "out")):
        done = merger(*args, "--server", dead, "--token", "mrg_x", env=env)
        assert done.returncode == 1 and f"cannot reach the server at {dead}" in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


def test_an_unexpected_error_is_its_type_and_message(env):
    done = merger("models", env=env | {"MERGER_DATABASE_URL": "nosuchdb://host/db"})
    assert done.returncode == 1 and done.stderr.startswith("error: NoSuchModuleError: Can't load plugin: sqlalchemy.dialects:nosuchdb")


def test_other_mistakes_are_one_line(tmp_path, env):
    assert merger("show", "nonexistent", env=env).stderr.strip() == "error: no model 'nonexistent' in the store (see `merger models`)"
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(linear(0.5))
    model_id = merger("run", recipe, env=env).stdout.strip()
    done = merger("export", model_id, a_file / "inside", env=env)
    assert done.returncode == 1 and str(a_file) in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    done = merger("token", "revoke", "nothex", env=env)
    assert done.returncode == 1 and "'nothex' is not a token id" in done.stderr


def test_token_list_and_revoke_against_a_live_server(tmp_path, env):
    logs = tmp_path / "logs"
    logs.mkdir()
    service = Service(env, logs)
    try:
        kept, revoked = service.token("alice"), service.token("alice")
        service.token("bob")
        listed = yaml.safe_load(merger("token", "list", "--json", env=env).stdout)
        assert sorted(t["user"] for t in listed) == ["alice", "alice", "bob"]
        assert all(len(t["id"]) == 12 for t in listed)
        table = merger("token", "list", env=env).stdout
        assert kept not in table and revoked not in table and "bob" in table

        import hashlib

        revoked_id = hashlib.sha256(revoked.encode()).hexdigest()[:12]
        assert service.client(revoked).get("/v1/jobs").status_code == 200
        done = merger("token", "revoke", revoked_id, env=env)
        assert done.returncode == 0 and f"revoked token {revoked_id} of alice" in done.stderr
        assert service.client(revoked).get("/v1/jobs").status_code == 401
        assert service.client(kept).get("/v1/jobs").status_code == 200
        assert [t["user"] for t in yaml.safe_load(merger("token", "list", "--user", "alice", "--json", env=env).stdout)] == ["alice"]
        assert merger("token", "revoke", revoked_id, env=env).stderr.strip() == f"error: no token {revoked_id}"
    finally:
        service.stop()
