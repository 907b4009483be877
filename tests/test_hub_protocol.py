"""The Hugging Face Hub protocol subset: the real huggingface_hub client, its `hf` CLI and transformers, each in a
fresh process with HF_ENDPOINT pointing at a live `merger serve`, download stored models."""

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from merger.hashing import sha256_file
from merger.orchestrator import check_recipe, run_recipe
from merger.access import grant
from merger.service.auth import create_token
from merger.settings import Settings
from merger.store import Store
from tests.service_harness import BIN, Service
from tests.tiny_models import make_family

# huggingface_hub writes a download in 10 MiB chunks, so only a file larger than that can be resumed part-way
CHUNK = 10 * 1024 * 1024
# a Llama whose weights are about 17 MB
LARGER = dict(vocab_size=8192, hidden_size=384, intermediate_size=768, num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=2)


def linear(weight: float, family: str) -> dict:
    return {"merge_method": "linear", "models": [{"model": f"{family}-ft1", "parameters": {"weight": weight}},
                                                 {"model": f"{family}-ft2", "parameters": {"weight": 1 - weight}}]}


@pytest.fixture(scope="module")
def hub(tmp_path_factory, model_root):
    """A live API over alice's `tiny-merge` (an older private revision and a newer public one, `main`) and her
    private, larger `secret`. The models are built in-process (by nobody) and granted to alice as their owner;
    her submitting the same recipes is answered from the cache at once (which grants reading, never owning)."""
    tmp = tmp_path_factory.mktemp("hub")
    make_family(model_root, "llama", prefix="hub-llama", **LARGER)
    settings = Settings(home=tmp / "home", model_roots=[model_root], database_url=None)
    store = Store(settings)
    recipes = {"old": ("tiny-merge", linear(0.3, "gemma3")), "main": ("tiny-merge", linear(0.6, "gemma3")),
               "secret": ("secret", linear(0.5, "hub-llama"))}
    models = {key: run_recipe(check_recipe(recipe, settings, store, default_name=name), settings, store)[-1].model
              for key, (name, recipe) in recipes.items()}
    with store.session.begin() as s:
        tokens = {user: create_token(s, user) for user in ("alice", "bob")}
        grant(s, [m.id for m in models.values()], "alice", owner=True)

    env = {**os.environ, "MERGER_HOME": str(settings.home), "MERGER_MODEL_ROOTS": str(model_root)}
    env.pop("MERGER_DATABASE_URL", None)
    env.pop("MERGER_BROKER_URL", None)
    (tmp / "logs").mkdir()
    service = Service(env, tmp / "logs")
    try:
        alice = service.client(tokens["alice"])
        for name, recipe in recipes.values():
            job = alice.post("/v1/jobs", json={"recipe": recipe, "name": name})
            assert job.status_code == 200 and job.json()["state"] == "succeeded", job.text
        assert alice.post(f"/v1/models/{models['main'].id}/visibility", json={"public": True}).status_code == 200
        yield SimpleNamespace(url=service.url, store=store, models=models, tokens=tokens, tmp=tmp)
    finally:
        service.stop()


PRELUDE = """
import json, sys
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError

def raised(call):
    try:
        call()
    except Exception as exc:
        response = getattr(exc, "response", None)
        return [type(exc).__name__, getattr(response, "status_code", None)]

def out(value):
    print(json.dumps(value))
"""


def client_env(hub, hf_home: Path, token: str | None = None, endpoint: str | None = None) -> dict[str, str]:
    """Only what a user of the Hub client would set: no MERGER_* and no HF_HUB_OFFLINE=1 (merger sets that)."""
    env = {"PATH": os.environ["PATH"], "HOME": str(hub.tmp), "HF_HOME": str(hf_home), "HF_ENDPOINT": endpoint or hub.url,
           "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    return env | ({"HF_TOKEN": token} if token else {})


def run_client(hub, hf_home: Path, code: str, token: str | None = None, endpoint: str | None = None):
    """Run ``code`` (after PRELUDE) in a fresh Python; it prints one JSON value last."""
    done = subprocess.run([sys.executable, "-c", PRELUDE + code], env=client_env(hub, hf_home, token, endpoint),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def stored_sha256(model) -> dict[str, str]:
    return {f.path: f.sha256 for f in model.files}


def tree_sha256(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): sha256_file(p) for p in directory.rglob("*")
            if p.is_file() and ".cache" not in p.parts}


def test_snapshot_download_without_a_token_is_the_newest_public_model(hub, tmp_path):
    main = hub.models["main"]
    got = run_client(hub, tmp_path, """
info = HfApi().model_info("alice/tiny-merge")
out({"sha": info.sha, "private": info.private, "files": sorted(s.rfilename for s in info.siblings),
     "path": snapshot_download("alice/tiny-merge")})
""")
    assert got["sha"] == main.id[:40] and got["private"] is False
    assert got["files"] == sorted(stored_sha256(main))
    assert Path(got["path"]).name == main.id[:40]
    assert tree_sha256(Path(got["path"])) == stored_sha256(main)


def test_a_revision_by_commit_or_full_id(hub, tmp_path):
    old, main = hub.models["old"], hub.models["main"]
    assert old.id != main.id
    got = run_client(hub, tmp_path, f"""
out({{"by_commit": snapshot_download("alice/tiny-merge", revision="{old.id[:40]}"),
     "by_id": hf_hub_download("alice/tiny-merge", "model.safetensors", revision="{old.id}"),
     "info_sha": HfApi().model_info("alice/tiny-merge", revision="{old.id}").sha,
     "unknown": raised(lambda: hf_hub_download("alice/tiny-merge", "config.json", revision="{'0' * 40}")),
     "branch": raised(lambda: hf_hub_download("alice/tiny-merge", "config.json", revision="v1"))}})
""", token=hub.tokens["alice"])
    assert tree_sha256(Path(got["by_commit"])) == stored_sha256(old)
    assert sha256_file(Path(got["by_id"])) == stored_sha256(old)["model.safetensors"]
    assert got["info_sha"] == old.id[:40]
    assert got["unknown"] == got["branch"] == ["RevisionNotFoundError", 404]
    # the older revision is private: without a token only the public one exists
    anonymous = run_client(hub, tmp_path / "anonymous", f"""
out(raised(lambda: snapshot_download("alice/tiny-merge", revision="{old.id[:40]}")))
""")
    assert anonymous == ["RevisionNotFoundError", 404]


def test_missing_files_and_repositories(hub, tmp_path):
    got = run_client(hub, tmp_path, """
out({"file": raised(lambda: hf_hub_download("alice/tiny-merge", "nope.json")),
     "repo": raised(lambda: hf_hub_download("alice/nothing", "config.json")),
     "not_the_owner": raised(lambda: hf_hub_download("bob/tiny-merge", "config.json")),
     "folder": raised(lambda: list(HfApi().list_repo_tree("alice/tiny-merge", path_in_repo="sub")))})
""", token=hub.tokens["alice"])
    assert got["file"] == ["RemoteEntryNotFoundError", 404] and got["folder"] == ["RemoteEntryNotFoundError", 404]
    assert got["repo"] == got["not_the_owner"] == ["RepositoryNotFoundError", 404]
    # the 404 named the commit, so the client remembers that the file does not exist in it
    assert (tmp_path / "hub/models--alice--tiny-merge/.no_exist" / hub.models["main"].id[:40] / "nope.json").exists()


@pytest.mark.parametrize("who, error", [(None, ["RepositoryNotFoundError", 401]), ("bob", ["RepositoryNotFoundError", 404]),
                                        ("stranger", ["HfHubHTTPError", 401]), ("alice", None)])
def test_a_private_model_is_its_owners_only(hub, tmp_path, who, error):
    token = {"stranger": "mrg_unknown"}.get(who) or hub.tokens.get(who)
    got = run_client(hub, tmp_path, """
path = []
out({"error": raised(lambda: path.append(hf_hub_download("alice/secret", "model.safetensors"))), "path": path})
""", token=token)
    assert got["error"] == error
    if error is None:
        assert sha256_file(Path(got["path"][0])) == stored_sha256(hub.models["secret"])["model.safetensors"]


def test_from_pretrained_loads_the_stored_weights(hub, tmp_path):
    main = hub.models["main"]
    weights = hub.store.path_of(main) / "model.safetensors"
    got = run_client(hub, tmp_path, f"""
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("alice/tiny-merge")
loaded = model.state_dict()
stored = load_file("{weights}")
out({{"class": type(model).__name__, "stored": len(stored),
     "equal": sorted(k for k, v in stored.items() if k in loaded and torch.equal(loaded[k].to(v.dtype), v)),
     "tokens": AutoTokenizer.from_pretrained("alice/tiny-merge")("w5 w6")["input_ids"]}})
""")
    assert got["class"] == "Gemma3ForCausalLM"
    assert got["stored"] > 20 and len(got["equal"]) == got["stored"]
    assert got["tokens"][-2:] == [5, 6]
    # transformers asked for an adapter config first; the 404 carried the commit, so the client cached its absence
    assert (tmp_path / "hub/models--alice--tiny-merge/.no_exist" / main.id[:40] / "adapter_config.json").exists()


def test_hf_download_cli(hub, tmp_path):
    def hf_download(*args: str, token: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "hf"), "download", *args], env=client_env(hub, tmp_path / "hf", token),
                              capture_output=True, text=True, timeout=120)

    done = hf_download("alice/secret", "--local-dir", str(tmp_path / "secret"), token=hub.tokens["alice"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert tree_sha256(tmp_path / "secret") == stored_sha256(hub.models["secret"])
    refused = hf_download("alice/secret", "--local-dir", str(tmp_path / "refused"))
    assert refused.returncode != 0 and "not found" in refused.stdout + refused.stderr
    assert not any((tmp_path / "refused").glob("*"))


class CuttingProxy(ThreadingHTTPServer):
    """Forwards requests to the API, logging each; drops the connection after ``cut_at`` bytes of the first GET of
    ``cut``."""

    def __init__(self, upstream: str, cut: str, cut_at: int):
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream, self.cut, self.cut_at, self.has_cut, self.log = upstream, cut, cut_at, False, []
        self.url = f"http://127.0.0.1:{self.server_port}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_HEAD(self):
        self._forward()

    def do_GET(self):
        self._forward()

    def _forward(self):
        proxy = self.server
        headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
        response = httpx.request(self.command, proxy.upstream + self.path, headers=headers, timeout=30)
        cut = self.command == "GET" and self.path.endswith(proxy.cut) and not proxy.has_cut
        proxy.has_cut |= cut
        proxy.log.append((self.command, self.path.rsplit("/", 1)[-1], self.headers.get("range"), response.status_code))
        self.send_response(response.status_code)
        for key, value in response.headers.items():
            if key.lower() not in ("connection", "transfer-encoding", "date", "server"):
                self.send_header(key, value)
        self.end_headers()
        self.wfile.write(response.content[: proxy.cut_at] if cut else response.content)
        self.close_connection = cut

    def log_message(self, *_args):
        pass


def test_an_interrupted_download_resumes_with_a_range_request(hub, tmp_path):
    """huggingface_hub 2.x resumes within the call: after a dropped connection it asks for the rest with Range.
    (A partial `.incomplete` file left in the cache by another process is not resumed: each download writes to a
    file of its own.)"""
    entry = next(f for f in hub.models["secret"].files if f.path == "model.safetensors")
    assert entry.size > CHUNK + 2**20
    proxy = CuttingProxy(hub.url, cut="/model.safetensors", cut_at=CHUNK + 2**20)
    try:
        got = run_client(hub, tmp_path, 'out(hf_hub_download("alice/secret", "model.safetensors"))',
                         token=hub.tokens["alice"], endpoint=proxy.url)
    finally:
        proxy.shutdown()
    assert sha256_file(Path(got)) == entry.sha256
    gets = [(rng, status) for method, name, rng, status in proxy.log if method == "GET" and name == "model.safetensors"]
    assert gets == [(None, 200), (f"bytes={CHUNK}-", 206)]  # the first 10 MiB were kept, the rest asked for
